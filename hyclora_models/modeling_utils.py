"""What every HyC architecture shares: reading the HyC settings from a config, loading a standard
checkpoint of the base architecture (or an adapter directory on top of one) into the HyC class,
initialising adapters that a checkpoint does not hold, and saving the adapter in PEFT's format (locally or
to the Hub)."""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

from transformers import PretrainedConfig, PreTrainedModel

from . import adapter as A
from .config import HyCLoRAConfig
from .lora import adapter_parameters, freeze_base, init_lora_weights, inject_lora, is_lora_module

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
_PUSH_KWARGS = ("commit_message", "commit_description", "private", "token", "revision", "create_pr")
# loading options that are also config fields: transformers' from_pretrained applies them itself
_LOADING_KWARGS = ("dtype", "torch_dtype", "attn_implementation", "experts_implementation")


def _lora_aware_init(init_weights, module):
    """PEFT's initialisation for adapter matrices (A Kaiming-uniform, B = 0), transformers' for the rest."""
    if is_lora_module(module):
        init_lora_weights(module)
    else:
        init_weights(module)


def hyclora_config_of(config) -> HyCLoRAConfig:
    return HyCLoRAConfig.from_any(getattr(config, "hyclora_config", None))


class HyCPreTrainedMixin:
    """Mixed in before a transformers ``*PreTrainedModel`` subclass. The class sets ``config_class`` (the
    HyC config), ``base_model_type`` (e.g. "llama"), ``layer_class`` (the fused layer that the layers at
    ``layers_path`` become), ``peft_task_type`` and ``trainable_modules`` (task heads trained whole and
    saved with the adapter, PEFT's modules_to_save)."""

    base_model_type: str
    layer_class: type
    layers_path = "model.layers"
    peft_task_type: str | None = "CAUSAL_LM"
    trainable_modules: tuple[str, ...] = ()
    default_target_modules: tuple[str, ...] | None = None  # None: HyCLoRAConfig's default (Llama's names)

    @classmethod
    def default_hyclora_config(cls) -> HyCLoRAConfig:
        targets = cls.default_target_modules
        return HyCLoRAConfig(target_modules=list(targets)) if targets else HyCLoRAConfig()

    def __init__(self, config):
        if getattr(config, "hyclora_config", None) is None:
            config.hyclora_config = self.default_hyclora_config().to_dict()
        super().__init__(config)
        from .fused import adopt_layers

        adopt_layers(self.get_submodule(self.layers_path), self.layer_class)
        inject_lora(self, hyclora_config_of(config))
        # transformers initialises the weights a checkpoint lacks with the _init_weights of the innermost
        # PreTrainedModel holding them (e.g. LlamaModel's: normal, std 0.02): adapters get PEFT's init instead
        for sub in self.modules():
            if isinstance(sub, PreTrainedModel):
                sub._init_weights = partial(_lora_aware_init, sub._init_weights)
        # what save_pretrained leaves out; transformers' Trainer, loading a checkpoint's model.safetensors
        # (the adapter alone), takes exactly these keys to be missing (no warning)
        trained = adapter_parameters(self)
        self._keys_to_ignore_on_save = {k for k in self.state_dict() if k not in trained}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, hyclora_config=None, config=None,
                        base_model=None, **kwargs):
        """Load a standard checkpoint of the base architecture (or one of ours) and add LoRA adapters; or,
        given an adapter directory (PEFT's format: ours or one PEFT wrote), load its base model
        (``base_model_name_or_path``, or ``base_model=``) and the adapter's weights, ready to train on.

        ``hyclora_config``: a HyCLoRAConfig or dict; default: the checkpoint's (or adapter's) own HyC
        settings, else the defaults. Other keyword arguments go to transformers' ``from_pretrained``
        (dtype, attn_implementation...) or, as there, set config fields (num_labels, id2label...)."""
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
        if config is None:
            # as transformers does when it loads the config: keyword arguments naming config fields
            # (num_labels, id2label, problem_type...) set them, the rest go on to the model
            loading = {k: kwargs.pop(k) for k in _LOADING_KWARGS if k in kwargs}
            config, kwargs = cls.config_class.from_dict(raw, return_unused_kwargs=True, **kwargs)
            kwargs.update(loading)
        elif not isinstance(config, cls.config_class):
            config = cls.config_class.from_dict(raw)
        if hyclora_config is not None:
            config.hyclora_config = HyCLoRAConfig.from_any(hyclora_config).to_dict()
        elif getattr(config, "hyclora_config", None) is None:
            config.hyclora_config = cls.default_hyclora_config().to_dict()
        model = super().from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)
        freeze_base(model[0] if isinstance(model, tuple) else model)
        return model

    # A standard checkpoint holds no adapter: not worth a "MISSING" line per weight in transformers' load
    # report. transformers still initialises them, through _init_weights (see _lora_aware_init).
    _keys_to_ignore_on_load_missing = [r"\.lora_[AB]\."]

    def save_pretrained(self, save_directory, is_main_process: bool = True, push_to_hub: bool = False, **kwargs):
        """Write the adapter only (PEFT's format, see ``hyclora_models.adapter``), not the frozen base
        weights: ``peft.PeftModel.from_pretrained(base, save_directory)`` and this class's
        ``from_pretrained(save_directory)`` both load it, and transformers' ``Trainer`` resumes from it
        (``model.safetensors``: the adapter under the model's names). With ``push_to_hub=True`` the adapter's
        files (not Trainer's copy) also go to the Hub repo ``repo_id`` (default: the directory's name), as in
        ``push_to_hub`` (``commit_message``,
        ``commit_description``, ``private``, ``token``, ``revision``, ``create_pr``). Other transformers
        arguments are accepted and ignored (the adapter is always written as safetensors)."""
        if not is_main_process:
            return None
        A.save_adapter(self, save_directory, hyclora_config_of(self.config), self.name_or_path or None,
                       self.peft_task_type)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", None) or Path(save_directory).resolve().name
            return A.push_adapter(save_directory, repo_id, **{k: kwargs[k] for k in _PUSH_KWARGS if k in kwargs})
        return None

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: bool | str | None = None, revision: str | None = None, create_pr: bool = False,
                    commit_description: str | None = None, **kwargs):
        """Upload the adapter (the files ``save_pretrained`` writes, not the base weights) to the Hub model
        repo ``repo_id``, created if missing, in one commit; returns huggingface_hub's CommitInfo. The
        arguments mean what they mean in transformers' ``push_to_hub``; others (max_shard_size, tags...)
        are accepted and ignored."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return A.push_adapter(tmp, repo_id, commit_message=commit_message, commit_description=commit_description,
                                  private=private, token=token, revision=revision, create_pr=create_pr)
