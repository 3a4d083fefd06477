"""The fused pre-norm decoder layer of METHOD.md (Llama, and Mistral which only changes attention's kwargs).

In training (grad on, base frozen) a decoder layer runs as ONE autograd op that keeps only:

| kept | form |
|---|---|
| x, the layer input | compressed with outlier channels; rstd fp32 per token |
| q_main, k_main, v_main (base outputs, before LoRA and RoPE) | compressed |
| attention output (o_proj input) | compressed |
| x_mid, the norm-2 input | compressed with outlier channels; rstd |
| gate_main, up_main | compressed |
| x A of each LoRA projection | exact |

Backward rebuilds the rest: norm outputs from x and rstd, q/k/v/gate/up = main + s (x A) B, RoPE and
attention (recomputed from the rebuilt q/k/v through the same attention function, so every backend,
mask and packed-sequence kwarg works unchanged), silu(gate) * up. LoRA dropout masks are regenerated from
a seed. Memory mode (what gradient checkpointing selects) keeps only the compressed layer input and runs
the layer again, in the fused form above, in backward.

Everything here is torch; the fused Triton producers/consumers are the performance issue's work.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .compression import compress
from .lora import LoRALinear, _new_seed, is_lora_name, seeded_dropout
from .modeling_utils import hyclora_config_of

logger = logging.get_logger(__name__)

ATTN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")


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
        """main + s (x A) B: the projection's output from its stored parts."""
        return main + F.linear(xa, self.B) * self.scaling if self.lora else main

    def backward(self, dy, h, xa, grads: dict, need_dh: bool = True):
        """dL/dh for y = proj(h); LoRA gradients go into ``grads`` (keyed by parameter)."""
        dh = dy @ self.weight if need_dh else None
        if self.lora:
            dxa = (dy @ self.B) * self.scaling
            if self.B.requires_grad:
                grads[self.B] = (dy.flatten(0, -2).T @ xa.flatten(0, -2)) * self.scaling
            if self.A.requires_grad:
                grads[self.A] = dxa.flatten(0, -2).T @ seeded_dropout(h, self.p, self.seed).flatten(0, -2)
            if need_dh:
                dh = dh + seeded_dropout(dxa @ self.A, self.p, self.seed)
        return dh


def _rms_norm(norm: nn.Module, x, rstd=None):
    """transformers' RMSNorm, returning (output, rstd); with ``rstd`` given it is reused, not recomputed."""
    x32 = x.float()
    if rstd is None:
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * (x32 * rstd).to(x.dtype), rstd


def _rms_norm_backward(norm: nn.Module, dy, x, rstd):
    """dL/dx of y = w * (x rstd) with the weight frozen: rstd (g - n mean(g n)), n = x rstd, g = dy w."""
    g = (dy * norm.weight).float()
    n = x.float() * rstd
    return (rstd * (g - n * (g * n).mean(-1, keepdim=True))).to(x.dtype)


