"""Merge a LoRA adapter (ours or PEFT's) into its base model: a plain transformers checkpoint.

Works on state dicts, so on any architecture: each base weight W an adapter targets becomes
W + scaling * B @ A (scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; PEFT's
rank_pattern / alpha_pattern honoured), computed in fp32. The adapter's other weights (PEFT's
``modules_to_save``, e.g. a classifier head, and trained biases) replace the base's, or are added where
the base has none. The base's safetensors shards are read and written one at a time, with the same names.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .. import adapter as A
from ..config import lora_scaling
from ..lora import is_lora_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
# copied from the base as they are: tokenizer and generation files
COPIED = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
          "chat_template*", "generation_config.json")
# what merge reads of a Hub base (it never loads .bin weights)
_HUB_PATTERNS = ["config.json", "model*.safetensors", INDEX, *COPIED]
# LoRA options whose weights are not W + scaling * B @ A on the module's own weight
_UNMERGEABLE = ("use_dora", "lora_bias", "fan_in_fan_out", "trainable_token_indices", "layer_replication",
                "target_parameters")
_HYC = "hyc_"  # our model_types are "hyc_" + the standard one, our classes "HyC" + the standard name


def merge_adapter(adapter, out, base=None, dtype: str | None = None) -> Path:
    """Write ``adapter`` merged into ``base`` (a directory or Hub id; default: the adapter's
    ``base_model_name_or_path``) to the new directory ``out``: safetensors weights, config.json with the
    standard model_type, and the base's tokenizer / generation files. ``dtype``: one of ``DTYPES`` for every
    floating weight; default: each weight keeps the base's dtype."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    adapter = Path(adapter)
    peft = A.read_peft_config(adapter)
    bad = [k for k in _UNMERGEABLE if peft.get(k)]
    if bad:
        raise ValueError(f"{adapter / A.ADAPTER_CONFIG}: {', '.join(bad)} set; merge supports plain LoRA on linear "
                         "layers (with modules_to_save, rank_pattern, alpha_pattern)")
    deltas, others = _split_adapter(load_file(A.adapter_weights_path(adapter)), peft, adapter)
    base_dir = _base_dir(base or peft.get("base_model_name_or_path"), adapter)
    shards, shapes = _base_layout(base_dir)
    _check_fits(deltas, others, shapes, adapter, base_dir)
    out = new_dir(out)

    cast = DTYPES.get(dtype)

    def out_dtype(t: torch.Tensor) -> torch.dtype:
        return cast if cast is not None and t.is_floating_point() else t.dtype

    extra = [k for k in others if k not in shapes]  # weights the base lacks (a new task head): in the last shard
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        sd = load_file(base_dir / shard)
        for key, t in sd.items():
            if key in deltas:
                a, b, s = deltas[key]
                sd[key] = (t.float() + s * (b.float() @ a.float())).to(out_dtype(t))
            else:
                sd[key] = others.get(key, t).to(out_dtype(t))
        if i == len(shards) - 1:
            sd.update({k: others[k].to(out_dtype(others[k])) for k in extra})
        save_file({k: t.contiguous() for k, t in sd.items()}, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(sd, shard))
        total += sum(t.numel() * t.element_size() for t in sd.values())
    if (base_dir / INDEX).is_file():
        index = json.loads((base_dir / INDEX).read_text())
        index["metadata"] = {**index.get("metadata", {}), "total_size": total}
        index["weight_map"] = dict(sorted(weight_map.items()))
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    config = standard_config(json.loads((base_dir / "config.json").read_text()), dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for pattern in COPIED:
        for path in base_dir.glob(pattern):
            if path.is_file():
                shutil.copy2(path, out / path.name)
    return out


def new_dir(path) -> Path:
    """``path`` as a new (or empty) directory: converters never write over an existing one."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"output {path} exists and is not an empty directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def standard_config(config: dict, dtype: str | None = None) -> dict:
    """A base config.json as vanilla transformers reads it: one of ours (model_type "hyc_llama"...) maps
    back to the standard model_type and class names, without our ``hyclora_config`` entry."""
    config = dict(config)
    if config.get("model_type", "").startswith(_HYC):
        config["model_type"] = config["model_type"][len(_HYC):]
        config["architectures"] = [a.removeprefix("HyC") for a in config.get("architectures") or []]
    config.pop("hyclora_config", None)
    if dtype is not None:
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
    return config


def _split_adapter(weights: dict, peft: dict, adapter: Path):
    """({base weight key: (A, B, scaling)}, {base key: tensor} of the adapter's non-LoRA weights)."""
    pairs, others = {}, {}
    for key, tensor in weights.items():
        if not key.startswith(A.PEFT_PREFIX):
            raise ValueError(f"adapter {adapter}: weight {key!r} lacks PEFT's {A.PEFT_PREFIX!r} prefix")
        name = key[len(A.PEFT_PREFIX):]
        module, _, leaf = name.rpartition(".lora_")
        if not module:
            others[name] = tensor
        elif leaf in ("A.weight", "B.weight"):
            pairs.setdefault(module, {})[leaf[0]] = tensor
        else:
            raise ValueError(f"adapter {adapter}: cannot merge {key!r} (only lora_A / lora_B of linear layers)")
    deltas = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter {adapter}: {module} has lora_{next(iter(ab))} but not its pair")
        deltas[f"{module}.weight"] = (ab["A"], ab["B"], _scaling(peft, module, ab["A"].shape[0], adapter))
    return deltas, others


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern that matches the end of the module
    name at a dot boundary (peft.utils.other.get_pattern_key)."""
    return next((v for p, v in patterns.items() if re.match(rf"(.*\.)?({p})$", module)), default)


def _scaling(peft: dict, module: str, rank: int, adapter: Path) -> float:
    r = _pattern_value(peft.get("rank_pattern") or {}, module, peft.get("r", 8))  # PEFT's defaults
    if r != rank:
        raise ValueError(f"adapter {adapter}: {module}.lora_A has rank {rank}, its config says r={r}")
    alpha = _pattern_value(peft.get("alpha_pattern") or {}, module, peft.get("lora_alpha", 8))
    return lora_scaling(alpha, r, bool(peft.get("use_rslora")))


def _base_dir(base, adapter: Path) -> Path:
    """The base model's directory: ``base`` itself, or a snapshot of the Hub repo of that name."""
    if not base:
        raise ValueError(f"adapter {adapter} names no base_model_name_or_path; pass --base")
    if Path(base).is_dir():
        return Path(base)
    if Path(base).exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(base)):
        raise FileNotFoundError(f"base model {base}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(base), allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, no such repo, gated...
        raise FileNotFoundError(f"base model {base}: no such directory, and fetching it from the Hub failed "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def _base_layout(base_dir: Path):
    """([shard file names], {key: shape}) of the base's safetensors weights, from the headers alone."""
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in base model {base_dir}")
    if (base_dir / INDEX).is_file():
        names = sorted(set(json.loads((base_dir / INDEX).read_text())["weight_map"].values()))
    elif (base_dir / WEIGHTS).is_file():
        names = [WEIGHTS]
    else:
        raise FileNotFoundError(f"no {WEIGHTS} or {INDEX} in base model {base_dir} (merge reads safetensors only)")
    shapes = {}
    for name in names:
        with safe_open(base_dir / name, "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return names, shapes


def _check_fits(deltas: dict, others: dict, shapes: dict, adapter: Path, base_dir: Path) -> None:
    """Every LoRA target is a base weight of B @ A's shape; every other adapter weight the base holds has its
    shape; the base holds no LoRA weights of its own."""
    lora_in_base = [k for k in shapes if is_lora_name(k)]
    if lora_in_base:
        raise ValueError(f"base model {base_dir} holds LoRA weights ({lora_in_base[0]}...); merge needs the plain base")
    for key, (a, b, _) in deltas.items():
        want = (b.shape[0], a.shape[1])
        if key not in shapes:
            raise ValueError(f"adapter {adapter} does not fit base model {base_dir}: the base has no {key}")
        if shapes[key] != want or b.shape[1] != a.shape[0]:
            raise ValueError(f"adapter {adapter} does not fit base model {base_dir}: {key} has shape {shapes[key]}, "
                             f"lora_B @ lora_A gives {tuple(b.shape)} @ {tuple(a.shape)} (another base model?)")
    for key, tensor in others.items():
        if key in shapes and shapes[key] != tuple(tensor.shape):
            raise ValueError(f"adapter {adapter} does not fit base model {base_dir}: {key} has shape {shapes[key]}, "
                             f"the adapter's has {tuple(tensor.shape)} (another base model?)")
