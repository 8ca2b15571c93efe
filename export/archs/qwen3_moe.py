"""Qwen3-MoE: Qwen3 attention (per-head q/k norm) + softmax top-k experts, renormalised when
norm_topk_prob is set."""
from ..moe import MoEDecoder


class Model(MoEDecoder):
    model_type = "qwen3_moe"
    qk_norm = "head"
