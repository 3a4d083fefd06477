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
  weights to be missing from it (PEFT's own route there is for ``PeftModel`` instances only). It is not
  pushed to the Hub.

``push_adapter`` uploads these files to the Hub (``push_to_hub``); ``hyclora_models.convert`` merges an
adapter into its base, or converts between this format and PEFT's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .config import HyCLoRAConfig
from .lora import adapter_parameters

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HYC_CONFIG = "hyclora_config.json"
MODEL_CARD = "README.md"
TRAINER_WEIGHTS = "model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, HYC_CONFIG, MODEL_CARD)  # the adapter proper
PEFT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CARD)  # the same less our side file
PEFT_PREFIX = "base_model.model."
_PEFT_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora")
# PEFT LoraConfig fields that change what the adapter is beyond plain LoRA on every target (bias: != "none")
_NOT_PLAIN = ("rank_pattern", "alpha_pattern", "use_dora", "lora_bias", "fan_in_fan_out",
              "layers_to_transform", "layer_replication", "trainable_token_indices", "target_parameters")


def is_adapter_dir(path) -> bool:
    return Path(path, ADAPTER_CONFIG).is_file()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's keys: LoRA as ``base_model.model.<module>.lora_A.weight``, task
    heads (modules_to_save) as ``base_model.model.<head>.<param>``."""
    return {PEFT_PREFIX + name: p.detach() for name, p in adapter_parameters(model).items()}


def peft_config_dict(config: HyCLoRAConfig, base_model_name_or_path: str | None, task_type: str | None,
                     modules_to_save=()) -> dict:
    d = {k: getattr(config, k) for k in _PEFT_FIELDS}
    return dict(peft_type="LORA", task_type=task_type, base_model_name_or_path=base_model_name_or_path,
                revision=None, bias="none", fan_in_fan_out=False, modules_to_save=list(modules_to_save) or None,
                init_lora_weights=True,
                inference_mode=True, layers_to_transform=None, layers_pattern=None, rank_pattern={},
                alpha_pattern={}, **d)


def save_adapter(model: nn.Module, directory, config: HyCLoRAConfig, base_model_name_or_path: str | None,
                 task_type: str | None) -> Path:
    from safetensors.torch import save_file

    if any(type(p).__name__ == "DTensor" for p in adapter_parameters(model).values()):
        raise ValueError("saving a sharded (FSDP2 fully_shard) model's adapter is not supported: train with DDP "
                         "(torch DistributedDataParallel, torchrun / accelerate launch) or one GPU to save adapters")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft = peft_config_dict(config, base_model_name_or_path, task_type, getattr(model, "trainable_modules", ()))
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft, indent=2) + "\n")
    (directory / HYC_CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    weights = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(weights, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    save_file({k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()}, directory / TRAINER_WEIGHTS,
              metadata={"format": "pt"})
    (directory / MODEL_CARD).write_text(_model_card(peft, config))
    return directory


def push_adapter(directory, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                 private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                 create_pr: bool = False):
    """Upload the adapter files of ``directory`` (``ADAPTER_FILES``, nothing else) to the Hub model repo
    ``repo_id`` (created if missing) in one commit, as transformers' ``push_to_hub`` does; returns
    huggingface_hub's CommitInfo."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")  # transformers does too
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(directory, name)))
                  for name in ADAPTER_FILES]
    return api.create_commit(repo_id, operations, commit_message=commit_message or "Upload LoRA adapter",
                             commit_description=commit_description, repo_type="model", revision=revision,
                             create_pr=create_pr)


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


def read_peft_config(directory) -> dict:
    """PEFT's adapter config of an adapter directory; it must be a LoRA adapter."""
    path = Path(directory, ADAPTER_CONFIG)
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory} (not an adapter directory)")
    peft = json.loads(path.read_text())
    if peft.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {peft['peft_type']!r}; only LORA adapters are supported")
    return peft


def not_plain_lora(peft: dict) -> list[str]:
    """The PEFT fields set that make an adapter more than plain LoRA on its target modules."""
    return [k for k in _NOT_PLAIN if peft.get(k)] + (["bias"] if peft.get("bias", "none") != "none" else [])


def hyc_config_from_peft(peft: dict, directory, **settings) -> HyCLoRAConfig:
    """HyC settings from PEFT's LoRA fields plus ``settings`` (compression: bits, outlier_ratio, ...); the
    adapter must be one hyclora-models can train: plain LoRA with a list of target module names."""
    where, extras = Path(directory, ADAPTER_CONFIG), not_plain_lora(peft)
    if extras:
        raise ValueError(f"{where}: {', '.join(extras)} not supported (plain LoRA only)")
    targets = peft.get("target_modules")
    if not isinstance(targets, list):
        raise ValueError(f"{where}: target_modules must be a list of names, got {targets!r}")
    return HyCLoRAConfig(**{k: peft[k] for k in _PEFT_FIELDS if peft.get(k) is not None}, **settings)


def read_adapter_config(directory) -> tuple[dict, HyCLoRAConfig]:
    """(PEFT's adapter config, the HyC settings: from the side file, else from PEFT's fields)."""
    peft = read_peft_config(directory)
    hyc = hyc_config_from_peft(peft, directory)  # checks PEFT's side even where our side file has the settings
    if Path(directory, HYC_CONFIG).is_file():
        hyc = HyCLoRAConfig.from_any(json.loads(Path(directory, HYC_CONFIG).read_text()))
    return peft, hyc


def adapter_weights_path(directory) -> Path:
    """The adapter's safetensors file; a missing one (say a .bin-only adapter) is an error saying so."""
    path = Path(directory, ADAPTER_WEIGHTS)
    if not path.is_file():
        other = [p.name for p in Path(directory).glob("adapter_model.*")]
        hint = (f" (found {other}: only safetensors adapters are supported; convert it to safetensors, e.g. "
                "peft.PeftModel.from_pretrained(base, dir).save_pretrained(new_dir))") if other else ""
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {directory}{hint}")
    return path


def load_adapter_weights(model: nn.Module, directory) -> None:
    """Copy the adapter file's weights into the model's adapter parameters (LoRA and task heads); every one
    must be in the file with its shape, and the file must hold nothing else."""
    from safetensors.torch import load_file

    weights = load_file(adapter_weights_path(directory))
    params = lora_state_dict(model)
    trained = list(adapter_parameters(model).values())
    aliases = {PEFT_PREFIX + n: p for n, p in model.named_parameters(remove_duplicate=False)}
    for key in set(weights) - set(params):
        # PEFT also saves a head's tied weights: an alias of an adapter parameter (a masked-LM decoder's bias)
        # or an unchanged frozen one (its decoder weight, tied to the embeddings) carries nothing new
        p = aliases.get(key)
        if p is not None and (any(p is q for q in trained) or torch.equal(weights[key], p.detach().cpu())):
            del weights[key]
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


__all__ = ["ADAPTER_CONFIG", "ADAPTER_FILES", "ADAPTER_WEIGHTS", "HYC_CONFIG", "MODEL_CARD", "PEFT_FILES",
           "PEFT_PREFIX", "TRAINER_WEIGHTS", "adapter_weights_path", "hyc_config_from_peft", "is_adapter_dir", "lora_state_dict",
           "load_adapter_weights", "not_plain_lora", "push_adapter", "read_adapter_config", "read_peft_config",
           "save_adapter"]
