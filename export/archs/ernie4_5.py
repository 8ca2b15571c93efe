"""ERNIE-4.5 dense (ERNIE-4.5-0.3B): Llama with interleaved rotary pairs (2j, 2j+1) and an explicit head_dim."""
from ..decoder import Decoder, UnsupportedModel


class Model(Decoder):
    model_type = "ernie4_5"
    rope_interleaved = True

    def __init__(self, config: dict):
        super().__init__(config)
        if config.get("use_bias"):
            raise UnsupportedModel("ernie4_5 with use_bias is not supported")
