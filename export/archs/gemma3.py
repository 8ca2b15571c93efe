"""Gemma 3 text (1B, 270M; `gemma3_text`): RMSNorm scaled by (1 + w), four norms per layer (the
attention and FFN outputs are normed before the residual add), embeddings scaled by
sqrt(hidden), per-head q/k norm, attention scaled by query_pre_attn_scalar, GELU-tanh gate,
sliding-window local layers with their own rope theta between global layers (5:1), optional
attention and final logit soft-capping."""
import math

from .. import graph as G
from ..decoder import Decoder, UnsupportedModel
from ..graph import AttentionIO


class Model(Decoder):
    model_type = "gemma3_text"
    qk_norm = "head"
    mlp_act = "gelu_tanh"
    norm_names = ("input_layernorm", "pre_feedforward_layernorm")

    def __init__(self, config: dict):
        super().__init__(config)
        c = config
        act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise UnsupportedModel(f"gemma3 hidden_activation {act!r} is not supported (only gelu_pytorch_tanh)")
        if c.get("use_bidirectional_attention"):
            raise UnsupportedModel("gemma3 with bidirectional attention is not a decoder")
        self.embedding_multiplier = math.sqrt(self.hidden)
        self.attn_scale = c.get("query_pre_attn_scalar", self.head_dim) ** -0.5
        self.final_softcap = c.get("final_logit_softcapping") or 0.0
        pattern = c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or 6     # the hub's older key
        self.layer_types = c.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                                    for i in range(self.n_layers)]
        p = c.get("rope_parameters") or {}
        if "full_attention" in p:        # transformers >= 5 writes one set per layer type
            self.global_rope, self.local_rope = p["full_attention"], p.get("sliding_attention") or {}
        else:                            # the hub's configs: rope_theta (+ rope_scaling) and rope_local_base_freq
            self.global_rope = {**(c.get("rope_scaling") or {}), "rope_theta": c.get("rope_theta", 1e6)}
            self.local_rope = {"rope_type": "default", "rope_theta": c.get("rope_local_base_freq", 10000.0)}

    def rope(self, params=None):
        return super().rope(self.global_rope if params is None else params)

    def window(self, i):
        return self.config["sliding_window"] if self.layer_types[i] == "sliding_attention" else 0

    def norm_weight(self, name):
        return super().norm_weight(name) + 1.0

    def attention_kind(self, g, i, io):
        io, options = super().attention_kind(g, i, io)
        if options.get("window"):        # local layers rotate with their own theta
            io = self.shared(g, "local", lambda: AttentionIO(
                io.seqlens_k, io.total_len, *G.rope_cache(g, *self.rope_for(self.context, self.local_rope))))
        return io, options

    def attention(self, g, i, x, io):
        return G.rms_norm(g, super().attention(g, i, x, io), self.norm_weight(self.layer_prefix(i) + "post_attention_layernorm"),
                          self.eps, f"layers.{i}.post_attention_norm")

    def ffn(self, g, i, x):
        return G.rms_norm(g, super().ffn(g, i, x), self.norm_weight(self.layer_prefix(i) + "post_feedforward_layernorm"),
                          self.eps, f"layers.{i}.post_feedforward_norm")
