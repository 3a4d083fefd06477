from .configuration_hyc_mistral import HyCMistralConfig
from .modeling_hyc_mistral import HyCMistralDecoderLayer, HyCMistralForCausalLM

__all__ = ["HyCMistralConfig", "HyCMistralDecoderLayer", "HyCMistralForCausalLM"]
