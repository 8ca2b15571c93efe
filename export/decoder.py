"""The Llama-family decoder, built as one ONNX graph straight from config + weights.

Llama, Qwen2, Qwen3 and the MoE families differ in a handful of places (q/k/v bias, q/k norm,
the FFN, a few multipliers); an architecture module subclasses `Decoder` and overrides only
those. The data path reads top to bottom in `build`: embed -> N x (norm, attention, norm, FFN)
-> norm -> lm_head, with residual adds fused into the norms.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
from . import graph as G
from .checkpoint import Checkpoint
from .graph import AttentionIO, Graph, Recipe
from .onnx_proto import TensorProto

KV_HEADROOM = 1.25     # the int8 cache's GroupQueryAttention scales: the calibration's largest value x this


class UnsupportedModel(Exception):
    """The checkpoint uses a feature this exporter does not build; one line for the user."""


class Decoder:
    model_type = "llama"
    qk_norm: str | None = None          # "head": RMSNorm per head (Qwen3); "full": over all heads (OLMoE)
    mlp_act = "silu"                    # the gate's activation: "silu" or "gelu_tanh" (Gemma)
    rope_interleaved = False            # rotary pairs (2j, 2j+1) instead of (j, j + D/2) (ERNIE 4.5)
    norm_names = ("input_layernorm", "post_attention_layernorm")   # the norms before attention and before the FFN
    gqa_min_onnxruntime: str | None = None  # the oldest GroupQueryAttention with what the model needs (gpt-oss: sinks)
    fold_heads = True   # decode folds each KV head's query heads into one (graph.Fold); gpt-oss's sinks are per head
    # An int8 lm_head over a large vocabulary is stored as two int4 planes and read as int4 for all
    # logits, then at int8 for this many best candidates per position (`graph.candidate_logits`):
    # decode reads 0.625 instead of 1.125 bytes per lm_head weight. Below split_head_min_vocab
    # rows the head is too small a share of a step to pay for TopK; 0 candidates = off.
    lm_head_candidates = 64
    split_head_min_vocab = 16384
    # weight names that differ between families (LFM2 says operator_norm / ffn_norm / out_proj ...)
    final_norm = "model.norm"
    o_proj, qk_norm_names = "o_proj", ("q_norm", "k_norm")
    states: list[dict] = []             # recurrent state tensors of hybrid models, set by build() (see `state`)

    def __init__(self, config: dict):
        c = self.config = config
        self.hidden = c["hidden_size"]
        self.n_layers = c["num_hidden_layers"]
        self.heads = c["num_attention_heads"]
        self.kv_heads = c.get("num_key_value_heads") or self.heads
        self.head_dim = c.get("head_dim") or self.hidden // self.heads
        self.ffn_dim = c.get("intermediate_size")
        self.vocab = c["vocab_size"]
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.tied = bool(c.get("tie_word_embeddings", False))
        self.max_positions = c.get("max_position_embeddings", 4096)
        self.qkv_bias = bool(c.get("attention_bias", False))
        self.attn_scale = self.head_dim ** -0.5
        # GroupQueryAttention needs head_dim % 16 == 0; smaller heads (stories260K has 8) are
        # zero-padded so that rotate-half pairs still line up (see _pad_heads).
        self.padded_head_dim = -(-self.head_dim // 16) * 16
        if self.qk_norm and self.padded_head_dim != self.head_dim:
            raise UnsupportedModel(f"q/k norm with head_dim {self.head_dim} (not a multiple of 16) is not supported")
        # Granite-style multipliers (1.0 = absent)
        self.embedding_multiplier = 1.0
        self.residual_multiplier = 1.0
        self.logits_divisor = 1.0
        self.final_softcap = 0.0            # logits = c * tanh(logits / c) (Gemma's final_logit_softcapping)
        act = c.get("hidden_act", "silu")
        if self.mlp_act == "silu" and act not in ("silu", "swish"):
            raise UnsupportedModel(f"hidden_act {act!r} is not supported (only silu)")
        # Partial rotary (Phi-3/4): only the first rotary_dim features of each q/k head rotate.
        self.partial_rotary = (c.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                                    c.get("partial_rotary_factor", 1.0)) or 1.0
        if self.rotary_dim % 2 or (self.head_dim - self.rotary_dim) % 2:
            raise UnsupportedModel(f"partial rotary over {self.rotary_dim} of {self.head_dim} head features "
                                   f"is not supported")
        if self.qk_norm and self.rotary_dim != self.head_dim:
            raise UnsupportedModel("q/k norm with partial rotary embeddings is not supported")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary)

    # ---- hybrid models: which layers attend, and the recurrent state of the others ----------
    def is_attention(self, i: int) -> bool:
        return True

    def layer_manifest(self) -> dict:
        """For hybrid models: the layers with a KV cache and the state tensors the runtime holds."""
        if not self.states:
            return {}
        return {"attention_layers": [i for i in range(self.n_layers) if self.is_attention(i)], "state": self.states}

    def state(self, g: Graph, i: int, name: str, shape: list[int], fused_shape: list[int] | None = None) -> str:
        """A recurrent state of layer i: graph input past_state.{i}.{name} [batch, *shape]; the
        layer must give its new value to `state_out`. The runtime holds one per slot (zeros at first),
        shaped as the graph it runs declares: fused_shape, if given, is the fused graphs' layout."""
        self.states.append({"layer": i, "name": name, "shape": list(shape), "dtype": "float32"})
        for tag, dims in self._layouts(shape, fused_shape):
            with g.only(tag) if tag else nullcontext():
                g.input(f"past_state.{i}.{name}", TensorProto.FLOAT, ["batch", *dims])
        return f"past_state.{i}.{name}"

    def state_out(self, g: Graph, src: str, i: int, name: str, shape: list[int], fused_shape: list[int] | None = None) -> None:
        out = f"present_state.{i}.{name}"
        g.op("Identity", [src], out, out=out)
        for tag, dims in self._layouts(shape, fused_shape):
            with g.only(tag) if tag else nullcontext():
                g.output(out, out, TensorProto.FLOAT, ["batch", *dims])

    @staticmethod
    def _layouts(shape, fused_shape) -> list[tuple[str, list[int]]]:
        return [("", shape)] if fused_shape is None else [("scan", shape), ("fused", fused_shape)]

    def conv_state(self, g: Graph, i: int, kernel: int, channels: int) -> tuple[str, tuple]:
        """A short convolution's state: [K-1, C] in the standard-op graphs (`graph.causal_conv`),
        channel-first [C, K-1] in the fused ones, CausalConvWithState's own layout (no transposes of
        the state per step). Returns the input and the (shape, fused_shape) to give `state_out`."""
        layouts = ([kernel - 1, channels], [channels, kernel - 1])
        return self.state(g, i, "conv", *layouts), layouts

    def counts(self, name: str) -> bool:
        """Whether a checkpoint tensor is a parameter of the model exported (not of a vision tower, say)."""
        return True

    # ---- rotary ------------------------------------------------------------------------
    def rope(self, params: dict | None = None) -> tuple[np.ndarray, float]:
        """(inv_freq, attention_factor) with the config's rope scaling (or `params`) applied."""
        c = self.config
        p = dict(params if params is not None else c.get("rope_parameters") or c.get("rope_scaling") or {})
        base = p.get("rope_theta", c.get("rope_theta", 10000.0))
        kind = p.get("rope_type", p.get("type", "default"))
        dim = self.rotary_dim
        inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        factor = p.get("factor", 1.0)
        if kind in ("default", "dynamic"):      # dynamic NTK equals default inside max_position_embeddings
            return inv, 1.0
        if kind == "linear":
            return inv / factor, 1.0
        if kind == "llama3":
            old = p["original_max_position_embeddings"]
            lo_f, hi_f = p["low_freq_factor"], p["high_freq_factor"]
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > old / lo_f, inv / factor, inv)
            smooth = (old / wavelen - lo_f) / (hi_f - lo_f)
            medium = (wavelen >= old / hi_f) & (wavelen <= old / lo_f)
            return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled), 1.0
        if kind == "yarn":
            old = p.get("original_max_position_embeddings") or self.max_positions

            def mscale(s, m=1.0):
                return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
            att = p.get("attention_factor")
            if att is None:
                m, m_all = p.get("mscale"), p.get("mscale_all_dim")
                att = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

            def corr(rot):
                return dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))
            lo, hi = corr(p.get("beta_fast") or 32), corr(p.get("beta_slow") or 1)
            if p.get("truncate", True):
                lo, hi = math.floor(lo), math.ceil(hi)
            lo, hi = max(lo, 0), min(hi, dim - 1)
            ramp = np.clip((np.arange(dim // 2) - lo) / ((hi - lo) or 0.001), 0, 1)
            extrapolate = 1 - ramp
            return inv / factor * (1 - extrapolate) + inv * extrapolate, float(att)
        if kind in ("longrope", "su"):
            # LongRoPE: per-frequency factors, short_factor up to the original length (see archs/phi3.py
            # for the long ones past it); the attention factor is yarn-like, from the length ratio
            old = p.get("original_max_position_embeddings") or c["original_max_position_embeddings"]
            ratio = p.get("factor") or self.max_positions / old
            att = p.get("attention_factor") or (math.sqrt(1 + math.log(ratio) / math.log(old)) if ratio > 1 else 1.0)
            return inv / np.asarray(p["short_factor"], np.float64), float(att)
        raise UnsupportedModel(f"rope scaling type {kind!r} is not supported (default, linear, dynamic, llama3, yarn, "
                               f"longrope)")

    # ---- weights -----------------------------------------------------------------------
    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    # ---- the graph ---------------------------------------------------------------------
    def build(self, g: Graph, ckpt: Checkpoint, recipe: Recipe, context: int, progress=lambda: None) -> dict:
        """Write the whole decoder into g. Returns the quantization actually used per tensor class."""
        self.recipe, self.ckpt = recipe, ckpt
        self.states = []
        ids = g.input("input_ids", TensorProto.INT64, ["batch", "sequence"])    # each row: one sequence's new tokens
        num_logits = g.input("num_logits", TensorProto.INT64, [1])
        io = AttentionIO(g.input("seqlens_k", TensorProto.INT32, ["batch"]),
                         g.input("total_sequence_length", TensorProto.INT32, []),
                         *G.rope_cache(g, *self.rope_for(context), dtype=np.float16 if recipe.kv_cache == "fp16" else np.float32),
                         half=recipe.kv_cache == "fp16")
        if self.kv_headroom:
            io.fold = G.fold_inputs(g, ids, io.seqlens_k, io.total_len, self.heads // self.kv_heads, self.padded_head_dim)

        x = self.embed(g, ids)
        residual = None
        for i in range(self.n_layers):
            pre = self.layer_prefix(i)
            if residual is None:
                h, residual = G.rms_norm(g, x, self.norm_weight(pre + self.norm_names[0]), self.eps,
                                     f"layers.{i}.input_norm"), x
            else:
                h, residual = G.add_rms_norm(g, x, residual, self.norm_weight(pre + self.norm_names[0]), self.eps,
                                             f"layers.{i}.input_norm")
            mix = self.attention(g, i, h, io) if self.is_attention(i) else self.recurrent(g, i, h)
            x = self.scale_residual(g, mix, f"layers.{i}.attn")
            h, residual = G.add_rms_norm(g, x, residual, self.norm_weight(pre + self.norm_names[1]), self.eps,
                                         f"layers.{i}.post_attention_norm")
            x = self.scale_residual(g, self.ffn(g, i, h), f"layers.{i}.ffn")
            progress()
        h, _ = G.add_rms_norm(g, x, residual, self.norm_weight(self.final_norm), self.eps, "final_norm")
        # Only the last num_logits positions reach lm_head: prefill pays for one row, not S.
        last = g.op("Slice", [h, g.op("Neg", [num_logits], "logits_start"),
                              g.const("logits_end", np.array([2**62], np.int64)), g.const("seq_axis", np.array([1], np.int64))],
                    "last_positions")
        g.output(self.lm_head(g, last), "logits", TensorProto.FLOAT, ["batch", "num_logits", self.vocab])
        ckpt.release()                    # the buffers of ckpt.linear
        split = {"lm_head_int8_candidates": self.lm_head_candidates} if self._split_head() else {}   # int4 planes, see above
        return {"attention": recipe.bits, "mlp": recipe.bits, "kv_cache": recipe.kv_cache, "embed": recipe.bits_for("embed"),
                "lm_head": recipe.bits_for("lm_head"), "block_size": recipe.table_block(self.hidden),
                **({} if recipe.block_size else {"linear_block_size": "auto"}), **split}

    def recurrent(self, g: Graph, i: int, x: str) -> str:
        """The token mixer of a layer that does not attend (hybrid models): reads and writes its state."""
        raise NotImplementedError

    def extra_manifest(self) -> dict:
        """Architecture facts the runtime reports (MoE modules add their expert counts)."""
        return {}

    def rope_for(self, context: int, params: dict | None = None):
        """(inv_freq over the padded head, positions, attention factor) for `rope_cache`; the
        features that do not rotate (padding, beyond a partial rotary_dim) get angle 0. The tables
        also cover the headroom: GroupQueryAttention wants a row per position it may write."""
        self.context = context              # for layers that build their own tables (`attention_kind`)
        inv, att = self.rope(params)
        pad = (self.padded_head_dim - self.rotary_dim) // 2
        if att != 1.0 and self.rotary_dim != self.head_dim:     # the scale belongs to the rotated features only
            att = np.concatenate([np.full(len(inv), att), np.ones(pad)])
        return np.concatenate([inv, np.zeros(pad)]), context + self.kv_headroom, att

    def norm_weight(self, name: str) -> np.ndarray:
        """The RMSNorm weight `name` ("...input_layernorm"), as SimplifiedLayerNormalization multiplies by it."""
        return self.ckpt.get(name + ".weight")

    def window(self, i: int) -> int:
        """Layer i's sliding window (keys each query sees, itself included), or 0 for full attention."""
        c = self.config
        types = c.get("layer_types") or []
        sliding = i < len(types) and types[i] == "sliding_attention" and c.get("use_sliding_window", True)
        return int(c["sliding_window"]) if sliding and c.get("sliding_window") else 0

    @property
    def default_kv_cache(self) -> str:
        """The KV cache a quantized export gets unless told: int8 where a head's row holds at least 32
        values (llama.cpp's q8_0 block: its scale costs at most 1/8 byte per value, and the rounding
        keeps the answers: README, --kv-cache), else fp16 (stories260K's 8-wide heads lose top-1 to it)."""
        return "int8" if self.head_dim >= 32 else "fp16"

    @property
    def kv_headroom(self) -> int:
        """Cache rows past a sequence's end that a forward may write: a float cache's folded decode
        (graph.Fold) appends zero rows there; 0 for an int8 cache (its kernels do not gain from it)."""
        fold = self.fold_heads and self.recipe.kv_cache != "int8" and self.heads > self.kv_heads
        return G.Fold.headroom(self.heads // self.kv_heads) if fold else 0

    def min_onnxruntime(self, kv_cache: str) -> str | None:
        """The oldest onnxruntime that runs the graph (the manifest's min_onnxruntime): what its
        GroupQueryAttention needs; the int8 cache attends with standard ops and needs nothing new."""
        return None if kv_cache == "int8" else self.gqa_min_onnxruntime

    def shared(self, g: Graph, key: str, make):
        """Something several layers share (other rotary tables, a window mask), made once per graph."""
        cache = self.__dict__.setdefault("_shared", {})
        if (g, key) not in cache:
            cache[(g, key)] = make()
        return cache[(g, key)]

    def attention_kind(self, g: Graph, i: int, io: AttentionIO) -> tuple[AttentionIO, dict]:
        """Layer i's rotary tables and attention options: `graph.gqa`'s keywords, plus window."""
        w = self.window(i)
        return io, ({"window": w} if w else {})

    def qkv_weights(self, i: int) -> tuple[list, list | None]:
        """[q, k, v] weights [rows, hidden] of layer i and their biases (or None)."""
        pre, get = self.layer_prefix(i) + "self_attn.", self.ckpt.get
        bias = None
        if self.qkv_bias or pre + "q_proj.bias" in self.ckpt:
            bias = [get(pre + p + "_proj.bias") for p in "qkv"]
        return [get(pre + p + "_proj.weight") for p in "qkv"], bias

    def _rotary_first(self, w: np.ndarray) -> np.ndarray:
        """q/k rows of each head [r_a r_b | p_a p_b] -> [r_a p_a | r_b p_b] under partial rotary, so
        GroupQueryAttention's rotate-half pairs (j, j + D/2) are the model's (j, j + rotary_dim/2)
        and the pass-through features get angle 0; interleaved pairs (2j, 2j+1) are gathered the
        same way (q.k is unchanged by a permutation of both)."""
        hd, r = self.head_dim, self.rotary_dim
        if r == hd and not self.rope_interleaved:
            return w
        p = hd - r
        first, second = (np.arange(0, r, 2), np.arange(1, r, 2)) if self.rope_interleaved else (np.arange(r // 2),
                                                                                                np.arange(r // 2, r))
        order = np.concatenate([first, r + np.arange(p // 2), second, r + np.arange(p // 2, p)])
        heads = w.shape[0] // hd
        return w[(np.arange(heads)[:, None] * hd + order[None]).reshape(-1)]

    def _pad_heads(self, w: np.ndarray, axis: int) -> np.ndarray:
        """Spread each head's halves [a | b] to [a 0 | b 0] along axis (rows of q/k/v, columns of o)."""
        hd, hp = self.head_dim, self.padded_head_dim
        if hp == hd:
            return w
        w = np.moveaxis(w, axis, 0)
        heads = w.shape[0] // hd
        src = w.reshape(heads, 2, hd // 2, *w.shape[1:])
        out = np.zeros((heads, 2, hp // 2, *w.shape[1:]), w.dtype)
        out[:, :, : hd // 2] = src
        return np.moveaxis(out.reshape(heads * hp, *w.shape[1:]), 0, axis)

    def scale_residual(self, g: Graph, x: str, name: str) -> str:
        if self.residual_multiplier == 1.0:
            return x
        return g.op("Mul", [x, g.const(name + ".residual_multiplier", np.array(self.residual_multiplier, np.float32))],
                    name + ".scaled")

    def embed(self, g: Graph, ids: str) -> str:
        table = self.ckpt.rows("model.embed_tokens.weight")
        bits = self.recipe.bits_for("embed")
        if bits == 32:
            full = table[:]
            x = g.op("Gather", [g.const("embed_tokens.weight", full), ids], "embed")
            del full
        else:
            bs = self.recipe.table_block(self.hidden)
            planes = self.tied and self._split_head() and self.recipe.bits_for("lm_head") == bits
            self._embed_q = G.quantized_rows(g, table, "embed_tokens", bits, bs, planes)
            x = G.gather_quantized_rows(g, ids, *self._embed_q[:3], bits, self.hidden, -(-self.hidden // bs) * bs, "embed",
                                        *self._embed_q[3:])
        del table
        if self.embedding_multiplier != 1.0:
            x = g.op("Mul", [x, g.const("embedding_multiplier", np.array(self.embedding_multiplier, np.float32))],
                     "embed.scaled")
        return x

    def _split_head(self) -> bool:
        return (self.recipe.bits_for("lm_head") == 8 and self.lm_head_candidates > 0
                and self.vocab >= self.split_head_min_vocab)

    def lm_head(self, g: Graph, h: str) -> str:
        bits, bs = self.recipe.bits_for("lm_head"), self.recipe.table_block(self.hidden)
        if self._split_head():
            shared = self.tied and self.recipe.bits_for("embed") == bits
            table = self._embed_q if shared else G.quantized_rows(
                g, self.ckpt.rows("model.embed_tokens.weight" if self.tied else "lm_head.weight"), "lm_head", bits, bs, True)
            logits = G.candidate_logits(g, h, table, self.vocab, self.hidden, bs, self.lm_head_candidates, "lm_head")
        elif self.tied and bits != 32 and self.recipe.bits_for("embed") == bits:
            # The quantized embedding rows are already MatMulNBits' B layout: share one copy.
            logits = G.apply_linear(g, h, "MatMulNBits", list(self._embed_q),
                                    dict(K=self.hidden, N=self.vocab, bits=bits, block_size=bs, accuracy_level=4), "lm_head")
        else:
            w = self.ckpt.rows("model.embed_tokens.weight" if self.tied else "lm_head.weight")
            logits = G.linear(g, h, w[:] if bits == 32 else w, "lm_head", bits, bs)
        if self.logits_divisor != 1.0:
            logits = g.op("Div", [logits, g.const("logits_divisor", np.array(self.logits_divisor, np.float32))],
                          "logits.scaled")
        if self.final_softcap:
            cap = g.const("logits_softcap", np.array(self.final_softcap, np.float32))
            logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, cap], "logits.capped")], "logits.tanh"), cap],
                          "logits.softcapped")
        return logits

    def attention(self, g: Graph, i: int, x: str, io: AttentionIO) -> str:
        pre, name = self.layer_prefix(i) + "self_attn.", f"layers.{i}.attn"
        get = self.ckpt.get
        # q, k, v as one fused projection: one kernel launch instead of three.
        pad = self._pad_heads
        def layout(parts):      # q and k rows in rotary order (partial/interleaved rotary), each head padded
            return np.concatenate([pad(self._rotary_first(t) if j < 2 else t, 0) for j, t in enumerate(parts)])
        ws, bs = self.qkv_weights(i)
        w, bias = layout(ws), None if bs is None else layout(bs)
        del ws
        qkv = G.linear(g, x, w, name + ".qkv", self.recipe.bits, self.recipe.block_size, bias)
        del w
        hd = self.padded_head_dim
        q_dim, kv_dim = self.heads * hd, self.kv_heads * hd
        q, k, v = g.op("Split", [qkv, g.const(name + ".split", np.array([q_dim, kv_dim, kv_dim], np.int64))],
                       name + ".split", outputs=3, axis=-1)
        qn, kn = self.qk_norm_names
        if self.qk_norm == "head":
            q = G.head_rms_norm(g, q, self.norm_weight(pre + qn), self.eps, self.head_dim, name + ".q_norm")
            k = G.head_rms_norm(g, k, self.norm_weight(pre + kn), self.eps, self.head_dim, name + ".k_norm")
        elif self.qk_norm == "full":
            q = G.rms_norm(g, q, get(pre + "q_norm.weight"), self.eps, name + ".q_norm")
            k = G.rms_norm(g, k, get(pre + "k_norm.weight"), self.eps, name + ".k_norm")
        layer_io, options = self.attention_kind(g, i, io)
        window = options.get("window", 0)
        if window:      # one mask for every layer with this window
            options["bias"] = self.shared(g, f"window{window}", lambda: G.window_bias(g, q, io, window, f"window{window}"))
        out = self.attend(g, i, q, k, v, layer_io, self.kv_heads, name, **options)
        o = pre + self.o_proj
        return G.linear(g, out, pad(get(o + ".weight"), 1), name + ".o_proj", self.recipe.bits, self.recipe.block_size,
                        get(o + ".bias") if o + ".bias" in self.ckpt else None)

    def attend(self, g: Graph, i: int, q: str, k: str, v: str, io: AttentionIO, kv_heads: int, name: str,
               **options) -> str:
        """Layer i's attention over its KV cache (inputs past_key_values.i.*, outputs present.i.*):
        GroupQueryAttention on a cache the runtime binds as both past and present (fp32/fp16), or
        the int8 cache's graph (`graph.int8_cache_attention`), whose presents are the new rows; with
        calibrated scales (`kv_scales`), both: GroupQueryAttention on the int8 cache in the "kv8gqa"
        graphs, the standard ops in the others, with one output name."""
        kind, d = self.recipe.kv_cache, self.padded_head_dim
        scales = self.kv_scales(g, i, kv_heads) if kind == "int8" else None
        if kind != "int8" or scales:
            # GroupQueryAttention on the cache in place; an int8 cache with the calibrated per-channel
            # scales (onnxruntime >= 1.27), beside the standard-op graph below as a twin
            shape = ["batch", kv_heads, "max_sequence", d]
            with g.only("kv8gqa") if scales else nullcontext():
                past = [g.input(f"past_key_values.{i}.{n}", G.KV_TYPES[kind][0], shape) for n in ("key", "value")]
                out, *presents = G.gqa(g, q, k, v, *past, io, self.heads, kv_heads, self.attn_scale, name,
                                       scales=scales, out=f"{name}.attended" if scales else None, **options)
                for src, n in zip(presents, ("key", "value")):
                    g.output(src, f"present.{i}.{n}", G.KV_TYPES[kind][0], shape)
            if not scales:
                return out
        options.pop("window", None)     # the int8 graph's mask is built from `bias`
        with g.only("kv8ops") if scales else nullcontext():
            return self._attend_int8(g, i, q, k, v, io, kv_heads, name, out=f"{name}.attended" if scales else None,
                                     scales=scales, **options)

    def kv_scales(self, g: Graph, i: int, kv_heads: int) -> tuple[str, str] | None:
        """Layer i's int8 cache scales for GroupQueryAttention, [1, kv_heads, 1, head_dim] each, from
        the calibration's largest keys and values (`calibrate._Probe._kv_ranges`; None without calibration).
        A key channel's scale covers its rotary pair's norm, which no rotation changes: a position the
        calibration never reached cannot leave the range."""
        ranges = getattr(getattr(g.quantizer, "stats", None), "kv_ranges", None)
        if not ranges or f"past_key_values.{i}.key" not in ranges:
            return None
        key, value = (ranges[f"past_key_values.{i}.{n}"] for n in ("key", "value"))
        return tuple(g.const(f"layers.{i}.attn.{n}_scale", (np.maximum(x, 1e-6) * KV_HEADROOM / 127)
                             .astype(np.float32).reshape(1, kv_heads, 1, -1))
                     for n, x in (("k", key), ("v", value)))

    def _attend_int8(self, g: Graph, i: int, q: str, k: str, v: str, io: AttentionIO, kv_heads: int, name: str,
                     out: str | None = None, scales: tuple | None = None, **options) -> str:
        """The standard-op graph's int8 cache: codes and a scale per row and head, or codes only with
        the calibrated per-channel scales (the twin GroupQueryAttention graph's, 1 byte per element)."""
        d = self.padded_head_dim
        shapes = {"key": (TensorProto.INT8, [kv_heads, d, "T"]), "key_scale": (TensorProto.FLOAT, [kv_heads, 1, "T"]),
                  "value": (TensorProto.INT8, [kv_heads, "T", d]), "value_scale": (TensorProto.FLOAT, [kv_heads, 1, "T"])}
        if scales:
            del shapes["key_scale"], shapes["value_scale"]
        past = [g.input(f"past_key_values.{i}.{n}", t, ["batch", *(x if x != "T" else "max_sequence" for x in shape)])
                for n, (t, shape) in shapes.items()]
        key = f"kv8_index{kv_heads}x{self.heads // kv_heads}x{d}"
        index = self.shared(g, key, lambda: G.int8_cache_index(g, q, io, kv_heads, self.heads // kv_heads, d, key))
        presents = [f"present.{i}.{n}" for n in shapes]
        attended = G.int8_cache_attention(g, q, k, v, past, io, index, self.heads, kv_heads, d, self.attn_scale, name,
                                          presents, out_name=out, scales=scales, **options)
        for present, (t, shape) in zip(presents, shapes.values()):
            g.output(present, present, t, ["batch", *(x if x != "T" else "sequence" for x in shape)])
        return attended

    def ffn(self, g: Graph, i: int, x: str) -> str:
        return swiglu_mlp(g, self.ckpt, x, self.layer_prefix(i) + "mlp.", f"layers.{i}.mlp", self.recipe.bits,
                          self.recipe.block_size, act=self.mlp_act)


def swiglu_mlp(g: Graph, ckpt: Checkpoint, x: str, pre: str, name: str, bits: int, block_size: int,
               names=("gate_proj", "up_proj", "down_proj"), act: str = "silu") -> str:
    """down(act(gate(x)) * up(x)); gate and up run as one projection. names[1] None: names[0] is
    the fused gate_up projection (Phi-3)."""
    g.quantizer.mlp(name + ".gate_up", name + ".down", act)
    gate_up = ckpt.linear(*(pre + n + ".weight" for n in names[:2] if n))    # (a buffer reused: see linear)
    width = gate_up.shape[0] // 2
    gu = G.linear_operands(g, gate_up, name + ".gate_up", bits, block_size)
    down = G.linear_operands(g, ckpt.linear(pre + names[2] + ".weight"), name + ".down", bits, block_size)
    return G.swiglu(g, x, gu, down, width, name, act)
