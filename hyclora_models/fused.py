"""What the fused layers (``decoder``: Llama/Mistral, ``encoder``: RoBERTa) share.

A fused layer runs one training step of a transformers layer as ONE autograd op. The architecture
writes a *step* (a ``FusedStep`` subclass) with ``forward(x, keep)`` (the layer's output and, with
``keep``, the list of what backward needs: compressed tensors and exact low-rank parts) and
``backward(dout, saved, need_dx)``; this module gives the two autograd ops that run a step:

- speed mode (``_FusedLayer``): forward keeps the step's list, backward rebuilds from it;
- memory mode (``_RecomputedLayer``, what gradient checkpointing selects): forward keeps only the
  compressed layer input; backward runs the step again in speed mode and differentiates that.

plus the pieces every step uses: a projection's parts (``_Proj``), attention through transformers'
``ALL_ATTENTION_FUNCTIONS`` with its dropout replayed, and the layer mixin (``FusedLayerMixin``).
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .compression import compress
from .lora import LoRALinear, _autocast, _autocast_state, _new_seed, is_lora_name, matches_target, seeded_dropout
from .modeling_utils import hyclora_config_of


class _Proj:
    """One projection during a fused step: frozen base (weight, bias) and, if it has LoRA, A, B, the
    scaling, the dropout probability and this step's dropout seed."""

    def __init__(self, module: nn.Linear):
        self.weight, self.bias = module.weight, module.bias
        self.lora = isinstance(module, LoRALinear)
        if self.lora:
            self.A, self.B = module.lora_A.weight, module.lora_B.weight
            self.scaling, self.p = module.scaling, module.lora_dropout
            self.seed = _new_seed() if self.p else None

    def main(self, h):
        return F.linear(h, self.weight, self.bias)

    def xa(self, h):
        return F.linear(seeded_dropout(h, self.p, self.seed), self.A) if self.lora else None

    def add_lora(self, main, xa):
        """main + s (x A) B: the projection's output from its stored parts (one addmm: the scaling and the
        add ride on the matmul's epilogue)."""
        return _addmm(main, xa, self.B.t(), self.scaling) if self.lora else main

    def backward(self, dy, h, xa, grads: dict, need_dh: bool = True):
        """dL/dh for y = proj(h); LoRA gradients go into ``grads`` (keyed by parameter)."""
        dh = dy @ self.weight if need_dh else None
        if self.lora:  # the scaling s rides on the matmuls' epilogues: d(xA) = s dy B
            s, dy2 = self.scaling, dy.flatten(0, -2)
            dy_b = dy2 @ self.B
            if self.B.requires_grad:
                grads[self.B] = _scaled_mm(dy2.T, xa.flatten(0, -2), s)
            if self.A.requires_grad:
                grads[self.A] = _scaled_mm(dy_b.T, seeded_dropout(h, self.p, self.seed).flatten(0, -2), s)
            if need_dh and self.p:
                dh = dh + seeded_dropout(_scaled_mm(dy_b, self.A, s).view(dh.shape), self.p, self.seed)
            elif need_dh:  # in place: dh is this call's own buffer
                dh.view(-1, dh.shape[-1]).addmm_(dy_b, self.A.to(dh.dtype), alpha=s)  # (autocast skips in-place ops)
        return dh


def _addmm(c, a, b, alpha: float = 1.0):
    """c + alpha a @ b for (..., n) ``c`` and (..., k) ``a``, as one matmul with an epilogue."""
    return torch.addmm(c.reshape(-1, c.shape[-1]), a.reshape(-1, a.shape[-1]), b, alpha=alpha).view(c.shape)


def _scaled_mm(a, b, alpha: float):
    """alpha a @ b for 2-D a, b in one kernel (beta=0: the uninitialised input is never read)."""
    return torch.addmm(a.new_empty(a.shape[0], b.shape[1]), a, b, beta=0, alpha=alpha)


