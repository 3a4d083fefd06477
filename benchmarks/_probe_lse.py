import sys, time, torch, torch.nn.functional as F
sys.path.insert(0, ".")
from hyclora_models import compress
torch.manual_seed(0)
dev = "cuda"
B, H, T, D = 4, 32, 1024, 128
dtype = torch.bfloat16
q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype) for _ in range(3))
go = torch.randn(B, H, T, D, device=dev, dtype=dtype) * 1e-2
scale = D ** -0.5
out, lse, cq, ck, mq, mk, ps, po, _ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
def bwd(o):
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(go, q, k, v, o, lse, None, None, mq, mk, 0.0, True, ps, po, scale=scale)
exact = bwd(out)
flat = out.transpose(1, 2).reshape(B, T, H * D)
for bits in (8, 4, 2):
    oq = compress(flat, bits=bits, outlier_ratio=0.0).decompress().view(B, T, H, D).transpose(1, 2)
    got = bwd(oq)
    print(bits, "rel err O", ((oq - out).float().norm() / out.float().norm()).item(),
          "cos dq,dk,dv", [F.cosine_similarity(a.float().flatten(), b.float().flatten(), 0).item() for a, b in zip(got, exact)])
def t(fn, n=20):
    fn(); torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t0) / n * 1e3
def recompute():
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale)
    torch.autograd.grad(o, (qq, kk, vv), go)
print(torch.ops.aten._scaled_dot_product_cudnn_attention.default._schema)
print(torch.ops.aten._scaled_dot_product_cudnn_attention_backward.default._schema)
res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
print([(type(r).__name__, getattr(r, "shape", r), getattr(r, "dtype", None)) for r in res])
co, clse, ccq, cck, cmq, cmk, cps, cpo, _ = res
def cbwd(o):
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(go, q, k, v, o, clse, cps, cpo, None, ccq, cck, cmq, cmk, 0.0, True, scale=scale)
cg = cbwd(co)
print("cudnn vs flash grads", [(a.float() - b.float()).abs().max().item() for a, b in zip(cg, exact)])
print("cudnn ms: fwd", t(lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)), "bwd", t(lambda: cbwd(co)))
print("ms: fwd", t(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), "lse bwd", t(lambda: bwd(out)), "recompute fwd+bwd", t(recompute))
