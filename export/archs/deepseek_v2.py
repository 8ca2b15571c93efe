"""DeepSeek-V2 (and V2-Lite): multi-head latent attention + softmax routing over many small
experts (optionally group-limited), scaled, plus always-on shared experts.

MLA is rebuilt for GroupQueryAttention, which rotates pairs (j, j + D/2) of a D-wide head:
each head is laid out as [nope_a | rope_first | nope_b | rope_second] (a fixed permutation of
the query rows and key features, so q.k is unchanged) and the rotary tables give the nope
pairs angle 0. Keys get the shared rotary part broadcast to every head; values are zero-padded
to D and cut back after attention. The KV cache therefore holds full keys and values, not
MLA's compressed latent: correct, but without MLA's memory saving.
"""
from __future__ import annotations

import numpy as np

from .. import graph as G
from ..decoder import UnsupportedModel, swiglu_mlp
from ..moe import MoEDecoder, Routing


class Model(MoEDecoder):
    model_type = "deepseek_v2"

    def __init__(self, config: dict):
        super().__init__(config)
        c = config
        self.nope, self.rot, self.v_dim = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        self.q_lora, self.kv_lora = c.get("q_lora_rank"), c["kv_lora_rank"]
        self.interleaved = c.get("rope_interleave", True)
        width = self.nope + self.rot
        if width % 16 or self.nope % 2 or self.rot % 2 or self.v_dim > width:
            raise UnsupportedModel(f"MLA head sizes nope {self.nope} + rope {self.rot}, value {self.v_dim} are not supported")
        self.head_dim = self.rot                       # the rotary tables span the rotary part (as in transformers)
        self.padded_head_dim, self.kv_heads = width, self.heads
        self.attn_scale = width ** -0.5
        p = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if p.get("rope_type", p.get("type", "default")) != "default" and p.get("mscale_all_dim"):
            m = 0.1 * p["mscale_all_dim"] * np.log(p["factor"]) + 1.0 if p["factor"] > 1 else 1.0
            self.attn_scale *= m * m
        self.dense_layers = set(range(c.get("first_k_dense_replace", 0)))
        self.routing = self.make_routing(c)

    def make_routing(self, c: dict) -> Routing:
        grouped = c.get("topk_method") == "group_limited_greedy"
        return Routing(self.routing.experts, self.routing.top_k, bool(c.get("norm_topk_prob", False)),
                       scale=float(c.get("routed_scaling_factor", 1.0)), groups=c["n_group"] if grouped else 1,
                       top_groups=c.get("topk_group") or 1, group_score="max", masked=0.0)

    def rope_for(self, context: int):
        inv, att = self.rope()      # nope pairs do not rotate, and yarn's factor scales only the rotary part
        return (np.concatenate([np.zeros(self.nope // 2), inv]), context,
                np.concatenate([np.ones(self.nope // 2), np.full(self.rot // 2, att)]))

    def _rot_order(self) -> np.ndarray:
        """Rotary features reordered to [first of each pair..., second of each pair...]."""
        r = np.arange(self.rot)
        return np.concatenate([r[0::2], r[1::2]]) if self.interleaved else r

    def _query_rows(self, w: np.ndarray) -> np.ndarray:
        n, h = self.nope, self.nope // 2
        per_head = np.concatenate([np.arange(h), n + self._rot_order()[: self.rot // 2], np.arange(h, n),
                                   n + self._rot_order()[self.rot // 2:]])
        rows = (np.arange(self.heads)[:, None] * (n + self.rot) + per_head[None]).reshape(-1)
        return w[rows]

    def attention(self, g, i, x, io):
        pre, name = self.layer_prefix(i) + "self_attn.", f"layers.{i}.attn"
        get, bits, bs = self.ckpt.get, self.recipe.bits, self.recipe.block_size

        def bias(n):
            return get(pre + n + ".bias") if pre + n + ".bias" in self.ckpt else None
        if self.q_lora:
            q = G.linear(g, x, get(pre + "q_a_proj.weight"), name + ".q_a", bits, bs, bias("q_a_proj"))
            q = G.rms_norm(g, q, get(pre + "q_a_layernorm.weight"), self.eps, name + ".q_a_norm")
            q = G.linear(g, q, self._query_rows(get(pre + "q_b_proj.weight")), name + ".q", bits, bs)
        else:
            q = G.linear(g, x, self._query_rows(get(pre + "q_proj.weight")), name + ".q", bits, bs)
        kv_a = get(pre + "kv_a_proj_with_mqa.weight")
        kv_a_bias = bias("kv_a_proj_with_mqa")
        order = np.concatenate([np.arange(self.kv_lora), self.kv_lora + self._rot_order()])
        kv_a = G.linear(g, x, kv_a[order], name + ".kv_a", bits, bs, kv_a_bias[order] if kv_a_bias is not None else None)
        half = self.rot // 2
        latent, rot1, rot2 = g.op("Split", [kv_a, g.const(name + ".kv_split", np.array([self.kv_lora, half, half], np.int64))],
                                  name + ".kv_split", outputs=3, axis=-1)
        latent = G.rms_norm(g, latent, get(pre + "kv_a_layernorm.weight"), self.eps, name + ".kv_a_norm")
        kv = G.linear(g, latent, get(pre + "kv_b_proj.weight"), name + ".kv_b", bits, bs)
        heads4 = g.const(name + ".heads4", np.array([0, 0, self.heads, -1], np.int64))
        kv = g.op("Reshape", [kv, heads4], name + ".kv_heads")
        k1, k2, v = g.op("Split", [kv, g.const(name + ".kvb_split", np.array([self.nope // 2, self.nope // 2, self.v_dim],
                                                                          np.int64))], name + ".kvb_split", outputs=3, axis=-1)
        expand = g.const(name + ".expand", np.array([1, 1, self.heads, 1], np.int64))
        axis = g.const(name + ".axis2", np.array([2], np.int64))
        r1, r2 = (g.op("Expand", [g.op("Unsqueeze", [r, axis], f"{name}.rot{j}_1h"), expand], f"{name}.rot{j}_heads")
                  for j, r in ((1, rot1), (2, rot2)))
        k = g.op("Concat", [k1, r1, k2, r2], name + ".k_heads", axis=-1)
        width = self.padded_head_dim
        if self.v_dim < width:
            v = g.op("Pad", [v, g.const(name + ".vpad", np.array([0, 0, 0, 0, 0, 0, 0, width - self.v_dim], np.int64))],
                     name + ".v_pad")
        flat = g.const(name + ".flat", np.array([0, 0, -1], np.int64))
        k, v = g.op("Reshape", [k, flat], name + ".k"), g.op("Reshape", [v, flat], name + ".v")
        out = self.attend(g, i, q, k, v, io, self.heads, name)
        if self.v_dim < width:
            out = g.op("Slice", [g.op("Reshape", [out, heads4], name + ".out_heads"), g.const(name + ".s0", np.array([0], np.int64)),
                                 g.const(name + ".s1", np.array([self.v_dim], np.int64)),
                                 g.const(name + ".s2", np.array([-1], np.int64))], name + ".out_v")
            out = g.op("Reshape", [out, flat], name + ".out")
        return G.linear(g, out, get(pre + "o_proj.weight"), name + ".o_proj", bits, bs, bias("o_proj"))

    def shared_expert(self, g, i, x):
        pre = self.layer_prefix(i) + "mlp.shared_experts."
        if pre + "gate_proj.weight" not in self.ckpt:
            return None
        return swiglu_mlp(g, self.ckpt, x, pre, f"layers.{i}.shared_experts", self.recipe.bits, self.recipe.block_size)
