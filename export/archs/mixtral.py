"""Mixtral: Llama attention + top-k of the router logits, softmax over those k (= renormalised)."""
from ..moe import MoEDecoder, Routing


class Model(MoEDecoder):
    model_type = "mixtral"
    moe_prefix = "block_sparse_moe."
    expert_names = ("experts.{e}.w1", "experts.{e}.w3", "experts.{e}.w2")

    def __init__(self, config: dict):
        super().__init__(config)
        self.routing = Routing(self.routing.experts, self.routing.top_k, renormalize=True)
