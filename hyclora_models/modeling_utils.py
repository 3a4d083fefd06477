"""What every HyC architecture shares: reading the HyC settings from a config, loading a standard
checkpoint of the base architecture into the HyC class, and initialising adapters that a checkpoint
does not hold."""

from __future__ import annotations

from transformers import PretrainedConfig

from .config import HyCLoRAConfig
from .lora import freeze_base, init_missing_lora

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def hyclora_config_of(config) -> HyCLoRAConfig:
    return HyCLoRAConfig.from_any(getattr(config, "hyclora_config", None))


class HyCPreTrainedMixin:
    """Mixed in before a transformers ``*PreTrainedModel`` subclass. The class sets ``config_class`` (the
    HyC config) and ``base_model_type`` (e.g. "llama")."""

    base_model_type: str

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, hyclora_config=None, config=None, **kwargs):
        """Load a standard checkpoint of the base architecture (or one of ours) and add LoRA adapters.

        ``hyclora_config``: a HyCLoRAConfig or dict; default: the checkpoint's own HyC settings, else the
        defaults. Other keyword arguments go to transformers' ``from_pretrained`` (dtype, attn_implementation...)."""
        if config is None:
            hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            raw, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub)
        else:
            raw = config.to_dict()
        model_type = raw.pop("model_type", None)
        if model_type not in (cls.base_model_type, cls.config_class.model_type):
            raise ValueError(f"{cls.__name__} loads {cls.base_model_type!r} checkpoints; "
                             f"{pretrained_model_name_or_path} has model_type {model_type!r}")
        if not isinstance(config, cls.config_class):
            config = cls.config_class.from_dict(raw)
        if hyclora_config is not None or getattr(config, "hyclora_config", None) is None:
            config.hyclora_config = HyCLoRAConfig.from_any(hyclora_config).to_dict()
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, config=config,
                                              output_loading_info=True, **kwargs)
        # transformers initialises missing weights with each sub-model's own _init_weights (normal, std 0.02):
        # give every adapter weight the checkpoint lacked PEFT's initialisation instead (B = 0).
        init_missing_lora(model, set(info["missing_keys"]))
        freeze_base(model)
        return (model, info) if want_info else model
