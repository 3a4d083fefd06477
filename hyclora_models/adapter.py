"""Adapters on disk in PEFT's format, so that they move between hyclora-models and PEFT unchanged:

- ``adapter_config.json``: PEFT's LoraConfig fields (peft_type LORA, task_type, base_model_name_or_path,
  r, lora_alpha, lora_dropout, target_modules, use_rslora, ...);
- ``adapter_model.safetensors``: the LoRA weights under PEFT's keys
  (``base_model.model.<module>.lora_A.weight``);
- ``hyclora_config.json``: the HyC settings PEFT has no field for (bits, outliers, grouping, mode), in a
  side file PEFT ignores;
- ``README.md``: a model card naming the base model and the settings;
- ``model.safetensors``: the same adapter weights under the model's own parameter names, for transformers'
  ``Trainer``: resuming (``resume_from_checkpoint``) and ``load_best_model_at_end`` load a checkpoint's
  ``model.safetensors`` into the model, and, told by ``_keys_to_ignore_on_save``, expect the frozen base
  weights to be missing from it (PEFT's own route there is for ``PeftModel`` instances only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .config import HyCLoRAConfig
from .lora import is_lora_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HYC_CONFIG = "hyclora_config.json"
TRAINER_WEIGHTS = "model.safetensors"
PEFT_PREFIX = "base_model.model."
_PEFT_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora")


def is_adapter_dir(path) -> bool:
    return Path(path, ADAPTER_CONFIG).is_file()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's keys."""
    return {PEFT_PREFIX + name: p.detach() for name, p in model.named_parameters() if is_lora_name(name)}


def peft_config_dict(config: HyCLoRAConfig, base_model_name_or_path: str | None, task_type: str) -> dict:
    d = {k: getattr(config, k) for k in _PEFT_FIELDS}
    return dict(peft_type="LORA", task_type=task_type, base_model_name_or_path=base_model_name_or_path,
                revision=None, bias="none", fan_in_fan_out=False, modules_to_save=None, init_lora_weights=True,
                inference_mode=True, layers_to_transform=None, layers_pattern=None, rank_pattern={},
                alpha_pattern={}, **d)


def save_adapter(model: nn.Module, directory, config: HyCLoRAConfig, base_model_name_or_path: str | None,
                 task_type: str) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft = peft_config_dict(config, base_model_name_or_path, task_type)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft, indent=2) + "\n")
    (directory / HYC_CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    weights = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(weights, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    save_file({k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()}, directory / TRAINER_WEIGHTS,
              metadata={"format": "pt"})
    (directory / "README.md").write_text(_model_card(peft, config))
    return directory


def _model_card(peft: dict, config: HyCLoRAConfig) -> str:
    base = peft["base_model_name_or_path"]
    return f"""---
library_name: peft
base_model: {base}
tags: [lora, hyclora-models]
---
# LoRA adapter for {base}

Trained with [hyclora-models](https://pypi.org/project/hyclora-models/) (LoRA with compressed
activations). The adapter is in PEFT's format: load it with `peft.PeftModel.from_pretrained(base, path)`
or continue training with hyclora-models' `from_pretrained(path)`.

- LoRA: r={config.r}, lora_alpha={config.lora_alpha}, lora_dropout={config.lora_dropout},
  use_rslora={config.use_rslora}, target_modules={config.target_modules}
- Activation compression in training: bits={config.bits}, outlier_ratio={config.outlier_ratio},
  group_size={config.group_size}, rotate={config.rotate}, rounding={config.rounding}, mode={config.mode}
"""


def read_adapter_config(directory) -> tuple[dict, HyCLoRAConfig]:
    """(PEFT's adapter config, the HyC settings: from the side file, else from PEFT's fields)."""
    directory = Path(directory)
    peft = json.loads((directory / ADAPTER_CONFIG).read_text())
    if peft.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory / ADAPTER_CONFIG}: peft_type {peft['peft_type']!r}; only LORA adapters load")
    if peft.get("modules_to_save") or peft.get("rank_pattern") or peft.get("alpha_pattern"):
        raise ValueError(f"{directory / ADAPTER_CONFIG}: modules_to_save / rank_pattern / alpha_pattern "
                         "are not supported")
    if (directory / HYC_CONFIG).is_file():
        hyc = HyCLoRAConfig.from_any(json.loads((directory / HYC_CONFIG).read_text()))
    else:
        targets = peft.get("target_modules")
        if not isinstance(targets, list):
            raise ValueError(f"{directory / ADAPTER_CONFIG}: target_modules must be a list of names, got {targets!r}")
        hyc = HyCLoRAConfig(**{k: peft[k] for k in _PEFT_FIELDS if peft.get(k) is not None})
    return peft, hyc


def load_adapter_weights(model: nn.Module, directory) -> None:
    """Copy the adapter file's weights into the model's LoRA parameters; every adapter weight of the model
    must be in the file with its shape, and the file must hold nothing else."""
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        other = [p.name for p in directory.glob("adapter_model.*")]
        hint = f" (found {other}: only safetensors adapters are loaded)" if other else ""
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {directory}{hint}")
    weights = load_file(path)
    params = lora_state_dict(model)
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ValueError(f"adapter {directory} does not fit {type(model).__name__}: "
                         f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    with torch.no_grad():
        for key, p in params.items():
            if weights[key].shape != p.shape:
                raise ValueError(f"adapter {directory}: {key} has shape {tuple(weights[key].shape)}, "
                                 f"the model expects {tuple(p.shape)} (another base model?)")
            p.copy_(weights[key])


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "HYC_CONFIG", "TRAINER_WEIGHTS", "is_adapter_dir", "lora_state_dict",
           "load_adapter_weights", "read_adapter_config", "save_adapter"]
