"""The fused post-LN encoder layer of METHOD.md (RoBERTa; BERT-style layers with the same module names).

The layer: z1 = x + drop(o(attention(q(x), k(x), v(x)))), h = LN1(z1), z2 = h + drop(down(gelu(up(h)))),
out = LN2(z2), where q/k/v are ``attention.self.query/key/value``, o is ``attention.output.dense``, up is
``intermediate.dense`` and down is ``output.dense``. In training (grad on, base frozen) it runs as ONE
autograd op that keeps only:

| kept | form |
|---|---|
| x, the layer input (q/k/v input) | compressed with outlier channels |
| q_main, k_main, v_main (base outputs, before LoRA) | compressed |
| attention output (o input) | compressed |
| z1, z2 (the LayerNorm inputs) | compressed with outlier channels; mean and rstd per token |
| up_main (the intermediate, before GELU) | compressed |
| x A of each LoRA projection | exact |

Backward rebuilds the rest: h = LN1(z1) from z1 and its statistics, up = up_main + s (h A) B, GELU (the
module's own activation, so the same erf form as the forward), q/k/v = main + s (x A) B and attention.
Hidden, attention and LoRA dropout masks are regenerated from seeds / the replayed RNG, never stored.
Memory mode keeps only the compressed layer input and reruns the layer in backward (``fused``).
"""

from __future__ import annotations

import torch

from .compression import compress
from .fused import FusedLayerMixin, FusedStep, n_lora, stored_bytes
from .lora import _new_seed, seeded_dropout

ATTN = ("query", "key", "value")
O, UP, DOWN = "attention.output.dense", "intermediate.dense", "output.dense"


