from transformers import MistralConfig


class HyCMistralConfig(MistralConfig):
    """A MistralConfig (model_type ``hyc_mistral``) that also carries ``hyclora_config`` (see HyCLlamaConfig)."""

    model_type = "hyc_mistral"
