"""ERNIE-4.5-MoE (ERNIE-4.5-21B-A3B, -Thinking): Llama attention with interleaved rotary pairs,
softmax routing whose choice is shifted by a learned per-expert bias (moe_statics) and whose
top-k weights are renormalised by max(sum, moe_norm_min), always-on shared experts, and dense
layers outside [moe_layer_start_index, moe_layer_end_index] or off moe_layer_interval."""
from ..decoder import UnsupportedModel, swiglu_mlp
from ..moe import MoEDecoder, Routing


class Model(MoEDecoder):
    model_type = "ernie4_5_moe"
    rope_interleaved = True

    def __init__(self, config: dict):
        c = config
        super().__init__({**c, "num_experts": c["moe_num_experts"], "num_experts_per_tok": c["moe_k"]})
        if c.get("use_bias"):
            raise UnsupportedModel("ernie4_5_moe with use_bias is not supported")
        self.routing = Routing(self.routing.experts, self.routing.top_k, renormalize=True,
                               norm_min=float(c.get("moe_norm_min") or 0.0))
        end = c.get("moe_layer_end_index", -1)
        self.moe_layers = range(c.get("moe_layer_start_index", 0), self.n_layers if end in (None, -1) else end + 1)
        self.interval = c.get("moe_layer_interval") or 1

    def is_sparse(self, i):
        return i in self.moe_layers and (i + 1) % self.interval == 0

    def routing_for(self, i):
        pre = self.layer_prefix(i) + "mlp."
        for name in ("moe_statics.e_score_correction_bias", "gate.e_score_correction_bias"):
            if pre + name in self.ckpt:
                bias = self.ckpt.get(pre + name).reshape(-1)
                return Routing(**{**self.routing.__dict__, "bias": tuple(float(b) for b in bias)})
        return self.routing

    def shared_expert(self, g, i, x):
        pre = self.layer_prefix(i) + "mlp.shared_experts."
        if pre + "gate_proj.weight" not in self.ckpt:
            return None
        return swiglu_mlp(g, self.ckpt, x, pre, f"layers.{i}.shared_experts", self.recipe.bits, self.recipe.block_size)
