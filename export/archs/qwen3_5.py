"""Qwen3.5 (dense): three Gated DeltaNet layers to one attention layer.

Gated DeltaNet: one projection gives q, k, v (through a causal depthwise conv of kernel 4 + SiLU,
whose state is the previous 3 inputs) and the output gate z; two small fp32 projections give
beta = sigmoid(b) and the decay exp(-exp(A_log) softplus(a + dt_bias)) per value head. q and k are
L2-normalised (q also scaled by dk^-0.5), the delta rule updates a [heads, dk, dv] state per token
(`graph.gated_delta_rule`), and the output is RMSNorm(o) * w * silu(z) per head.
Attention: q_proj gives each head's query and an output gate (o * sigmoid(gate)), per-head q/k
RMSNorm, rotary on the first quarter of each head (partial_rotary_factor 0.25), which is
permuted to GroupQueryAttention's half-split layout with angle 0 on the rest.
Norms are zero-centred: the weight w stands for 1 + w. A checkpoint of the multimodal model keeps
the text settings under text_config and the weights under model.language_model."""
import numpy as np

from .. import graph as G
from ..decoder import Decoder, UnsupportedModel


class LanguageModel:
    """The checkpoint seen with model.language_model.* as model.* (Qwen3.5's multimodal layout)."""

    def __init__(self, ckpt, prefix="model.language_model."):
        self._ckpt, self._prefix = ckpt, prefix

    def _name(self, name):
        return self._prefix + name[len("model."):] if name.startswith("model.") else name

    def __contains__(self, name):
        return self._name(name) in self._ckpt

    def __getattr__(self, attr):                       # config, names, dir, ...
        return getattr(self._ckpt, attr)

    def get(self, name):
        return self._ckpt.get(self._name(name))

    def rows(self, name):
        return self._ckpt.rows(self._name(name))

    def linear(self, *names):
        return self._ckpt.linear(*map(self._name, names))

    def shape(self, name):
        return self._ckpt.shape(self._name(name))


