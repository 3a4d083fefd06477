"""HyCLlamaForCausalLM: transformers' Llama with LoRA adapters whose activations are kept compressed.

This slice: the LoRA projections (any subset of q/k/v/o/gate/up/down) keep their input compressed and
x A exactly. The fused decoder layer of METHOD.md (norm inputs with outliers, q/k/v/gate/up base outputs,
recomputed norms/SwiGLU/RoPE, attention backward from the logsumexp) is the next step.
"""

from transformers import LlamaForCausalLM

from ..lora import inject_lora
from ..modeling_utils import HyCPreTrainedMixin, hyclora_config_of
from .configuration_hyc_llama import HyCLlamaConfig


class HyCLlamaForCausalLM(HyCPreTrainedMixin, LlamaForCausalLM):
    config_class = HyCLlamaConfig
    config: HyCLlamaConfig
    base_model_type = "llama"

    def __init__(self, config: HyCLlamaConfig):
        super().__init__(config)
        inject_lora(self, hyclora_config_of(config))