@dataclass(eq=False)
class _Step:
    """What one layer call needs besides its input: the layer, its projections for this step (with their
    dropout seeds), the attention inputs passed to the layer, and the compression settings."""

    layer: nn.Module
    cos: torch.Tensor
    sin: torch.Tensor
    attention_mask: torch.Tensor | None
    attn_kwargs: dict
    with_outliers: dict  # compress() options for the norm inputs
    plain: dict  # and for everything else (no outlier channels)
    projs: dict = field(default_factory=dict)
    rng: tuple | None = None  # RNG state before attention, when attention dropout must be replayed

    def __post_init__(self):
        L = self.layer
        for name in (*ATTN, "o_proj"):
            self.projs[name] = _Proj(getattr(L.self_attn, name))
        for name in (*MLP_IN, "down_proj"):
            self.projs[name] = _Proj(getattr(L.mlp, name))

    def lora_params(self) -> list[torch.Tensor]:
        return [t for p in self.projs.values() if p.lora for t in (p.A, p.B)]

    def attention(self, q, k, v):
        """RoPE and attention from (B, T, heads * head_dim) q, k, v; returns (B, T, heads * head_dim)."""
        attn = self.layer.self_attn
        shape = (*q.shape[:-1], -1, attn.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        q, k = self.layer.apply_rotary_pos_emb(q, k, self.cos, self.sin)
        p = attn.attention_dropout if attn.training else 0.0
        if p and self.rng is None:
            self.rng = _rng_state(q.device)
        with _replayed_rng(q.device, self.rng if p else None):
            out, _ = self.layer.attention_function()(attn, q, k, v, self.attention_mask, dropout=p,
                                                     scaling=attn.scaling, **self.attn_kwargs)
        return out.reshape(*out.shape[:2], -1)

    def _project(self, names, h, saved: list | None):
        """The outputs of projections ``names`` of ``h``; into ``saved`` (unless None) each one's base output
        compressed and its x A."""
        outs = []
        for name in names:
            p = self.projs[name]
            main, xa = p.main(h), p.xa(h)
            if saved is not None:
                saved += [compress(main, **self.plain), xa]
            outs.append(p.add_lora(main, xa))
        return outs

    def forward(self, x, keep: bool):
        """The layer's output; with ``keep``, also the list of what backward needs (see the module doc)."""
        L, P = self.layer, self.projs
        saved = []
        h1, rstd1 = _rms_norm(L.input_layernorm, x)
        if keep:
            saved += [compress(x, **self.with_outliers), rstd1]
        del rstd1
        qkv = self._project(ATTN, h1, saved if keep else None)
        del h1
        attn_out = self.attention(*qkv)
        del qkv
        xa = P["o_proj"].xa(attn_out)
        if keep:
            saved += [compress(attn_out, **self.plain), xa]
        x_mid = x + P["o_proj"].add_lora(P["o_proj"].main(attn_out), xa)
        del attn_out
        h2, rstd2 = _rms_norm(L.post_attention_layernorm, x_mid)
        if keep:
            saved += [compress(x_mid, **self.with_outliers), rstd2]
        del rstd2
        gate_up = self._project(MLP_IN, h2, saved if keep else None)
        del h2
        m = L.mlp.act_fn(gate_up[0]) * gate_up[1]
        del gate_up
        xa = P["down_proj"].xa(m)
        if keep:
            saved.append(xa)
        out = x_mid + P["down_proj"].add_lora(P["down_proj"].main(m), xa)
        return out, saved

    def backward(self, dout, saved, need_dx: bool):
        """(dL/dx or None, {LoRA parameter: gradient}) from what ``forward(keep=True)`` kept."""
        L, P, grads = self.layer, self.projs, {}
        (cx, rstd1, cq, xa_q, ck, xa_k, cv, xa_v, c_attn, xa_o, cx_mid, rstd2, cg, xa_g, cu, xa_u, xa_d) = saved
        # MLP: rebuild x_mid, norm-2 output, gate/up; recompute silu(gate) * up
        x_mid = cx_mid.decompress()
        h2, _ = _rms_norm(L.post_attention_layernorm, x_mid, rstd2)
        with torch.enable_grad():
            gate = P["gate_proj"].add_lora(cg.decompress(), xa_g).requires_grad_()
            up = P["up_proj"].add_lora(cu.decompress(), xa_u).requires_grad_()
            m = L.mlp.act_fn(gate) * up
        dm = P["down_proj"].backward(dout, m.detach(), xa_d, grads)
        d_gate, d_up = torch.autograd.grad(m, (gate, up), dm)
        del m, gate, up, dm
        dh2 = P["gate_proj"].backward(d_gate, h2, xa_g, grads) + P["up_proj"].backward(d_up, h2, xa_u, grads)
        del d_gate, d_up, h2
        dx_mid = dout + _rms_norm_backward(L.post_attention_layernorm, dh2, x_mid, rstd2)
        del dh2, x_mid
        # attention: o_proj from the rebuilt attention output, then attention again from rebuilt q/k/v
        d_attn = P["o_proj"].backward(dx_mid, c_attn.decompress(), xa_o, grads)
        x = cx.decompress()
        h1, _ = _rms_norm(L.input_layernorm, x, rstd1)
        parts = ((cq, xa_q), (ck, xa_k), (cv, xa_v))
        with torch.enable_grad():
            qkv = [P[n].add_lora(c.decompress(), xa).requires_grad_() for n, (c, xa) in zip(ATTN, parts)]
            out = self.attention(*qkv)
        d_qkv = torch.autograd.grad(out, qkv, d_attn)
        del out, qkv, d_attn
        dh1 = None
        for name, d, (_, xa) in zip(ATTN, d_qkv, parts):
            dh = P[name].backward(d, h1, xa, grads, need_dh=need_dx)
            dh1 = dh if dh1 is None else dh1 + dh
        del d_qkv, h1
        dx = dx_mid + _rms_norm_backward(L.input_layernorm, dh1, x, rstd1) if need_dx else None
        return dx, grads


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
    """Speed mode: forward keeps METHOD.md's set, backward rebuilds from it."""

    @staticmethod
    def forward(ctx, x, step: _Step, *lora_params):
        out, saved = step.forward(x, keep=True)
        flat, ctx.layout = _flatten_saved(saved)
        ctx.save_for_backward(*flat)
        ctx.step = step
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = _unflatten_saved(ctx.saved_tensors, ctx.layout)
        dx, grads = ctx.step.backward(dout, saved, need_dx=ctx.needs_input_grad[0])
        return (dx, None, *(grads.get(p) for p in ctx.step.lora_params()))


class _RecomputedLayer(torch.autograd.Function):
    """Memory mode: forward keeps only the compressed layer input; backward runs the layer again in speed
    mode from the restored input (same dropout seeds) and differentiates that."""

    @staticmethod
    def forward(ctx, x, step: _Step, *lora_params):
        out, _ = step.forward(x, keep=False)
        flat, ctx.layout = _flatten_saved([compress(x, **step.with_outliers)])
        ctx.save_for_backward(*flat)
        ctx.step = step
        return out

    @staticmethod
    def backward(ctx, dout):
        (cx,) = _unflatten_saved(ctx.saved_tensors, ctx.layout)
        x = cx.decompress().detach().requires_grad_(ctx.needs_input_grad[0])
        del cx
        params = ctx.step.lora_params()
        with torch.enable_grad():
            out = _FusedLayer.apply(x, ctx.step, *params)
        wanted = [t for t in (x, *params) if t.requires_grad]
        got = dict(zip(wanted, torch.autograd.grad(out, wanted, dout)))
        return (got.get(x), None, *(got.get(p) for p in params))


class HyCDecoderLayerMixin:
    """Mixed in before a transformers pre-norm decoder layer (input_layernorm, self_attn with q/k/v/o_proj,
    post_attention_layernorm, mlp with gate/up/down_proj). Training runs through the fused ops above;
    everything else (eval, inference, KV cache, an unfrozen base) through the transformers layer itself.

    transformers' gradient checkpointing would keep the layer input uncompressed; here the flag selects
    memory mode instead, so the input is kept once, compressed, and never also checkpointed."""

    memory_mode = False

    @property
    def gradient_checkpointing(self) -> bool:
        return False  # transformers' own checkpoint wrapper never runs on this layer

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        self.memory_mode = bool(enable)

    def _modeling_module(self):
        """transformers' modeling file of this architecture (its RoPE and eager attention)."""
        return sys.modules[type(self.self_attn).__module__]

    def attention_function(self):
        eager = self._modeling_module().eager_attention_forward
        return ALL_ATTENTION_FUNCTIONS.get_interface(self.self_attn.config._attn_implementation, eager)

    def apply_rotary_pos_emb(self, q, k, cos, sin):
        return self._modeling_module().apply_rotary_pos_emb(q, k, cos, sin)

    def extra_attention_kwargs(self) -> dict:
        """What the architecture's attention adds to the attention call (Mistral: the sliding window)."""
        return {}

    def _runs_fused(self, x, past_key_values) -> bool:
        if not (self.training and torch.is_grad_enabled()):
            return False
        if any(p.requires_grad for n, p in self.named_parameters() if not is_lora_name(n)):
            return False  # a trainable base weight needs autograd's own graph
        if past_key_values is not None and past_key_values.get_seq_length(self.self_attn.layer_idx) > 0:
            return False  # attention over an earlier cache: the standard layer
        return True

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        if not self._runs_fused(hidden_states, past_key_values):
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, use_cache=use_cache,
                                   position_embeddings=position_embeddings, **kwargs)
        if past_key_values is not None:
            logger.warning_once("HyC training layers do not fill the KV cache (as with gradient checkpointing); "
                           "pass use_cache=False in training to silence this.")
        cfg = hyclora_config_of(self.self_attn.config)
        opts = cfg.compression_kwargs()
        step = _Step(self, *position_embeddings, attention_mask,
                     dict(position_ids=position_ids, use_cache=use_cache, **self.extra_attention_kwargs(), **kwargs),
                     with_outliers=opts, plain={**opts, "outlier_ratio": 0.0})
        fn = _RecomputedLayer if self.memory_mode or cfg.mode == "memory" else _FusedLayer
        return fn.apply(hidden_states, step, *step.lora_params())


