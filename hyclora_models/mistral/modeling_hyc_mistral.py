"""HyCMistralForCausalLM: Llama's fused layer; what differs is Mistral's sliding window, which its
attention passes to the attention function (and its model folds into the mask)."""

from transformers import MistralForCausalLM
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

from ..decoder import HyCCausalLMMixin, HyCDecoderLayerMixin
from ..modeling_utils import HyCPreTrainedMixin
from .configuration_hyc_mistral import HyCMistralConfig


class HyCMistralDecoderLayer(HyCDecoderLayerMixin, MistralDecoderLayer):
    def extra_attention_kwargs(self) -> dict:
        return {"sliding_window": getattr(self.self_attn.config, "sliding_window", None)}


class HyCMistralForCausalLM(HyCPreTrainedMixin, HyCCausalLMMixin, MistralForCausalLM):
    config_class = HyCMistralConfig
    config: HyCMistralConfig
    base_model_type = "mistral"
    layer_class = HyCMistralDecoderLayer
