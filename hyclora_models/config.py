"""HyCLoRAConfig: LoRA settings under PEFT's names plus the activation-compression settings."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .compression import DEFAULT_GROUP_SIZE, DEFAULT_ROTATE, check_bits, check_options

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODES = ("speed", "memory")
ATTENTION_BACKWARDS = ("recompute", "kernel")


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


@dataclass
class HyCLoRAConfig:
    """LoRA: ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``use_rslora`` mean what they
    mean in ``peft.LoraConfig``. Compression: ``bits`` (2/4/8, or 16 to store exactly), ``outlier_ratio``,
    ``group_size``, ``rotate``, ``rounding``, ``clip`` as in ``hyclora_models.compress``; ``mode`` "speed" or
    "memory" (gradient checkpointing selects memory mode). ``attention_backward``: "recompute" (attention's forward
    runs again in backward from the restored q/k/v; every backend, mask and dropout) or "kernel" (where
    torch's cuDNN attention covers the case: CUDA, bf16/fp16, SDPA, causal or no mask, no dropout, keep
    its logsumexp and call its own backward; elsewhere recompute). "kernel" saves the attention forward in
    backward but measured slower on an H100 and, as its backward reads the restored, quantised attention
    output, less accurate below 8 bits (see the README). ``nonlinear_bits``: bits for the kept inputs of the
    non-linearities that backward recomputes (q and k before the softmax, gate and up before SwiGLU;
    RoBERTa's query, key and intermediate), where quantisation costs the gradient most (README, Accuracy);
    None: ``bits``. ``fused_cross_entropy``: in training with labels, causal LMs compute the loss by a
    chunked LM head + cross-entropy that never materialises the logits (the output's ``logits`` is then
    None, as with Liger-Kernel); False: transformers' head and loss."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))
    use_rslora: bool = False
    bits: int = 4  # measured on SmolLM2 (README, Accuracy): 2 bits loses too much gradient accuracy for now
    outlier_ratio: float = 0.005
    group_size: int | str = DEFAULT_GROUP_SIZE
    rotate: bool = DEFAULT_ROTATE
    rounding: str = "nearest"
    clip: float | str = "auto"
    mode: str = "speed"
    attention_backward: str = "recompute"
    nonlinear_bits: int | None = None
    fused_cross_entropy: bool = True

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.nonlinear_bits is not None:
            check_bits(self.nonlinear_bits, "nonlinear_bits")
        if self.attention_backward not in ATTENTION_BACKWARDS:
            raise ValueError(f"attention_backward must be one of {ATTENTION_BACKWARDS}, got {self.attention_backward!r}")
        if not isinstance(self.fused_cross_entropy, bool):
            raise ValueError(f"fused_cross_entropy must be True or False, got {self.fused_cross_entropy!r}")
        check_options(self.bits, self.outlier_ratio, self.group_size, self.rotate, self.rounding, self.clip)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)

    def compression_kwargs(self) -> dict:
        return dict(bits=self.bits, outlier_ratio=self.outlier_ratio, group_size=self.group_size,
                    rotate=self.rotate, rounding=self.rounding, clip=self.clip)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_any(cls, value) -> HyCLoRAConfig:
        """A HyCLoRAConfig from itself, a dict (unknown keys rejected by name) or None (defaults)."""
        if isinstance(value, cls):
            return value
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise TypeError(f"hyclora_config must be a HyCLoRAConfig or a dict, got {type(value).__name__}")
        unknown = set(value) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown HyCLoRAConfig keys: {sorted(unknown)}")
        return cls(**value)