class Model(Decoder):
    model_type = "qwen3_5"
    qk_norm = "head"

    def __init__(self, config: dict):
        text = config.get("text_config") or {}
        c = {**config, **text}
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        self.rotary_fraction = rope.pop("partial_rotary_factor", c.get("partial_rotary_factor", 0.25))
        c["partial_rotary_factor"], c["rope_parameters"] = 1.0, rope
        if c.get("head_dim") is None:
            c["head_dim"] = 256
        super().__init__(c)
        n = self.n_layers
        types = c.get("layer_types") or ["full_attention" if (i + 1) % c.get("full_attention_interval", 4) == 0
                                         else "linear_attention" for i in range(n)]
        if len(types) != n or set(types) - {"full_attention", "linear_attention"}:
            raise UnsupportedModel(f"layer_types must list 'linear_attention' or 'full_attention' for each of the {n} layers")
        self.layer_types = types
        self.partial_rotary = self.rotary_fraction    # (after the base check, which refuses q/k norm with it:
                                                      #  this attention permutes q/k itself, see _rotary_order)
        if self.rotary_dim % 2 or self.padded_head_dim != self.head_dim:
            raise UnsupportedModel(f"head_dim {self.head_dim} with rotary dim {self.rotary_dim} is not supported")
        self.lin_hk, self.lin_hv = c["linear_num_key_heads"], c["linear_num_value_heads"]
        self.lin_dk, self.lin_dv = c["linear_key_head_dim"], c["linear_value_head_dim"]
        self.conv_kernel = c.get("linear_conv_kernel_dim", 4)
        if self.lin_hv % self.lin_hk:
            raise UnsupportedModel(f"linear_num_value_heads {self.lin_hv} is not a multiple of linear_num_key_heads {self.lin_hk}")

    def build(self, g, ckpt, recipe, context, progress=lambda: None):
        if "model.language_model.embed_tokens.weight" in ckpt:
            ckpt = LanguageModel(ckpt)
        return super().build(g, ckpt, recipe, context, progress)

    def counts(self, name):
        return not name.startswith(("model.visual.", "mtp."))       # the vision tower, the multi-token-prediction head

    def is_attention(self, i):
        return self.layer_types[i] == "full_attention"

    def norm_weight(self, name):
        return 1.0 + self.ckpt.get(name + ".weight")

    # ---- attention: output gate, partial rotary ------------------------------------------------
    def _rotary_order(self) -> np.ndarray:
        """Channel order within a head that puts rotary pair (i, i + r/2) at (i, i + hd/2)."""
        hd, r = self.head_dim, self.rotary_dim
        rest = np.arange(r, hd)
        return np.concatenate([np.arange(r // 2), rest[: len(rest) // 2], np.arange(r // 2, r), rest[len(rest) // 2:]])

    def attention(self, g, i, x, io):
        pre, name = self.layer_prefix(i) + "self_attn.", f"layers.{i}.attn"
        get, hd = self.ckpt.get, self.head_dim
        order = self._rotary_order()
        qg = get(pre + "q_proj.weight")
        if isinstance(qg, np.ndarray):
            qg = qg.reshape(self.heads, 2, hd, -1)
            q_w, gate_w = qg[:, 0][:, order].reshape(self.heads * hd, -1), qg[:, 1].reshape(self.heads * hd, -1)
            k_w = get(pre + "k_proj.weight").reshape(self.kv_heads, hd, -1)[:, order].reshape(self.kv_heads * hd, -1)
            w = np.concatenate([q_w, k_w, get(pre + "v_proj.weight"), gate_w])
        else:       # a shape-only weight of a synthetic model (export/synthetic.py): the same rows, random codes
            w = np.concatenate([qg, get(pre + "k_proj.weight"), get(pre + "v_proj.weight")])
        if pre + "q_proj.bias" in self.ckpt:
            raise UnsupportedModel("qwen3_5 attention with bias is not supported")
        proj = G.linear(g, x, w, name + ".qkvg", self.recipe.bits, self.recipe.block_size)
        q_dim, kv_dim = self.heads * hd, self.kv_heads * hd
        q, k, v, gate = g.op("Split", [proj, g.const(name + ".split", np.array([q_dim, kv_dim, kv_dim, q_dim], np.int64))],
                             name + ".split", outputs=4, axis=-1)
        q = G.head_rms_norm(g, q, self.norm_weight(pre + "q_norm")[order], self.eps, hd, name + ".q_norm")
        k = G.head_rms_norm(g, k, self.norm_weight(pre + "k_norm")[order], self.eps, hd, name + ".k_norm")
        out = self.attend(g, i, q, k, v, io, self.kv_heads, name)
        out = g.op("Mul", [out, g.op("Sigmoid", [gate], name + ".gate")], name + ".gated")
        return G.linear(g, out, get(pre + "o_proj.weight"), name + ".o_proj", self.recipe.bits, self.recipe.block_size)

    # ---- Gated DeltaNet ----------------------------------------------------------------------------
    def recurrent(self, g, i, x):
        pre, name = self.layer_prefix(i) + "linear_attn.", f"layers.{i}.delta"
        get, bits, bs = self.ckpt.get, self.recipe.bits, self.recipe.block_size
        hk, hv, dk, dv = self.lin_hk, self.lin_hv, self.lin_dk, self.lin_dv
        key_dim, value_dim = hk * dk, hv * dv
        conv_dim = 2 * key_dim + value_dim
        w = np.concatenate([get(pre + "in_proj_qkv.weight"), get(pre + "in_proj_z.weight")])
        qkv, z = g.op("Split", [G.linear(g, x, w, name + ".in_proj", bits, bs),
                                g.const(name + ".split", np.array([conv_dim, value_dim], np.int64))],
                      name + ".split", outputs=2, axis=-1)
        ba_t = np.ascontiguousarray(np.concatenate([get(pre + "in_proj_b.weight"), get(pre + "in_proj_a.weight")]).T)
        b, a = g.op("Split", [g.op("MatMul", [x, g.const(name + ".ba_t", ba_t)], name + ".ba"),
                              g.const(name + ".split_ba", np.array([hv, hv], np.int64))], name + ".split_ba", outputs=2, axis=-1)
        state, layouts = self.conv_state(g, i, self.conv_kernel, conv_dim)
        conv = (qkv, state, get(pre + "conv1d.weight").reshape(conv_dim, -1), None, name + ".conv")

        def standard_conv():
            y, conv_state = G.causal_conv(g, *conv)
            return g.ms("QuickGelu", [y], name + ".silu", alpha=1.0), conv_state
        mixed, conv_state = G.either(g, name + ".conv", standard_conv, lambda: G.causal_conv_fused(g, *conv, activation="silu"))
        self.state_out(g, conv_state, i, "conv", *layouts)
        q, k, v = g.op("Split", [mixed, g.const(name + ".qkv_split", np.array([key_dim, key_dim, value_dim], np.int64))],
                       name + ".qkv", outputs=3, axis=-1)

        def heads(t, n, d, label):
            return g.op("Reshape", [t, g.const(f"{name}.{label}_heads", np.array([0, 0, n, d], np.int64))], f"{name}.{label}4")
        q = G.l2_normalize(g, heads(q, hk, dk, "q"), dk, 1e-6, name + ".q_l2", scale=dk ** -0.5)   # scaled as attention's q
        k = G.l2_normalize(g, heads(k, hk, dk, "k"), dk, 1e-6, name + ".k_l2")
        if hv != hk:                    # each key head serves hv / hk consecutive value heads
            idx = g.const(name + ".repeat", np.arange(hv, dtype=np.int64) // (hv // hk))
            q, k = (g.op("Gather", [t, idx], f"{name}.{label}_rep", axis=2) for t, label in ((q, "q"), (k, "k")))
        v = heads(v, hv, dv, "v")
        beta = g.op("Sigmoid", [b], name + ".beta")
        # decay = exp(-exp(A_log) * softplus(a + dt_bias))
        a_exp = np.exp(get(pre + "A_log").astype(np.float64))
        sp = g.op("Softplus", [g.op("Add", [a, g.const(name + ".dt_bias", get(pre + "dt_bias"))], name + ".a_dt")], name + ".softplus")
        log_decay = g.op("Mul", [sp, g.const(name + ".neg_a", (-a_exp).astype(np.float32))], name + ".log_decay")
        sshape = [hv, dk, dv]
        rule = (q, k, v, log_decay, beta, self.state(g, i, "recurrent", sshape), hv, dk, dv, name + ".rule")
        o, final = G.either(g, name + ".rule", lambda: G.gated_delta_rule(g, *rule), lambda: G.gated_delta_rule_fused(g, *rule))
        self.state_out(g, final, i, "recurrent", sshape)
        o = G.rms_norm(g, o, get(pre + "norm.weight"), self.eps, name + ".norm")                  # [B, S, hv, dv]
        o = g.op("Mul", [o, g.ms("QuickGelu", [heads(z, hv, dv, "z")], name + ".z_silu", alpha=1.0)], name + ".gated")
        o = g.op("Reshape", [o, g.const(name + ".merge", np.array([0, 0, value_dim], np.int64))], name + ".merged")
        return G.linear(g, o, get(pre + "out_proj.weight"), name + ".out_proj", bits, bs)
