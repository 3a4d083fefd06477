"""What every HyC architecture shares: reading the HyC settings from a config, loading a standard
checkpoint of the base architecture (or an adapter directory on top of one) into the HyC class,
initialising adapters that a checkpoint does not hold, and saving the adapter in PEFT's format."""

from __future__ import annotations

from transformers import PretrainedConfig

from . import adapter as A
from .config import HyCLoRAConfig
from .lora import freeze_base, init_missing_lora, inject_lora, is_lora_name

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def hyclora_config_of(config) -> HyCLoRAConfig:
    return HyCLoRAConfig.from_any(getattr(config, "hyclora_config", None))


class HyCPreTrainedMixin:
    """Mixed in before a transformers ``*PreTrainedModel`` subclass. The class sets ``config_class`` (the
    HyC config), ``base_model_type`` (e.g. "llama") and, for decoders, ``decoder_layer_class`` (the fused
    layer its ``model.layers`` become)."""

    base_model_type: str
    decoder_layer_class: type | None = None
    peft_task_type = "CAUSAL_LM"

    def __init__(self, config):
        super().__init__(config)
        if self.decoder_layer_class is not None:
            from .decoder import adopt_layers

            adopt_layers(self.model.layers, self.decoder_layer_class)
        inject_lora(self, hyclora_config_of(config))
        # what save_pretrained leaves out; transformers' Trainer, loading a checkpoint's model.safetensors
        # (the adapter alone), takes exactly these keys to be missing (no warning)
        self._keys_to_ignore_on_save = {k for k in self.state_dict() if not is_lora_name(k)}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, hyclora_config=None, config=None,
                        base_model=None, **kwargs):
        """Load a standard checkpoint of the base architecture (or one of ours) and add LoRA adapters; or,
        given an adapter directory (PEFT's format: ours or one PEFT wrote), load its base model
        (``base_model_name_or_path``, or ``base_model=``) and the adapter's weights, ready to train on.

        ``hyclora_config``: a HyCLoRAConfig or dict; default: the checkpoint's (or adapter's) own HyC
        settings, else the defaults. Other keyword arguments go to transformers' ``from_pretrained``
        (dtype, attn_implementation...)."""
        if A.is_adapter_dir(pretrained_model_name_or_path):
            peft, stored = A.read_adapter_config(pretrained_model_name_or_path)
            base = base_model or peft.get("base_model_name_or_path")
            if not base:
                raise ValueError(f"adapter {pretrained_model_name_or_path} names no base_model_name_or_path; "
                                 "pass base_model=")
            model = cls.from_pretrained(base, *args, hyclora_config=hyclora_config or stored, config=config,
                                        **kwargs)
            A.load_adapter_weights(model[0] if isinstance(model, tuple) else model, pretrained_model_name_or_path)
            return model
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

    def save_pretrained(self, save_directory, is_main_process: bool = True, push_to_hub: bool = False, **kwargs):
        """Write the adapter only (PEFT's format, see ``hyclora_models.adapter``), not the frozen base
        weights: ``peft.PeftModel.from_pretrained(base, save_directory)`` and this class's
        ``from_pretrained(save_directory)`` both load it, and transformers' ``Trainer`` resumes from it
        (``model.safetensors``: the adapter under the model's names). Other transformers arguments are
        accepted and ignored (the adapter is always written as safetensors)."""
        if push_to_hub:
            raise NotImplementedError("push_to_hub is not supported yet: save, then upload the directory with "
                                      "huggingface_hub.upload_folder")
        if is_main_process:
            A.save_adapter(self, save_directory, hyclora_config_of(self.config), self.name_or_path or None,
                           self.peft_task_type)
