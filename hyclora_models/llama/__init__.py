from .configuration_hyc_llama import HyCLlamaConfig
from .modeling_hyc_llama import HyCLlamaDecoderLayer, HyCLlamaForCausalLM

__all__ = ["HyCLlamaConfig", "HyCLlamaDecoderLayer", "HyCLlamaForCausalLM"]
