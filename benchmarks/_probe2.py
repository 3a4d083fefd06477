import torch, torch.nn.functional as F, traceback
from hyclora_models.fused import _kernel_attention, _kernel_attention_backward, _expand_kv
class M: is_causal = True; scaling = 64 ** -0.5
torch.manual_seed(0)
B, T, H, HKV, D = 2, 37, 8, 8, 64
for hkv in (8, 2):
    for layout in ("bthd", "contig"):
        q = torch.randn(B, T, H * D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, T, hkv * D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, T, hkv * D, device="cuda", dtype=torch.bfloat16)
        def heads(q, k, v):
            out = [t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v)]
            return [t.contiguous() for t in out] if layout == "contig" else out
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        hq, hk, hv = heads(*qkv)
        ref = F.scaled_dot_product_attention(hq, hk, hv, is_causal=True, scale=M.scaling, enable_gqa=True)
        ref = ref.transpose(1, 2).reshape(B, T, -1)
        go = torch.randn_like(ref)
        rg = torch.autograd.grad(ref, qkv, go)
        try:
            hq, hk, hv = heads(*qkv)
            out, lse = _kernel_attention(hq, hk, hv, M)
            out2 = out.transpose(1, 2).reshape(B, T, -1)
            print(hkv, layout, "fwd err", (out2 - ref).abs().max().item(), "out strides", out.stride(), "lse", lse.shape, lse.stride())
            with torch.enable_grad():
                hs = heads(*qkv)
                hs = (hs[0], *(_expand_kv(t, H) for t in hs[1:]))
            for name, o in (("out2", out2), ("out2-contig-bhtd", None)):
                if o is None: continue
                dh = _kernel_attention_backward(*hs, o, go, lse, M)
                g = torch.autograd.grad(hs, qkv, dh, retain_graph=True)
                print("   ", name, [F.cosine_similarity(a.float().flatten(), b.float().flatten(), 0).item() for a, b in zip(g, rg)])
            # variant: pass out/dout in the forward's own layout
            do = go.view(B, T, H, D).transpose(1, 2)
            dh = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(do, *hs, out, lse, torch.empty((), dtype=torch.int64, device="cuda"), torch.empty((), dtype=torch.int64, device="cuda"), None, None, None, T, T, 0.0, True, scale=M.scaling)
            g = torch.autograd.grad(hs, qkv, dh)
            print("    native-layout", [F.cosine_similarity(a.float().flatten(), b.float().flatten(), 0).item() for a, b in zip(g, rg)])
        except Exception:
            traceback.print_exc()
