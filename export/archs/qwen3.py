"""Qwen3: Llama with an RMSNorm on each query and key head (before rotary) and an explicit
head_dim that need not equal hidden / heads."""
from ..decoder import Decoder


class Model(Decoder):
    model_type = "qwen3"
    qk_norm = "head"
