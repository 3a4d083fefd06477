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

The autograd ops, the projection helper and attention's dropout replay are shared with the encoder
(``hyclora_models.fused``). RMSNorm (forward, recompute from a kept rstd, backward with the residual's
gradient added), SwiGLU and RoPE (forward, backward) are single Triton kernels on CUDA tensors
(``hyclora_models.kernels``), their torch references elsewhere. ``HyCCausalLMMixin`` gives the causal
LMs a training loss that never materialises the logits (``kernels.cross_entropy``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import activations
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from .compression import compress
from .fused import FusedLayerMixin, FusedStep, adopt_layers, n_lora, stored_bytes
from .kernels.cross_entropy import linear_cross_entropy
from .kernels.rms_norm import rms_norm, rms_norm_backward
from .kernels.rope import rope
from .kernels.swiglu import swiglu, swiglu_backward
from .modeling_utils import hyclora_config_of

logger = logging.get_logger(__name__)

ATTN = ("q_proj", "k_proj", "v_proj")
SILU = (nn.SiLU, getattr(activations, "SiLUActivation", nn.SiLU))  # what ACT2FN gives for "silu"/"swish"
MLP_IN = ("gate_proj", "up_proj")


def _norm(norm: nn.Module, x, rstd=None):
    """transformers' RMSNorm, returning (output, rstd); with ``rstd`` given it is reused, not recomputed."""
    return rms_norm(x, norm.weight, norm.variance_epsilon, rstd)


def _norm_backward(norm: nn.Module, dy, x, rstd, residual):
    """``residual`` + dL/dx of the norm, the weight frozen."""
    return rms_norm_backward(dy, x, norm.weight, rstd, residual)


class _Step(FusedStep):
    """A pre-norm decoder layer's step; ``cos``/``sin``: the RoPE tables passed to the layer."""

    NONLINEAR = ("q_proj", "k_proj", *MLP_IN)  # softmax(q k), silu(gate) * up

    def __init__(self, layer, cos, sin, attention_mask, attn_kwargs, config):
        attn, mlp = layer.self_attn, layer.mlp
        projections = {n: getattr(attn, n) for n in (*ATTN, "o_proj")} | {n: getattr(mlp, n) for n in (*MLP_IN, "down_proj")}
        super().__init__(layer, projections, attention_mask, attn_kwargs, config)
        self.cos, self.sin = cos, sin
        self.swiglu = isinstance(mlp.act_fn, SILU)  # else the act_fn module, through autograd in backward

    def heads(self, q, k, v):
        shape = (*q.shape[:-1], -1, self.layer.self_attn.head_dim)
        q, k, v = (t.view(shape) for t in (q, k, v))
        if self.layer.rotate_half_rope:  # RoPE on (B, T, heads, D): one kernel each way on a GPU
            return tuple(t.transpose(1, 2) for t in (rope(q, self.cos, self.sin), rope(k, self.cos, self.sin), v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = self.layer.modeling_module().apply_rotary_pos_emb(q, k, self.cos, self.sin)
        return q, k, v

    def forward(self, x, keep: bool):
        """The layer's output; with ``keep``, also the list of what backward needs (see the module doc)."""
        L, P = self.layer, self.projs
        saved = []
        h1, rstd1 = _norm(L.input_layernorm, x)
        if keep:
            saved += [compress(x, **self.with_outliers), rstd1]
        del rstd1
        qkv = self.project(ATTN, h1, saved if keep else None)
        del h1
        attn_out, lse = self.attention(*qkv)
        del qkv
        xa = P["o_proj"].xa(attn_out)
        if keep:
            saved += [compress(attn_out, **self.plain), xa, lse]
        x_mid = x + P["o_proj"].add_lora(P["o_proj"].main(attn_out), xa)
        del attn_out
        h2, rstd2 = _norm(L.post_attention_layernorm, x_mid)
        if keep:
            saved += [compress(x_mid, **self.with_outliers), rstd2]
        del rstd2
        gate_up = self.project(MLP_IN, h2, saved if keep else None)
        del h2
        m = swiglu(*gate_up) if self.swiglu else L.mlp.act_fn(gate_up[0]) * gate_up[1]
        del gate_up
        xa = P["down_proj"].xa(m)
        if keep:
            saved.append(xa)
        out = x_mid + P["down_proj"].add_lora(P["down_proj"].main(m), xa)
        return out, saved

    def backward(self, dout, saved, need_dx: bool):
        """(dL/dx or None, {LoRA parameter: gradient}) from what ``forward(keep=True)`` kept."""
        L, P, grads = self.layer, self.projs, {}
        (cx, rstd1, cq, xa_q, ck, xa_k, cv, xa_v, c_attn, xa_o, lse, cx_mid, rstd2, cg, xa_g, cu, xa_u, xa_d) = saved
        # MLP: rebuild gate/up; recompute silu(gate) * up. Each tensor is rebuilt only where it is next read,
        # so that the working set stays small (the step's peak is inside this backward).
        gate, up = P["gate_proj"].add_lora(cg.decompress(), xa_g), P["up_proj"].add_lora(cu.decompress(), xa_u)
        if self.swiglu:
            dm = P["down_proj"].backward(dout, swiglu(gate, up), xa_d, grads)
            d_gate, d_up = swiglu_backward(gate, up, dm, inplace=True)
        else:
            with torch.enable_grad():
                gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
                m = L.mlp.act_fn(gate) * up
            dm = P["down_proj"].backward(dout, m.detach(), xa_d, grads)
            d_gate, d_up = torch.autograd.grad(m, (gate, up), dm)
            del m
        del gate, up, dm
        x_mid = cx_mid.decompress()
        h2, _ = _norm(L.post_attention_layernorm, x_mid, rstd2)
        dh2 = P["gate_proj"].backward(d_gate, h2, xa_g, grads) + P["up_proj"].backward(d_up, h2, xa_u, grads)
        del d_gate, d_up, h2
        dx_mid = _norm_backward(L.post_attention_layernorm, dh2, x_mid, rstd2, residual=dout)
        del dh2, x_mid
        # attention: o_proj from the rebuilt attention output, then attention's backward from rebuilt q/k/v
        attn_out = c_attn.decompress()
        d_attn = P["o_proj"].backward(dx_mid, attn_out, xa_o, grads)
        if lse is None:
            attn_out = None  # only the kernel's own backward reads it again
        parts = ((cq, xa_q), (ck, xa_k), (cv, xa_v))
        qkv = [P[n].add_lora(c.decompress(), xa).requires_grad_() for n, (c, xa) in zip(ATTN, parts)]
        d_qkv = self.attention_backward(qkv, attn_out, d_attn, lse)
        del qkv, attn_out, d_attn
        x = cx.decompress()
        h1, _ = _norm(L.input_layernorm, x, rstd1)
        dh1 = None
        for name, d, (_, xa) in zip(ATTN, d_qkv, parts):
            dh = P[name].backward(d, h1, xa, grads, need_dh=need_dx)
            dh1 = dh if dh1 is None else dh1.add_(dh)  # in place: the first projection's own buffer
        del d_qkv, h1
        dx = _norm_backward(L.input_layernorm, dh1, x, rstd1, residual=dx_mid) if need_dx else None
        return dx, grads



class HyCDecoderLayerMixin(FusedLayerMixin):
    """Mixed in before a transformers pre-norm decoder layer (input_layernorm, self_attn with q/k/v/o_proj,
    post_attention_layernorm, mlp with gate/up/down_proj). Training runs through the fused ops above;
    everything else (eval, inference, KV cache, an unfrozen base) through the transformers layer itself."""

    # transformers' apply_rotary_pos_emb is the rotate-half form (Llama, Mistral): kernels.rope computes it;
    # False: the modeling module's own function
    rotate_half_rope = True

    def attention_module(self):
        return self.self_attn

    def attention_dropout(self) -> float:
        return self.self_attn.attention_dropout

    def extra_attention_kwargs(self) -> dict:
        """What the architecture's attention adds to the attention call (Mistral: the sliding window)."""
        return {}

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        cached = past_key_values is not None and past_key_values.get_seq_length(self.self_attn.layer_idx) > 0
        if cached or not self.trains_fused():  # attention over an earlier cache: the standard layer
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, use_cache=use_cache,
                                   position_embeddings=position_embeddings, **kwargs)
        if past_key_values is not None:
            logger.warning_once("HyC training layers do not fill the KV cache (as with gradient checkpointing); "
                                "pass use_cache=False in training to silence this.")
        attn_kwargs = dict(position_ids=position_ids, use_cache=use_cache, **self.extra_attention_kwargs(), **kwargs)
        step = _Step(self, *position_embeddings, attention_mask, attn_kwargs, self.hyclora_config())
        return self.run_fused(hidden_states, step)


class HyCCausalLMMixin:
    """Mixed in before a transformers ``*ForCausalLM``: in training with labels (and a frozen, bias-free
    head, the whole sequence's logits asked for) the loss comes from ``linear_cross_entropy`` on the last
    hidden states, and ``logits`` is None; otherwise the model's own forward."""

    def fuses_loss(self, labels, logits_to_keep) -> bool:
        head = self.get_output_embeddings()
        return (labels is not None and self.training and torch.is_grad_enabled()
                and hyclora_config_of(self.config).fused_cross_entropy and isinstance(head, nn.Linear) and head.bias is None
                and not head.weight.requires_grad and isinstance(logits_to_keep, int) and logits_to_keep == 0
                and getattr(self.config, "loss_type", None) in (None, "ForCausalLM"))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if not self.fuses_loss(labels, logits_to_keep):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                                   use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        ignore = kwargs.get("ignore_index", -100)
        shifted = kwargs.get("shift_labels")
        if shifted is None:  # tokens < n predict n, as transformers' ForCausalLMLoss
            shifted = nn.functional.pad(labels, (0, 1), value=ignore)[..., 1:]
        loss = linear_cross_entropy(out.last_hidden_state, self.get_output_embeddings().weight, shifted,
                                    kwargs.get("num_items_in_batch"), ignore)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)


def predicted_saved_bytes(config, hyclora_config, dtype: torch.dtype, mode: str | None = None) -> float:
    """METHOD.md's table as a formula: bytes a decoder layer keeps for backward per token (speed mode), or
    the compressed layer input alone (memory mode). Codes are bits/8 bytes an element; each group of G
    elements adds a scale and a zero-point in ``dtype``; the norm inputs add their outlier channels."""
    c, e = hyclora_config, torch.finfo(dtype).bits // 8
    d, d_f = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    d_kv = config.num_key_value_heads * head_dim

    def stored(width, outliers=False, nonlinear=False):
        return stored_bytes(c, width, e, outliers, nonlinear)

    if (mode or c.mode) == "memory":
        return stored(d, outliers=True)
    return (2 * (stored(d, outliers=True) + 4)  # x and x_mid with their fp32 rstd
            + stored(d, nonlinear=True) + stored(d_kv, nonlinear=True) + stored(d_kv) + stored(d)  # q/k/v, attn out
            + 2 * stored(d_f, nonlinear=True)  # gate/up main
            + n_lora(c, (*ATTN, "o_proj", *MLP_IN, "down_proj")) * c.r * e)  # x A, exact


__all__ = ["HyCCausalLMMixin", "HyCDecoderLayerMixin", "adopt_layers", "predicted_saved_bytes"]
