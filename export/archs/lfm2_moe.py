"""LFM2-MoE (LFM2-8B-A1B): LFM2's conv and attention layers; after the first num_dense_layers
dense FFNs, sparse experts with a sigmoid router whose choice is shifted by a per-expert bias
(the weights are not), renormalised top-k and a routed scaling factor; experts stored fused as
3-D tensors."""
from ..moe import MoEDecoder, Routing
from . import lfm2


class Model(MoEDecoder, lfm2.Model):
    model_type = "lfm2_moe"
    moe_prefix = "feed_forward."
    expert_names = ("experts.{e}.w1", "experts.{e}.w3", "experts.{e}.w2")

    def __init__(self, config: dict):
        super().__init__(config)
        c = config
        self.routing = Routing(self.routing.experts, self.routing.top_k, bool(c.get("norm_topk_prob", True)),
                               scoring="sigmoid", scale=float(c.get("routed_scaling_factor", 1.0)))
        self.dense_layers = set(range(c.get("num_dense_layers", 0)))

    def routing_for(self, i):
        bias = self.layer_prefix(i) + "feed_forward.expert_bias"
        if not self.config.get("use_expert_bias", True) or bias not in self.ckpt:
            return self.routing
        return Routing(**{**self.routing.__dict__, "bias": tuple(float(b) for b in self.ckpt.get(bias))})

