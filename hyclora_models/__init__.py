"""hyclora-models: LoRA fine-tuning with hybrid-compressed activations."""

from transformers import AutoConfig, AutoModelForCausalLM

from .compression import ALLOWED_BITS, CompressedTensor, compress
from .config import HyCLoRAConfig
from .llama import HyCLlamaConfig, HyCLlamaForCausalLM
from .lora import LoRALinear
from .mistral import HyCMistralConfig, HyCMistralForCausalLM

__version__ = "0.1.0"

# Our own model_types (registering against transformers' native configs would be ignored);
# exist_ok makes re-imports safe.
for _config, _model in ((HyCLlamaConfig, HyCLlamaForCausalLM), (HyCMistralConfig, HyCMistralForCausalLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)

__all__ = ["ALLOWED_BITS", "CompressedTensor", "compress", "HyCLoRAConfig", "HyCLlamaConfig",
           "HyCLlamaForCausalLM", "HyCMistralConfig",
           "HyCMistralForCausalLM", "LoRALinear", "__version__"]