def _rng_state(device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextmanager
def _replayed_rng(device, state):
    """Within the block the RNG starts from ``state`` (and is restored after); a no-op for None."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


_CUDNN_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)


def _expand_kv(t, heads: int):
    """(B, kv heads, T, D) -> (B, heads, T, D), each kv head repeated for its group (GQA)."""
    b, kv, n, d = t.shape
    return t if kv == heads else t[:, :, None].expand(b, kv, heads // kv, n, d).reshape(b, heads, n, d)


def _kernel_attention(q, k, v, module):
    """(B, heads, T, D) output and logsumexp of torch's cuDNN attention (what SDPA runs on Hopper)."""
    q, k, v = (_expand_kv(t, q.shape[1]).contiguous() for t in (q, k, v))
    out, lse, *_ = _CUDNN_ATTENTION(q, k, v, None, True, 0.0, getattr(module, "is_causal", True), False,
                                    scale=module.scaling)
    return out, lse


def _kernel_attention_backward(q, k, v, out, d_out, lse, module):
    """cuDNN attention's own backward from the kept logsumexp; ``out`` and ``d_out`` are (B, T, heads * D).
    The kernel forms rowsum(dO * O) from ``out``, so a restored (quantised) output perturbs dq and dk."""
    q, k, v = (t.contiguous() for t in (q, k, v))  # all (B, heads, T, D)-contiguous, as in the forward
    out, d_out = (t.view(*t.shape[:2], q.shape[1], -1).transpose(1, 2).contiguous() for t in (out, d_out))
    none = torch.empty((), dtype=torch.int64, device=q.device)  # dropout's philox seed/offset: unused
    n_q, n_k = q.shape[2], k.shape[2]
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        d_out, q, k, v, out, lse, none, none, None, None, None, n_q, n_k, 0.0, getattr(module, "is_causal", True),
        scale=module.scaling)


class FusedStep:
    """One layer call: the layer, its projections (with this step's dropout seeds), the attention inputs
    passed to the layer, and the compression settings (``with_outliers`` for residual-stream tensors such
    as norm inputs, ``plain`` for the rest, ``nonlinear`` for the base outputs of the projections named in
    ``NONLINEAR``, the inputs of a recomputed non-linearity). Subclasses write ``forward`` and ``backward``."""

    NONLINEAR: tuple[str, ...] = ()

    def __init__(self, layer: nn.Module, projections: dict[str, nn.Linear], attention_mask, attn_kwargs: dict,
                 config):
        self.layer, self.attention_mask, self.attn_kwargs = layer, attention_mask, attn_kwargs
        self.projs = {name: _Proj(m) for name, m in projections.items()}
        self.with_outliers = config.compression_kwargs()
        self.plain = {**self.with_outliers, "outlier_ratio": 0.0}
        self.nonlinear = {**self.plain, "bits": config.nonlinear_bits or config.bits}
        self.rng = None  # RNG state before attention, when attention dropout must be replayed

    def lora_params(self) -> list[torch.Tensor]:
        return [t for p in self.projs.values() if p.lora for t in (p.A, p.B)]

    def heads(self, q, k, v):
        """(B, T, width) q, k, v -> (B, heads, T, head_dim), as the architecture's attention feeds its kernel
        (Llama: with RoPE)."""
        raise NotImplementedError

    def attention(self, q, k, v):
        """(attention output (B, T, hidden), the kernel's logsumexp if kept for its own backward, else None)
        from (B, T, width) q, k, v."""
        q, k, v = self.heads(q, k, v)
        module = self.layer.attention_module()
        p = self.layer.attention_dropout() if module.training else 0.0
        if self._kernel_backward(module, q, k, p):
            out, lse = _kernel_attention(q, k, v, module)
            return out.transpose(1, 2).reshape(*out.shape[:1], out.shape[2], -1), lse
        if p and self.rng is None:
            self.rng = _rng_state(q.device)
        with _replayed_rng(q.device, self.rng if p else None):  # the same dropout mask when called again
            out, _ = self.layer.attention_function()(module, q, k, v, self.attention_mask, dropout=p,
                                                     scaling=module.scaling, **self.attn_kwargs)
        return out.reshape(*out.shape[:2], -1), None

    def attention_backward(self, qkv, out, d_out, lse):
        """dL/d(q, k, v) for (B, T, width) q, k, v (rebuilt, requiring grad), from the restored attention
        output ``out`` and its gradient: through the kernel's own backward with the kept logsumexp, or by
        running attention again (its forward replays dropout) and differentiating that."""
        with torch.enable_grad():
            if lse is None:
                return torch.autograd.grad(self.attention(*qkv)[0], qkv, d_out)
            heads = self.heads(*qkv)
            heads = (heads[0], *(_expand_kv(t, heads[0].shape[1]) for t in heads[1:]))
        d_heads = _kernel_attention_backward(*heads, out, d_out, lse, self.layer.attention_module())
        return torch.autograd.grad(heads, qkv, d_heads)

    def _kernel_backward(self, module, q, k, p) -> bool:
        """Whether attention runs through torch's cuDNN kernel with its logsumexp kept, for the kernel's own
        backward: asked for, and a case that kernel covers exactly as transformers' SDPA path would (CUDA,
        half precision, head_dim a multiple of 8, no mask beyond causal, no dropout, no cache)."""
        return (self.layer.hyclora_config().attention_backward == "kernel" and _CUDNN_ATTENTION is not None
                and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and not p
                and self.attention_mask is None and q.shape[2] == k.shape[2]
                and module.config._attn_implementation == "sdpa")

    def project(self, names, h, saved: list | None):
        """The outputs of projections ``names`` of ``h``; into ``saved`` (unless None) each one's base output
        compressed and its x A."""
        outs = []
        for name in names:
            p = self.projs[name]
            main, xa = p.main(h), p.xa(h)
            if saved is not None:
                saved += [compress(main, **(self.nonlinear if name in self.NONLINEAR else self.plain)), xa]
            outs.append(p.add_lora(main, xa))
        return outs

    def forward(self, x, keep: bool):
        raise NotImplementedError

    def backward(self, dout, saved, need_dx: bool):
        raise NotImplementedError


