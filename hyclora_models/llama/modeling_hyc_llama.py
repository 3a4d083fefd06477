"""HyCLlamaForCausalLM: transformers' Llama whose decoder layers train through the fused, compressed
layer of ``hyclora_models.decoder`` (METHOD.md), with LoRA on any subset of q/k/v/o/gate/up/down."""

from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from ..decoder import HyCCausalLMMixin, HyCDecoderLayerMixin
from ..modeling_utils import HyCPreTrainedMixin
from .configuration_hyc_llama import HyCLlamaConfig


class HyCLlamaDecoderLayer(HyCDecoderLayerMixin, LlamaDecoderLayer):
    pass


class HyCLlamaForCausalLM(HyCPreTrainedMixin, HyCCausalLMMixin, LlamaForCausalLM):
    config_class = HyCLlamaConfig
    config: HyCLlamaConfig
    base_model_type = "llama"
    layer_class = HyCLlamaDecoderLayer
