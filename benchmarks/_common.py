"""Shared by the benchmark scripts: environment record and JSON results."""

from __future__ import annotations

import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def versions() -> dict:
    out = {}
    for name in ("torch", "triton", "transformers", "peft", "liger-kernel", "hyclora-models"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def commit() -> str:
    """The source commit: HYC_COMMIT where set (the GPU machine's copy of the tree may carry a stale .git),
    else git."""
    if os.environ.get("HYC_COMMIT"):
        return os.environ["HYC_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=RESULTS.parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    return dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                versions=versions(), commit=commit())


def write_records(name: str, records: list[dict], out_dir: str | None = None) -> Path:
    """Write records (each already carrying the environment fields) to results/<name>.json, and a copy to
    out_dir (e.g. $OUT on the GPU machine) when given."""
    text = json.dumps(records, indent=1) + "\n"
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if out_dir:
        Path(out_dir, f"{name}.json").write_text(text)
    return path
