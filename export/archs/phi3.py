"""Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv_proj and gate_up_proj, partial rotary (Phi-4-mini
rotates 0.75 of each head), LongRoPE, and a sliding window over all layers when configured.

LongRoPE has two sets of per-frequency factors; transformers picks the long set for a whole
forward pass once the sequence (cache + new tokens) is longer than
original_max_position_embeddings, the short set otherwise, and keys already cached keep the
rotation they were stored with. The graph does the same at run time: both tables are stored
and `Where(total_sequence_length > original, long, short)` picks one per step (when the
exported context never passes the switch, only the short table is stored). Not matched:
transformers' generate() re-encoding the whole sequence once it passes the switch, and a long
prompt prefilled in chunks (earlier chunks keep the short rotation); see README.
"""
import numpy as np

from .. import graph as G
from ..decoder import Decoder, swiglu_mlp
from ..graph import AttentionIO


class Model(Decoder):
    model_type = "phi3"

    def __init__(self, config: dict):
        super().__init__(config)
        p = config.get("rope_parameters") or config.get("rope_scaling") or {}
        self.longrope = p if p.get("rope_type", p.get("type")) in ("longrope", "su") else None
        if self.longrope:
            self.switch = p.get("original_max_position_embeddings") or config["original_max_position_embeddings"]

    def qkv_weights(self, i):
        w = self.ckpt.get(self.layer_prefix(i) + "self_attn.qkv_proj.weight")
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [w[:q], w[q : q + kv], w[q + kv :]], None

    def window(self, i):
        w = self.config.get("sliding_window") or 0
        return w if w < self.context else 0

    def attention_kind(self, g, i, io):
        io, options = super().attention_kind(g, i, io)
        if self.longrope and self.context > self.switch:
            io = self.shared(g, "longrope", lambda: self._switched(g, io))
        return io, options

    def _switched(self, g, short: AttentionIO) -> AttentionIO:
        long_cos, long_sin = G.rope_cache(g, *self.rope_for(self.context, {**self.longrope,
                                                                            "short_factor": self.longrope["long_factor"]}),
                                      dtype=short.dtype)
        past = g.op("Greater", [short.total_len, g.const("rope.switch", np.array(self.switch, np.int32))], "rope.long")
        return short.with_rope(g.op("Where", [past, long_cos, short.cos], "rope.cos_now"),
                               g.op("Where", [past, long_sin, short.sin], "rope.sin_now"))

    def extra_manifest(self):
        # the length past which the long factors apply (for a runtime that re-encodes there, as generate() does)
        return {"longrope_switch": self.switch} if self.longrope and self.context > self.switch else {}

    def ffn(self, g, i, x):
        return swiglu_mlp(g, self.ckpt, x, self.layer_prefix(i) + "mlp.", f"layers.{i}.mlp", self.recipe.bits,
                          self.recipe.block_size, names=("gate_up_proj", None, "down_proj"))
