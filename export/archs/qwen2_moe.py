"""Qwen2-MoE: Qwen2 attention (q/k/v bias) + softmax top-k experts (not renormalised by default)
+ a shared expert scaled by its own sigmoid gate."""
import numpy as np

from ..decoder import swiglu_mlp
from ..moe import MoEDecoder


class Model(MoEDecoder):
    model_type = "qwen2_moe"

    def __init__(self, config: dict):
        super().__init__(config)
        self.qkv_bias = True

    def shared_expert(self, g, i, x):
        pre, name = self.layer_prefix(i) + "mlp.", f"layers.{i}.shared_expert"
        if pre + "shared_expert.gate_proj.weight" not in self.ckpt:
            return None
        y = swiglu_mlp(g, self.ckpt, x, pre + "shared_expert.", name, self.recipe.bits, self.recipe.block_size)
        gate_w = np.ascontiguousarray(self.ckpt.get(pre + "shared_expert_gate.weight").T)     # [H, 1], fp32
        gate = g.op("Sigmoid", [g.op("MatMul", [x, g.const(name + ".gate_t", gate_w)], name + ".gate")], name + ".sigmoid")
        return g.op("Mul", [y, gate], name + ".gated")
