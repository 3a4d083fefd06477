"""hyclora-models: LoRA fine-tuning with hybrid-compressed activations."""

from .compression import ALLOWED_BITS, CompressedTensor, compress

__version__ = "0.1.0"

__all__ = ["ALLOWED_BITS", "CompressedTensor", "compress", "__version__"]