def _layer_norm(ln, z):
    """(LN(z), mean, rstd) from torch's own kernel (what its autograd would keep)."""
    return torch.ops.aten.native_layer_norm(z, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _layer_norm_output(ln, z, mean, rstd):
    """LN(z) from the kept statistics."""
    return (((z.float() - mean) * rstd) * ln.weight + ln.bias).to(z.dtype)


def _layer_norm_backward(ln, dy, z, mean, rstd):
    """dL/dz with the LayerNorm's weight and bias frozen (torch's own backward kernel)."""
    return torch.ops.aten.native_layer_norm_backward(dy, z, ln.normalized_shape, mean, rstd, ln.weight, ln.bias,
                                                     [True, False, False])[0]


class _Step(FusedStep):
    NONLINEAR = ("query", "key", UP)  # softmax(q k), gelu(up)

    def __init__(self, layer, attention_mask, attn_kwargs, config):
        projections = {n: getattr(layer.attention.self, n) for n in ATTN}
        projections |= {n: layer.get_submodule(n) for n in (O, UP, DOWN)}
        super().__init__(layer, projections, attention_mask, attn_kwargs, config)
        # hidden dropout after o and after down, as (p, seed) with the mask regenerated from the seed
        self.drops = [(m.p, _new_seed()) if m.p and layer.training else (0.0, None)
                      for m in (layer.attention.output.dropout, layer.output.dropout)]

    def heads(self, q, k, v):
        shape = (*q.shape[:-1], -1, self.layer.attention.self.attention_head_size)
        return tuple(t.view(shape).transpose(1, 2) for t in (q, k, v))

    def forward(self, x, keep: bool):
        """The layer's output; with ``keep``, also the list of what backward needs (see the module doc)."""
        L, P = self.layer, self.projs
        saved = [compress(x, **self.with_outliers)] if keep else None
        ctx, lse = self.attention(*self.project(ATTN, x, saved))
        xa = P[O].xa(ctx)
        if keep:
            saved += [compress(ctx, **self.plain), xa, lse]
        z1 = x + seeded_dropout(P[O].add_lora(P[O].main(ctx), xa), *self.drops[0])
        del ctx
        h, mean1, rstd1 = _layer_norm(L.attention.output.LayerNorm, z1)
        if keep:
            saved += [compress(z1, **self.with_outliers), mean1, rstd1]
        del z1, mean1, rstd1
        (up,) = self.project((UP,), h, saved)
        g = L.intermediate.intermediate_act_fn(up)
        del up
        xa = P[DOWN].xa(g)
        if keep:
            saved.append(xa)
        z2 = h + seeded_dropout(P[DOWN].add_lora(P[DOWN].main(g), xa), *self.drops[1])
        del g, h
        out, mean2, rstd2 = _layer_norm(L.output.LayerNorm, z2)
        if keep:
            saved += [compress(z2, **self.with_outliers), mean2, rstd2]
        return out, saved

    def backward(self, dout, saved, need_dx: bool):
        """(dL/dx or None, {LoRA parameter: gradient}) from what ``forward(keep=True)`` kept."""
        L, P, grads = self.layer, self.projs, {}
        (cx, cq, xa_q, ck, xa_k, cv, xa_v, c_ctx, xa_o, lse, cz1, mean1, rstd1, c_up, xa_up, xa_down, cz2, mean2,
         rstd2) = saved
        ln1, ln2 = L.attention.output.LayerNorm, L.output.LayerNorm
        dz2 = _layer_norm_backward(ln2, dout, cz2.decompress(), mean2, rstd2)
        # feed-forward: rebuild up from its parts, recompute GELU, then h = LN1(z1) for up's LoRA
        with torch.enable_grad():
            up = P[UP].add_lora(c_up.decompress(), xa_up).requires_grad_()
            g = L.intermediate.intermediate_act_fn(up)
        dg = P[DOWN].backward(seeded_dropout(dz2, *self.drops[1]), g.detach(), xa_down, grads)
        (d_up,) = torch.autograd.grad(g, up, dg)
        del g, up, dg
        z1 = cz1.decompress()
        dh = dz2 + P[UP].backward(d_up, _layer_norm_output(ln1, z1, mean1, rstd1), xa_up, grads)
        del dz2, d_up
        dz1 = _layer_norm_backward(ln1, dh, z1, mean1, rstd1)
        del dh, z1
        # attention: o from the rebuilt attention output, then attention's backward from rebuilt q/k/v
        ctx = c_ctx.decompress()
        d_ctx = P[O].backward(seeded_dropout(dz1, *self.drops[0]), ctx, xa_o, grads)
        x = cx.decompress()
        parts = ((cq, xa_q), (ck, xa_k), (cv, xa_v))
        qkv = [P[n].add_lora(c.decompress(), xa).requires_grad_() for n, (c, xa) in zip(ATTN, parts)]
        d_qkv = self.attention_backward(qkv, ctx, d_ctx, lse)
        del qkv, ctx, d_ctx
        dx = dz1 if need_dx else None
        for name, d, (_, xa) in zip(ATTN, d_qkv, parts):
            dh = P[name].backward(d, x, xa, grads, need_dh=need_dx)
            dx = dx + dh if need_dx else None
        return dx, grads


class HyCEncoderLayerMixin(FusedLayerMixin):
    """Mixed in before a transformers RoBERTa/BERT layer. Training (grad on, base frozen, not a decoder)
    runs through the fused op above; everything else through the transformers layer itself."""

    def attention_module(self):
        return self.attention.self

    def attention_dropout(self) -> float:
        return self.attention.self.dropout.p

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                past_key_values=None, **kwargs):
        if self.is_decoder or not self.trains_fused():
            return super().forward(hidden_states, attention_mask, encoder_hidden_states,
                                   encoder_attention_mask=encoder_attention_mask, past_key_values=past_key_values,
                                   **kwargs)
        step = _Step(self, attention_mask, kwargs, self.hyclora_config())
        return self.run_fused(hidden_states, step)


def predicted_saved_bytes(config, hyclora_config, dtype: torch.dtype, mode: str | None = None) -> float:
    """The table above as a formula: bytes an encoder layer keeps for backward per token (speed mode), or
    the compressed layer input alone (memory mode); see ``decoder.predicted_saved_bytes``."""
    c, e = hyclora_config, torch.finfo(dtype).bits // 8
    d, d_f = config.hidden_size, config.intermediate_size

    def stored(width, outliers=False, nonlinear=False):
        return stored_bytes(c, width, e, outliers, nonlinear)

    if (mode or c.mode) == "memory":
        return stored(d, outliers=True)
    return (3 * stored(d, outliers=True) + 2 * 8  # x, z1, z2; LayerNorm mean and rstd (fp32 on CUDA)
            + 2 * stored(d, nonlinear=True) + stored(d) + stored(d)  # q/k/v main, attention output
            + stored(d_f, nonlinear=True)  # up main
            + n_lora(c, (*(f"attention.self.{n}" for n in ATTN), O, UP, DOWN)) * c.r * e)  # x A, exact


__all__ = ["HyCEncoderLayerMixin", "predicted_saved_bytes"]
