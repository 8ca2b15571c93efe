"""LFM2 / LFM2.5 (Liquid): gated short-convolution blocks with a few GQA layers among them.

A conv layer: in_proj -> (B, C, x); y = out_proj(C * conv(B * x)), the conv depthwise and causal
over the last `conv_L_cache` (3) positions, its state the previous 2 inputs of each channel.
Attention layers: Llama's GQA with a per-head RMSNorm on q and k. The FFN is SwiGLU (w1, w3, w2);
the final norm is called embedding_norm."""
import numpy as np

from .. import graph as G
from ..decoder import Decoder, UnsupportedModel, swiglu_mlp


class Model(Decoder):
    model_type = "lfm2"
    qk_norm = "head"
    norm_names, final_norm = ("operator_norm", "ffn_norm"), "model.embedding_norm"
    o_proj, qk_norm_names = "out_proj", ("q_layernorm", "k_layernorm")

    def __init__(self, config: dict):
        config = {**config, "rms_norm_eps": config.get("norm_eps", 1e-5)}
        super().__init__(config)
        c = config
        n = self.n_layers
        types = c.get("layer_types")
        if types is None:
            full = c.get("full_attn_idxs")
            types = ["full_attention" if full is None or i in full else "conv" for i in range(n)]
        if len(types) != n or set(types) - {"full_attention", "conv"}:
            raise UnsupportedModel(f"layer_types must list 'conv' or 'full_attention' for each of the {n} layers")
        self.layer_types = types
        self.conv_kernel = int(c.get("conv_L_cache", 3))
        if self.conv_kernel < 2:
            raise UnsupportedModel(f"conv_L_cache {self.conv_kernel} is not supported (at least 2)")
        self.tied = bool(c.get("tie_word_embeddings", c.get("tie_embedding", True)))
        ffn = int(c.get("block_ff_dim", c.get("intermediate_size") or 0))      # (the export reads the weights' shapes;
        if c.get("block_auto_adjust_ff_dim", True):                              #  synthetic shapes need the rule)
            ffn = int(float(c.get("block_ffn_dim_multiplier") or 1.0) * int(2 * ffn / 3))
            ffn = c.get("block_multiple_of", 256) * -(-ffn // c.get("block_multiple_of", 256))
        self.ffn_dim = ffn

    def is_attention(self, i: int) -> bool:
        return self.layer_types[i] == "full_attention"

    def recurrent(self, g, i, x):
        pre, name = self.layer_prefix(i) + "conv.", f"layers.{i}.conv"
        get, bits, bs = self.ckpt.get, self.recipe.bits, self.recipe.block_size
        bias = lambda key: get(key) if key in self.ckpt else None      # noqa: E731 (conv_bias configs)
        h = self.hidden
        bcx = G.linear(g, x, get(pre + "in_proj.weight"), name + ".in_proj", bits, bs, bias(pre + "in_proj.bias"))
        b, c, xx = g.op("Split", [bcx, g.const(name + ".split", np.array([h, h, h], np.int64))], name + ".split",
                        outputs=3, axis=-1)
        state, layouts = self.conv_state(g, i, self.conv_kernel, h)
        conv = (g.op("Mul", [b, xx], name + ".bx"), state,
                get(pre + "conv.weight").reshape(h, -1), bias(pre + "conv.bias"), name + ".conv")
        y, y_state = G.either(g, name + ".conv", lambda: G.causal_conv(g, *conv), lambda: G.causal_conv_fused(g, *conv))
        self.state_out(g, y_state, i, "conv", *layouts)
        y = g.op("Mul", [c, y], name + ".gated")
        return G.linear(g, y, get(pre + "out_proj.weight"), name + ".out_proj", bits, bs, bias(pre + "out_proj.bias"))

    def ffn(self, g, i, x):
        return swiglu_mlp(g, self.ckpt, x, self.layer_prefix(i) + "feed_forward.", f"layers.{i}.mlp", self.recipe.bits,
                          self.recipe.block_size, names=("w1", "w3", "w2"))
