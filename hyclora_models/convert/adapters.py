"""Between our adapter directories and PEFT's: the weights and PEFT's config are the same files; ours add
``hyclora_config.json`` (the compression settings)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import adapter as A
from .merge import new_dir


def export_adapter(adapter, out) -> Path:
    """A HyC adapter directory as a pure PEFT one in the new directory ``out``: adapter_config.json, the
    safetensors weights and the model card, without our side file."""
    A.read_peft_config(adapter)
    A.adapter_weights_path(adapter)
    out = new_dir(out)
    _copy(adapter, out, A.PEFT_FILES)
    return out


def import_adapter(adapter, out, **settings) -> Path:
    """A PEFT LoRA adapter directory as a HyC one in the new directory ``out``: its files plus
    ``hyclora_config.json`` from PEFT's LoRA fields and ``settings`` (bits, outlier_ratio, group_size,
    rotate, rounding, mode; defaults: HyCLoRAConfig's), validated as HyCLoRAConfig does."""
    peft = A.read_peft_config(adapter)
    A.adapter_weights_path(adapter)
    config = A.hyc_config_from_peft(peft, adapter, **settings)
    out = new_dir(out)
    _copy(adapter, out, A.PEFT_FILES)
    (out / A.HYC_CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return out


def _copy(src, dst: Path, names) -> None:
    for name in names:
        if Path(src, name).is_file():
            shutil.copy2(Path(src, name), dst / name)
