"""HyC RoBERTa: transformers' RoBERTa whose encoder layers train through the fused, compressed post-LN layer
of ``hyclora_models.encoder`` (METHOD.md), with LoRA on any of query/key/value/dense. LoRA targets default to
PEFT's choice for RoBERTa (query, value); a target matches by name suffix as in PEFT, so ``dense`` means the
three dense layers of each encoder layer (and the pooler's, where there is one), never the task head's,
which trains whole and is saved with the adapter (PEFT's modules_to_save)."""

from transformers import RobertaForMaskedLM, RobertaForSequenceClassification, RobertaModel
from transformers.models.roberta.modeling_roberta import RobertaLayer

from ..encoder import HyCEncoderLayerMixin
from ..modeling_utils import HyCPreTrainedMixin
from .configuration_hyc_roberta import HyCRobertaConfig


class HyCRobertaLayer(HyCEncoderLayerMixin, RobertaLayer):
    pass


class _HyCRoberta(HyCPreTrainedMixin):
    config_class = HyCRobertaConfig
    base_model_type = "roberta"
    layer_class = HyCRobertaLayer
    layers_path = "roberta.encoder.layer"
    default_target_modules = ("query", "value")


class HyCRobertaModel(_HyCRoberta, RobertaModel):
    config: HyCRobertaConfig
    layers_path = "encoder.layer"
    peft_task_type = "FEATURE_EXTRACTION"


class HyCRobertaForSequenceClassification(_HyCRoberta, RobertaForSequenceClassification):
    config: HyCRobertaConfig
    peft_task_type = "SEQ_CLS"
    trainable_modules = ("classifier",)


class HyCRobertaForMaskedLM(_HyCRoberta, RobertaForMaskedLM):
    """The LM head's dense layer, LayerNorm and bias train; its decoder weight, tied to the word
    embeddings, stays frozen with them."""

    config: HyCRobertaConfig
    peft_task_type = None  # PEFT has no masked-LM task type
    trainable_modules = ("lm_head",)
