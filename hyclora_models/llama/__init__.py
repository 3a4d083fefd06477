from .configuration_hyc_llama import HyCLlamaConfig
from .modeling_hyc_llama import HyCLlamaForCausalLM

__all__ = ["HyCLlamaConfig", "HyCLlamaForCausalLM"]