def _flatten_saved(saved):
    """Compressed tensors -> (flat tensors for save_for_backward, how to rebuild the list)."""
    flat, layout = [], []
    for item in saved:
        if item is None or isinstance(item, torch.Tensor):
            flat.append(item)
            layout.append(None)
        else:
            tensors, rest = item.split()
            flat += tensors
            layout.append((rest, len(tensors)))
    return flat, layout


def _unflatten_saved(flat, layout):
    out, i = [], 0
    for entry in layout:
        if entry is None:
            out.append(flat[i])
            i += 1
        else:
            rest, n = entry
            out.append(rest.join(flat[i:i + n]))
            i += n
    return out


class _FusedLayer(torch.autograd.Function):
    """Speed mode: forward keeps the step's set, backward rebuilds from it."""

    @staticmethod
    def forward(ctx, x, step: FusedStep, *lora_params):
        out, saved = step.forward(x, keep=True)
        flat, ctx.layout = _flatten_saved(saved)
        ctx.save_for_backward(*flat)
        ctx.step, ctx.autocast = step, _autocast_state(x.device.type)
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = _unflatten_saved(ctx.saved_tensors, ctx.layout)
        with _autocast(ctx.autocast):
            dx, grads = ctx.step.backward(dout, saved, need_dx=ctx.needs_input_grad[0])
        return (dx, None, *(grads.get(p) for p in ctx.step.lora_params()))


