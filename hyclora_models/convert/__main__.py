"""python -m hyclora_models.convert {merge,export,import} ...: see --help of each. Errors: one line
``error: ...`` on stderr, exit status 1."""

from __future__ import annotations

import argparse

from safetensors import SafetensorError

from ..compression import ROUNDINGS
from ..config import MODES
from . import DTYPES, export_adapter, import_adapter, merge_adapter


def _group_size(value: str):
    return value if value == "channel" else int(value)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hyclora_models.convert",
                                description="Merge LoRA adapters into their base model, or convert adapter "
                                            "directories between hyclora-models and PEFT.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge an adapter into its base: a plain transformers checkpoint",
                       description="Merge a LoRA adapter (ours or PEFT's) into its base model's weights "
                                   "(W += scaling * B @ A; modules_to_save weights replace the base's) and write a "
                                   "checkpoint vanilla transformers loads: safetensors, config.json with the "
                                   "standard model_type, the base's tokenizer and generation files.")
    m.add_argument("--adapter", required=True, help="adapter directory")
    m.add_argument("--base", help="base model directory or Hub id (default: the adapter's base_model_name_or_path)")
    m.add_argument("--out", required=True, help="new output directory")
    m.add_argument("--dtype", choices=list(DTYPES), help="dtype of the written weights (default: the base's)")

    e = sub.add_parser("export", help="a hyclora-models adapter as a pure PEFT adapter",
                       description="Copy a hyclora-models adapter directory without its hyclora_config.json: "
                                   "adapter_config.json, adapter_model.safetensors, README.md.")
    e.add_argument("--adapter", required=True, help="hyclora-models adapter directory")
    e.add_argument("--out", required=True, help="new output directory")

    i = sub.add_parser("import", help="a PEFT LoRA adapter as a hyclora-models adapter",
                       description="Copy a PEFT LoRA adapter directory (safetensors) and add hyclora_config.json: "
                                   "its LoRA settings plus the compression settings given (defaults otherwise).")
    i.add_argument("--adapter", required=True, help="PEFT adapter directory")
    i.add_argument("--out", required=True, help="new output directory")
    i.add_argument("--bits", type=int, help="activation bits: 2, 4, 8 or 16 (exact)")
    i.add_argument("--outlier-ratio", type=float, help="share of channels kept exactly, in [0, 1]")
    i.add_argument("--group-size", type=_group_size, help="a power of two 16..1024, or 'channel'")
    i.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None, help="Hadamard rotation")
    i.add_argument("--rounding", choices=ROUNDINGS)
    i.add_argument("--mode", choices=MODES, help="speed, or memory (checkpointed layers)")
    return p


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    try:
        if args.command == "merge":
            out = merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype)
            print(f"merged {args.adapter} into its base model: {out}")
        elif args.command == "export":
            print(f"PEFT adapter: {export_adapter(args.adapter, args.out)}")
        else:
            names = ("bits", "outlier_ratio", "group_size", "rotate", "rounding", "mode")
            settings = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
            print(f"hyclora-models adapter: {import_adapter(args.adapter, args.out, **settings)}")
    except (OSError, ValueError, SafetensorError) as e:
        p.exit(1, f"error: {' '.join(str(e).split())}\n")


if __name__ == "__main__":
    main()
