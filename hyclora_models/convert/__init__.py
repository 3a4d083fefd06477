"""Adapter conversions, as functions and as ``python -m hyclora_models.convert`` (merge / export / import):

- ``merge_adapter``: an adapter (ours or PEFT's) merged into its base: a plain transformers checkpoint;
- ``export_adapter``: our adapter directory as a pure PEFT one;
- ``import_adapter``: a PEFT LoRA adapter directory as ours (with compression settings).
"""

from .adapters import export_adapter, import_adapter
from .merge import DTYPES, merge_adapter

__all__ = ["DTYPES", "export_adapter", "import_adapter", "merge_adapter"]
