"""Qwen3.5-MoE (35B-A3B): Qwen3.5's Gated DeltaNet and gated attention layers; every FFN is a
softmax top-k (renormalised) mixture of experts stored fused as 3-D tensors, plus a shared
expert scaled by its own sigmoid gate."""
from ..moe import MoEDecoder, Routing
from . import qwen2_moe, qwen3_5


class Model(MoEDecoder, qwen3_5.Model):
    model_type = "qwen3_5_moe"
    shared_expert = qwen2_moe.Model.shared_expert

    def __init__(self, config: dict):
        config = {**config, **(config.get("text_config") or {})}
        super().__init__(config)
        self.routing = Routing(self.routing.experts, self.routing.top_k, renormalize=True)

