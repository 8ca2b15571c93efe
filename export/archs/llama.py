"""Llama (Llama-2/3, R1-Distill-Llama, TinyLlama, stories260K): the base decoder as is."""
from ..decoder import Decoder, UnsupportedModel


class Model(Decoder):
    model_type = "llama"

    def __init__(self, config: dict):
        super().__init__(config)
        if config.get("mlp_bias"):
            raise UnsupportedModel("llama with mlp_bias is not supported")
