from .configuration_hyc_roberta import HyCRobertaConfig
from .modeling_hyc_roberta import (HyCRobertaForMaskedLM, HyCRobertaForSequenceClassification, HyCRobertaLayer,
                                   HyCRobertaModel)

__all__ = ["HyCRobertaConfig", "HyCRobertaForMaskedLM", "HyCRobertaForSequenceClassification", "HyCRobertaLayer",
           "HyCRobertaModel"]
