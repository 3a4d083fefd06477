from transformers import RobertaConfig


class HyCRobertaConfig(RobertaConfig):
    """A RobertaConfig (model_type ``hyc_roberta``) that also carries ``hyclora_config`` (see HyCLlamaConfig)."""

    model_type = "hyc_roberta"
