"""Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen: Llama with biases on q, k and v."""
from ..decoder import Decoder


class Model(Decoder):
    model_type = "qwen2"

    def __init__(self, config: dict):
        super().__init__(config)
        self.qkv_bias = True
