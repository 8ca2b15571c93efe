"""Granite-MoE: Llama attention with its own scale, four multipliers (embedding, residual,
attention, logits), top-k router logits then softmax, experts stored fused as 3-D tensors."""
from ..moe import MoEDecoder, Routing


class Model(MoEDecoder):
    model_type = "granitemoe"
    moe_prefix = "block_sparse_moe."
    router_name = "router.layer.weight"

    def __init__(self, config: dict):
        super().__init__(config)
        self.routing = Routing(self.routing.experts, self.routing.top_k, renormalize=True)
        self.embedding_multiplier = config.get("embedding_multiplier", 1.0)
        self.residual_multiplier = config.get("residual_multiplier", 1.0)
        self.attn_scale = config.get("attention_multiplier", self.attn_scale)
        self.logits_divisor = config.get("logits_scaling", 1.0)

    def experts(self, i):
        pre = self.layer_prefix(i) + self.moe_prefix
        gate_up = self.ckpt.get(pre + "input_linear.weight")      # [E, 2F, H]: gate rows, then up rows
        down = self.ckpt.get(pre + "output_linear.weight")        # [E, H, F]
        f = gate_up.shape[1] // 2
        for e in range(self.routing.experts):
            yield gate_up[e, :f], gate_up[e, f:], down[e]
