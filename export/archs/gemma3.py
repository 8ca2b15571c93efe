"""Gemma 3 text (1B, 270M: `gemma3_text`; 4B, 12B, 27B: the text model of the multimodal `gemma3`
checkpoint, whose image tower is left out): RMSNorm scaled by (1 + w), four norms per layer (the
attention and FFN outputs are normed before the residual add), embeddings scaled by
sqrt(hidden), per-head q/k norm, attention scaled by query_pre_attn_scalar, GELU-tanh gate,
sliding-window local layers with their own rope theta between global layers (5:1), optional
attention and final logit soft-capping."""
import math

from .. import graph as G
from ..decoder import Decoder, UnsupportedModel


# Gemma3TextConfig's defaults: the multimodal checkpoints' text_config leaves some of them out
TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                     rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096)


class TextWeights:
    """A multimodal Gemma 3 checkpoint seen as its text model's (`model.*`, `lm_head.weight`)."""

    def __init__(self, ckpt):
        self.ckpt, self.config = ckpt, ckpt.config
        hub = "language_model.model.embed_tokens.weight" in ckpt      # the hub's names; transformers 5 writes the others
        self.prefix, self.head = ("language_model.model.", "language_model.lm_head.weight") if hub else (
            "model.language_model.", "lm_head.weight")

    def _name(self, name: str) -> str:
        return self.head if name == "lm_head.weight" else self.prefix + name.removeprefix("model.")

    def __contains__(self, name):
        return self._name(name) in self.ckpt

    def get(self, name):
        return self.ckpt.get(self._name(name))

    def rows(self, name):
        return self.ckpt.rows(self._name(name))

    def linear(self, *names):
        return self.ckpt.linear(*map(self._name, names))

    def release(self):
        self.ckpt.release()

    def shape(self, name):
        return self.ckpt.shape(self._name(name))


class Model(Decoder):
    model_type = "gemma3_text"
    qk_norm = "head"
    mlp_act = "gelu_tanh"
    norm_names = ("input_layernorm", "pre_feedforward_layernorm")

    def __init__(self, config: dict):
        if "text_config" in config:         # the multimodal checkpoint: its text model, tied as the whole model is
            config = {**TEXT_DEFAULTS, **config["text_config"], "tie_word_embeddings": config.get("tie_word_embeddings", True)}
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

    def build(self, g, ckpt, recipe, context, progress=lambda: None):
        return super().build(g, TextWeights(ckpt) if "text_config" in ckpt.config else ckpt, recipe, context, progress)

    def rope(self, params=None):
        return super().rope(self.global_rope if params is None else params)

    def window(self, i):
        return self.config["sliding_window"] if self.layer_types[i] == "sliding_attention" else 0

    def norm_weight(self, name):
        return super().norm_weight(name) + 1.0

    def attention_kind(self, g, i, io):
        io, options = super().attention_kind(g, i, io)
        if options.get("window"):        # local layers rotate with their own theta
            io = self.shared(g, "local", lambda: io.with_rope(
                *G.rope_cache(g, *self.rope_for(self.context, self.local_rope), dtype=io.dtype)))
        return io, options

    def attention(self, g, i, x, io):
        return G.rms_norm(g, super().attention(g, i, x, io), self.norm_weight(self.layer_prefix(i) + "post_attention_layernorm"),
                          self.eps, f"layers.{i}.post_attention_norm")

    def ffn(self, g, i, x):
        return G.rms_norm(g, super().ffn(g, i, x), self.norm_weight(self.layer_prefix(i) + "post_feedforward_layernorm"),
                          self.eps, f"layers.{i}.post_feedforward_norm")
