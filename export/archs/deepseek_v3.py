"""DeepSeek-V3 / R1 layout: V2's latent attention; sigmoid expert scores whose choice is shifted
by a learned per-expert bias (the weights are not), restricted to the groups with the best
top-2 sums, renormalised and scaled."""
from __future__ import annotations

from ..moe import Routing
from . import deepseek_v2


class Model(deepseek_v2.Model):
    model_type = "deepseek_v3"

    def make_routing(self, c: dict) -> Routing:
        return Routing(self.routing.experts, self.routing.top_k, bool(c.get("norm_topk_prob", True)), scoring="sigmoid",
                       scale=float(c.get("routed_scaling_factor", 1.0)), groups=c.get("n_group") or 1,
                       top_groups=c.get("topk_group") or 1, group_score="top2", masked=float("-inf"))

    def routing_for(self, i: int) -> Routing:
        bias = self.layer_prefix(i) + "mlp.gate.e_score_correction_bias"
        r = self.routing
        if bias not in self.ckpt:
            return r
        return Routing(**{**r.__dict__, "bias": tuple(float(b) for b in self.ckpt.get(bias))})
