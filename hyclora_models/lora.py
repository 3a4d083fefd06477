"""The LoRA linear layer: y = x W^T (+ b) + scaling * dropout(x) A^T B^T, with PEFT's parameter names
(``<module>.weight`` stays the frozen base weight, so standard checkpoints load as they are;
``<module>.lora_A.weight`` and ``<module>.lora_B.weight`` are the adapter).

In training its autograd keeps the input x compressed (``compress``) and x A exactly (the low-rank part
that dB needs); the dropout mask is regenerated in backward from a seed, never stored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .compression import compress
from .config import HyCLoRAConfig

_LORA_ROLE = "_hyclora_role"  # "A" or "B" on the adapter's nn.Linear children


def _new_seed() -> int:
    return int(torch.randint(0, 2**62, ()))


_GENERATORS: dict = {}


def _generator(device: torch.device) -> torch.Generator:
    """One reusable generator per device (re-seeded at each use): cheaper than a new one per mask."""
    if device not in _GENERATORS:
        _GENERATORS[device] = torch.Generator(device=device)
    return _GENERATORS[device]


def seeded_dropout(x: torch.Tensor, p: float, seed: int | None) -> torch.Tensor:
    """Inverted dropout whose mask is a function of (seed, shape, device): regenerated, never stored."""
    if not p or seed is None:
        return x
    g = _generator(x.device).manual_seed(seed)
    keep = torch.rand(x.shape, generator=g, device=x.device) >= p
    return x * keep / (1 - p)


def _autocast_state(device_type: str):
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast(state):
    """A custom backward runs under its forward's autocast state (mixed precision: Trainer's bf16=True...)."""
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


class _LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout_p, compression):
        seed = _new_seed() if dropout_p else None
        xa = F.linear(seeded_dropout(x, dropout_p, seed), lora_a)
        y = F.linear(x, weight, bias) + F.linear(xa, lora_b) * scaling
        cx = compress(x, **compression)
        tensors, ctx.cx = cx.split()
        ctx.save_for_backward(*tensors, xa, weight, lora_a, lora_b)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.autocast = _autocast_state(x.device.type)
        return y

    @staticmethod
    def backward(ctx, dy):
        with _autocast(ctx.autocast):
            return _LoRALinearFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        *tensors, xa, weight, lora_a, lora_b = ctx.saved_tensors
        x = ctx.cx.join(tensors).decompress()
        del tensors
        p, seed, s = ctx.dropout_p, ctx.seed, ctx.scaling
        dxa = (dy @ lora_b) * s  # (..., r), the shape of x A
        d_b = (dy.flatten(0, -2).T @ xa.flatten(0, -2)) * s if ctx.needs_input_grad[4] else None
        d_a = None
        if ctx.needs_input_grad[3]:
            d_a = dxa.flatten(0, -2).T @ seeded_dropout(x, p, seed).flatten(0, -2)
        del x
        dx = dy @ weight + seeded_dropout(dxa @ lora_a, p, seed) if ctx.needs_input_grad[0] else None
        return dx, None, None, d_a, d_b, None, None, None


class LoRALinear(nn.Linear):
    """An nn.Linear (frozen) with a LoRA adapter. Build with ``LoRALinear.from_linear(linear, config)``."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: HyCLoRAConfig) -> LoRALinear:
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight, m.bias = linear.weight, linear.bias  # the same Parameters: nothing copied
        kw = dict(bias=False, device=linear.weight.device, dtype=linear.weight.dtype)
        m.lora_A = nn.Linear(m.in_features, config.r, **kw)
        m.lora_B = nn.Linear(config.r, m.out_features, **kw)
        setattr(m.lora_A, _LORA_ROLE, "A")
        setattr(m.lora_B, _LORA_ROLE, "B")
        m.r, m.scaling, m.lora_dropout = config.r, config.scaling, float(config.lora_dropout)
        m.compression = config.compression_kwargs()
        if not linear.weight.is_meta:
            init_lora_weights(m.lora_A)
            init_lora_weights(m.lora_B)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if self.training and torch.is_grad_enabled() and base_frozen:
            return _LoRALinearFunction.apply(x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight,
                                             self.scaling, self.lora_dropout, self.compression)
        xd = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(xd)) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}, bits={self.compression['bits']}"


@torch.no_grad()
def init_lora_weights(module: nn.Module) -> None:
    """PEFT's initialisation of an adapter matrix: A Kaiming-uniform (a=sqrt(5)), B zeros."""
    if getattr(module, _LORA_ROLE) == "A":
        nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    else:
        nn.init.zeros_(module.weight)


def is_lora_module(module: nn.Module) -> bool:
    """Whether ``module`` is an adapter matrix (the lora_A / lora_B child of a LoRALinear)."""
    return getattr(module, _LORA_ROLE, None) is not None


def matches_target(name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the module name equals the target or ends with '.target'."""
    return name == target or name.endswith("." + target)


def inject_lora(model: nn.Module, config: HyCLoRAConfig) -> list[str]:
    """Replace every nn.Linear whose name matches ``config.target_modules`` with a LoRALinear; freeze all
    but the adapters. Returns the replaced module names; a target that matches nothing is an error."""
    replaced, hit = [], set()
    heads = _head_prefixes(model)
    for name, module in list(model.named_modules()):
        targets = [t for t in config.target_modules if matches_target(name, t)]
        if not targets or isinstance(module, LoRALinear) or name.startswith(heads):  # heads train whole, as in PEFT
            continue
        if type(module) is not nn.Linear:
            raise ValueError(f"target module {name!r} is a {type(module).__name__}; LoRA supports nn.Linear here")
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, LoRALinear.from_linear(module, config))
        replaced.append(name)
        hit.update(targets)
    missing = [t for t in config.target_modules if t not in hit]
    if missing:
        linears = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules {missing} match no module of {type(model).__name__}; "
                         f"its linear layers are named {linears}")
    freeze_base(model)
    return replaced


def is_lora_name(name: str) -> bool:
    """Whether a parameter name (``named_parameters()``) is a LoRA weight."""
    return ".lora_A." in name or ".lora_B." in name


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """``model.trainable_modules`` (task heads trained whole, PEFT's modules_to_save) as name prefixes."""
    return tuple(f"{m}." for m in getattr(model, "trainable_modules", ()))


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """What the adapter trains and saves: the LoRA weights and the task heads' parameters (a weight tied to
    one outside the head, such as a masked-LM decoder tied to the embeddings, stays frozen)."""
    heads = _head_prefixes(model)
    return {n: p for n, p in model.named_parameters() if is_lora_name(n) or n.startswith(heads)}


def freeze_base(model: nn.Module) -> None:
    """Only the adapter trains (loading a checkpoint brings fresh Parameters: call again after it)."""
    trained = set(adapter_parameters(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)


__all__ = ["LoRALinear", "adapter_parameters", "inject_lora", "is_lora_name", "matches_target", "freeze_base", "init_lora_weights", "is_lora_module",
           "seeded_dropout"]