def adopt_layers(layers: nn.ModuleList, cls: type) -> None:
    """Turn transformers' decoder layers into ``cls`` (a HyCDecoderLayerMixin subclass of their class) in
    place: the mixin adds behaviour, no parameters, so nothing is allocated twice."""
    for layer in layers:
        if not isinstance(layer, cls):
            if cls.__bases__[-1] is not type(layer):
                raise TypeError(f"{cls.__name__} adopts {cls.__bases__[-1].__name__} layers, not {type(layer).__name__}")
            layer.__class__ = cls


def predicted_saved_bytes(config, hyclora_config, dtype: torch.dtype, mode: str | None = None) -> float:
    """METHOD.md's table as a formula: bytes a decoder layer keeps for backward per token (speed mode), or
    the compressed layer input alone (memory mode). Codes are bits/8 bytes an element; each group of G
    elements adds a scale and a zero-point in ``dtype``; the norm inputs add their outlier channels."""
    c, e = hyclora_config, torch.finfo(dtype).bits // 8
    d, d_f = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    d_kv = config.num_key_value_heads * head_dim

    def stored(width, outliers=False):
        if c.bits == 16:
            return width * e
        stats = 0 if c.group_size == "channel" else 2 * e * math.ceil(width / c.group_size)
        return width * c.bits / 8 + stats + (math.ceil(c.outlier_ratio * width) * e if outliers else 0)

    if (mode or c.mode) == "memory":
        return stored(d, outliers=True)
    n_lora = sum(any(t == p or t.endswith("." + p) for t in c.target_modules) for p in (*ATTN, "o_proj", *MLP_IN, "down_proj"))
    return (2 * (stored(d, outliers=True) + 4)  # x and x_mid with their fp32 rstd
            + stored(d) + 2 * stored(d_kv) + stored(d)  # q/k/v main, attention output
            + 2 * stored(d_f)  # gate/up main
            + n_lora * c.r * e)  # x A, exact


__all__ = ["HyCDecoderLayerMixin", "adopt_layers", "predicted_saved_bytes"]