class _RecomputedLayer(torch.autograd.Function):
    """Memory mode: forward keeps only the compressed layer input; backward runs the layer again in speed
    mode from the restored input (same dropout seeds) and differentiates that."""

    @staticmethod
    def forward(ctx, x, step: FusedStep, *lora_params):
        out, _ = step.forward(x, keep=False)
        flat, ctx.layout = _flatten_saved([compress(x, **step.with_outliers)])
        ctx.save_for_backward(*flat)
        ctx.step, ctx.autocast = step, _autocast_state(x.device.type)
        return out

    @staticmethod
    def backward(ctx, dout):
        (cx,) = _unflatten_saved(ctx.saved_tensors, ctx.layout)
        x = cx.decompress().detach().requires_grad_(ctx.needs_input_grad[0])
        del cx
        params = ctx.step.lora_params()
        with torch.enable_grad(), _autocast(ctx.autocast):
            out = _FusedLayer.apply(x, ctx.step, *params)
        wanted = [t for t in (x, *params) if t.requires_grad]
        got = dict(zip(wanted, torch.autograd.grad(out, wanted, dout)))
        return (got.get(x), None, *(got.get(p) for p in params))


class FusedLayerMixin:
    """Mixed in before a transformers layer class. The subclass names its attention module
    (``attention_module()``) and, in its ``forward``, runs ``run_fused(x, step)`` when ``trains_fused()``
    and the transformers layer itself otherwise (eval, inference, an unfrozen base...).

    transformers' gradient checkpointing would keep the layer input uncompressed; here the flag selects
    memory mode instead, so the input is kept once, compressed, and never also checkpointed."""

    memory_mode = False

    @property
    def gradient_checkpointing(self) -> bool:
        return False  # transformers' own checkpoint wrapper never runs on this layer

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        self.memory_mode = bool(enable)

    def attention_module(self) -> nn.Module:
        raise NotImplementedError

    def attention_dropout(self) -> float:
        raise NotImplementedError

    def modeling_module(self):
        """transformers' modeling file of this architecture (its eager attention, RoPE...)."""
        return sys.modules[type(self.attention_module()).__module__]

    def attention_function(self):
        eager = self.modeling_module().eager_attention_forward
        return ALL_ATTENTION_FUNCTIONS.get_interface(self.attention_module().config._attn_implementation, eager)

    def hyclora_config(self):
        return hyclora_config_of(self.attention_module().config)

    def trains_fused(self) -> bool:
        """Training with gradients and a frozen base (a trainable base weight needs autograd's own graph)."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        return not any(p.requires_grad for n, p in self.named_parameters() if not is_lora_name(n))

    def run_fused(self, x, step: FusedStep):
        fn = _RecomputedLayer if self.memory_mode or self.hyclora_config().mode == "memory" else _FusedLayer
        return fn.apply(x, step, *step.lora_params())


def adopt_layers(layers: nn.ModuleList, cls: type) -> None:
    """Turn transformers' layers into ``cls`` (a FusedLayerMixin subclass of their class) in place: the
    mixin adds behaviour, no parameters, so nothing is allocated twice."""
    for layer in layers:
        if not isinstance(layer, cls):
            if cls.__bases__[-1] is not type(layer):
                raise TypeError(f"{cls.__name__} adopts {cls.__bases__[-1].__name__} layers, not {type(layer).__name__}")
            layer.__class__ = cls


def stored_bytes(c, width: int, elem_bytes: int, outliers: bool = False, nonlinear: bool = False) -> float:
    """Bytes ``compress`` keeps per token for a tensor of ``width`` channels under HyCLoRAConfig ``c``:
    bits/8 bytes an element (``nonlinear_bits`` for a non-linearity's input), a scale and a zero-point per
    group, and the outlier channels if asked."""
    bits = (c.nonlinear_bits or c.bits) if nonlinear else c.bits
    if bits == 16:
        return width * elem_bytes
    stats = 0 if c.group_size == "channel" else 2 * elem_bytes * math.ceil(width / c.group_size)
    return width * bits / 8 + stats + (math.ceil(c.outlier_ratio * width) * elem_bytes if outliers else 0)


def n_lora(c, names) -> int:
    """How many of the projections ``names`` (paths inside a layer) the config's target_modules put LoRA on."""
    return sum(any(matches_target(p, t) for t in c.target_modules) for p in names)
