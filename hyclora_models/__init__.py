"""hyclora-models: LoRA fine-tuning with hybrid-compressed activations."""

from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM,
                          AutoModelForSequenceClassification)

from .compression import ALLOWED_BITS, AUTO_CLIP, CompressedTensor, compress
from .config import HyCLoRAConfig
from .llama import HyCLlamaConfig, HyCLlamaForCausalLM
from .lora import LoRALinear
from .mistral import HyCMistralConfig, HyCMistralForCausalLM
from .roberta import HyCRobertaConfig, HyCRobertaForMaskedLM, HyCRobertaForSequenceClassification, HyCRobertaModel

__version__ = "0.1.0"

# Our own model_types (registering against transformers' native configs would be ignored);
# exist_ok makes re-imports safe.
for _auto, _config, _model in (
        (AutoModelForCausalLM, HyCLlamaConfig, HyCLlamaForCausalLM),
        (AutoModelForCausalLM, HyCMistralConfig, HyCMistralForCausalLM),
        (AutoModel, HyCRobertaConfig, HyCRobertaModel),
        (AutoModelForSequenceClassification, HyCRobertaConfig, HyCRobertaForSequenceClassification),
        (AutoModelForMaskedLM, HyCRobertaConfig, HyCRobertaForMaskedLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    _auto.register(_config, _model, exist_ok=True)

__all__ = ["ALLOWED_BITS", "AUTO_CLIP", "CompressedTensor", "compress", "HyCLoRAConfig", "HyCLlamaConfig",
           "HyCLlamaForCausalLM", "HyCMistralConfig",
           "HyCMistralForCausalLM", "HyCRobertaConfig", "HyCRobertaForMaskedLM", "HyCRobertaForSequenceClassification",
           "HyCRobertaModel", "LoRALinear", "__version__"]
