from transformers import LlamaConfig


class HyCLlamaConfig(LlamaConfig):
    """A LlamaConfig (model_type ``hyc_llama``) that also carries ``hyclora_config``: the HyCLoRAConfig as a
    dict (read it with ``hyclora_models.modeling_utils.hyclora_config_of``). No new dataclass field is
    declared, so this works with transformers' dataclass configs and its older keyword configs alike."""

    model_type = "hyc_llama"
