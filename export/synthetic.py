"""Artifacts of real model shapes with random weights, built on the device without a download:
what `edgert bench --synthetic SHAPE` measures before anyone fetches gigabytes.

The artifact comes from the real exporter and architecture modules (same graph, same recipe
defaults); only the weight source differs. `SyntheticCheckpoint` looks like a checkpoint, but
its large matrices are shape-only `SyntheticWeight`s that quantize() turns straight into random
packed codes with plausible block scales (no fp32 matrix, no quantization search), so a 7B
shape builds in the time it takes to write its bytes. Small tensors (norms, biases, routers)
are real random fp32. The values follow benchmarks/checkpoints.py's random checkpoints
(normal(0, 0.02), norms 1 + normal(0, 0.02)): activations stay finite and MoE routers spread
tokens over the experts as random real weights do.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np

from edgert.artifact import bytes_per_weight
from edgert.device import RUNTIME_BYTES, WEIGHT_FACTOR, available_memory

from .archs import model_for
from .artifact import BUNDLED_MODEL, DEFAULT_MAX_CONTEXT, export
from .decoder import Decoder
from .graph import PLANE_RANGE, Recipe, plane_nibbles
from .moe import MoEDecoder
from .quantize import Quantized, _pack4

STD = 0.02              # the random checkpoints' weight scale
PLANE_CHUNK = 4096      # rows of split int8 planes generated per step (bounds the temporaries)
GENERATOR_VERSION = 6   # bump when the weights or the layout change: cached artifacts are rebuilt


def _qwen2(**kw) -> dict:
    return dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151643,
                **kw)


# Real models' config.json numbers (architecture fields only).
SHAPES = {
    "qwen2.5-0.5b": _qwen2(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                           rope_theta=1000000.0, tie_word_embeddings=True),
    "r1-distill-qwen-1.5b": _qwen2(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=131072, rope_theta=10000, tie_word_embeddings=False),
    "r1-distill-qwen-7b": _qwen2(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 max_position_embeddings=131072, rope_theta=10000, tie_word_embeddings=False),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_act="silu", hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645),
    "olmoe-1b-7b": dict(model_type="olmoe", hidden_act="silu", hidden_size=2048, intermediate_size=1024,
                        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                        num_experts_per_tok=8, norm_topk_prob=False, vocab_size=50304, max_position_embeddings=4096,
                        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None,
                        eos_token_id=50279),
    # LongRoPE's factors do not change the cost: ones stand in for Phi-4-mini's 48 + 48
    "phi-4-mini": dict(model_type="phi3", hidden_act="silu", hidden_size=3072, intermediate_size=8192,
                       num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8, vocab_size=200064,
                       max_position_embeddings=131072, original_max_position_embeddings=4096, partial_rotary_factor=0.75,
                       rope_theta=10000.0, rope_scaling=dict(rope_type="longrope", short_factor=[1.0] * 48,
                                                             long_factor=[1.0] * 48),
                       rms_norm_eps=1e-5, tie_word_embeddings=True, sliding_window=262144, bos_token_id=199999,
                       eos_token_id=199999),
    "gemma-3-1b": dict(model_type="gemma3_text", hidden_activation="gelu_pytorch_tanh", hidden_size=1152,
                       intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                       head_dim=256, vocab_size=262144, max_position_embeddings=32768, query_pre_attn_scalar=256,
                       sliding_window=512, sliding_window_pattern=6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=2, eos_token_id=[1, 106]),
    # the experts as transformers holds them (bf16 [E, in, out]); the hub's MXFP4 blocks decode to the same
    "gpt-oss-20b": dict(model_type="gpt_oss", hidden_act="silu", hidden_size=2880, intermediate_size=2880,
                        num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                        num_local_experts=32, num_experts_per_tok=4, vocab_size=201088, sliding_window=128,
                        layer_types=["sliding_attention", "full_attention"] * 12, max_position_embeddings=131072,
                        rope_theta=150000.0, rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0,
                                                               beta_slow=1.0, original_max_position_embeddings=4096,
                                                               truncate=False),
                        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=True, swiglu_limit=7.0,
                        bos_token_id=199998, eos_token_id=200002),
}
# Hybrid recurrent shapes (numbers from the published config.json files; parameter counts check out:
# LFM2.5-1.2B 1.17B, its FFN block_ff_dim 12288 auto-adjusted to 8192; Qwen3.5-0.8B's text model)
SHAPES["lfm2.5-1.2b"] = dict(model_type="lfm2", hidden_size=2048, intermediate_size=12288, block_auto_adjust_ff_dim=True,
                             block_ffn_dim_multiplier=1.0, block_multiple_of=256, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, full_attn_idxs=[2, 5, 8, 10, 12, 14],
                             conv_L_cache=3, norm_eps=1e-5, vocab_size=65536, max_position_embeddings=128000,
                             rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=7)
SHAPES["qwen3.5-0.8b"] = dict(model_type="qwen3_5_text", hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
                              num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                              linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
                              linear_conv_kernel_dim=4, full_attention_interval=4, vocab_size=248320,
                              max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=True,
                              rope_parameters=dict(rope_type="default", rope_theta=10000000, partial_rotary_factor=0.25),
                              hidden_act="silu", eos_token_id=248044)
# Qwen3.5-2B's text model: the 0.8B layout at the model card's sizes (its config.json was not reachable here)
SHAPES["qwen3.5-2b"] = dict(SHAPES["qwen3.5-0.8b"], hidden_size=2048, intermediate_size=6144)
# Qwen3.5-35B-A3B's text model: 30 Gated DeltaNet + 10 gated attention layers, every FFN 256 experts
# (top 8, 512 wide) and a 512-wide shared expert; ~3B parameters read per token of 35B
SHAPES["qwen3.5-35b-a3b"] = dict({k: v for k, v in SHAPES["qwen3.5-0.8b"].items() if k != "intermediate_size"},
                                 model_type="qwen3_5_moe_text", hidden_size=2048, num_hidden_layers=40,
                                 num_attention_heads=16, num_key_value_heads=2, linear_num_value_heads=32,
                                 num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                                 shared_expert_intermediate_size=512, tie_word_embeddings=False)
SUPPORTED = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "phi3", "gemma3_text", "gpt_oss",
             "lfm2", "qwen3_5", "qwen3_5_moe")


class SyntheticError(Exception):
    """One line for the user."""


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


class SyntheticWeight:
    """A weight matrix [out, in] that exists only as its shape until quantize() asks for its codes.
    np.concatenate / np.stack / reshape (how the exporter fuses q|k|v, gate|up and experts) give
    another placeholder; anything that wants the fp32 values fails loudly."""

    def __init__(self, shape, name: str, seed: int):
        self.shape, self.name, self.seed = tuple(int(d) for d in shape), name, seed

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        assert int(np.prod(shape)) == int(np.prod(self.shape)), (shape, self.shape)
        return SyntheticWeight(shape, self.name, self.seed)

    def __array_function__(self, func, types, args, kwargs):
        parts = list(args[0])
        axis = kwargs.get("axis", args[1] if len(args) > 1 else 0)
        if func is np.concatenate:
            shape = list(parts[0].shape)
            shape[axis] = sum(p.shape[axis] for p in parts)
        elif func is np.stack:
            shape = list(parts[0].shape)
            shape.insert(axis, len(parts))
        else:
            return NotImplemented
        return SyntheticWeight(shape, parts[0].name, parts[0].seed)

    def __getitem__(self, index):
        """Rows sliced or picked (a fused projection split, rows permuted, one expert of a stack):
        another placeholder."""
        rows = np.arange(self.shape[0])[index]
        return SyntheticWeight((*rows.shape, *self.shape[1:]), self.name, self.seed)

    @property
    def T(self):
        return SyntheticWeight(self.shape[::-1], self.name, self.seed)

    def __array__(self, *args, **kwargs):
        raise TypeError(f"{self.name}: synthetic weights exist only in quantized form (use --bits 4 or 8)")

    def quantized(self, bits: int, block_size: int, symmetric: bool) -> Quantized:
        """Uniformly random codes (a byte holds two int4 codes) and block scales that give the
        dequantized weights the standard deviation STD."""
        n, k = self.shape
        kb = -(-k // block_size)
        rng = _rng(self.seed, self.name)
        packed = np.frombuffer(rng.bytes(n * kb * block_size * bits // 8), np.uint8).reshape(n, kb, -1)
        levels, mid = 1 << bits, 1 << (bits - 1)
        rms_code = np.sqrt((levels ** 2 - 1) / 12 + 0.25)       # of (uniform code - mid)
        scales = (STD / rms_code * rng.uniform(0.9, 1.1, (n, kb))).astype(np.float32)
        zero_points = None
        if not symmetric:
            # mid - 1 or mid: centred on the codes' mean, mid - 1/2 (mid - 1 to mid + 1 shifted every weight by
            # half a step on average, a shared direction that sent a 128-wide tiny MoE's tokens to 2 experts)
            zp = rng.integers(mid - 1, mid, (n, kb + (kb % 2 if bits == 4 else 0)), dtype=np.uint8, endpoint=True)
            zero_points = _pack4(zp) if bits == 4 else zp
        return Quantized(packed, scales, zero_points, bits, block_size, k)

    def planes(self, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """An int8 table stored as two int4 planes (graph.split_int8): (hi, scales, lo) of uniformly
        random codes in 128 +- PLANE_RANGE, generated a chunk of rows at a time."""
        n, k = self.shape
        kb = -(-k // block_size)
        rng = _rng(self.seed, self.name + ".planes")
        hi = np.empty((n, kb, block_size // 2), np.uint8)
        lo = np.empty_like(hi)
        for r in range(0, n, PLANE_CHUNK):
            rows = min(PLANE_CHUNK, n - r)
            u = rng.integers(136 - PLANE_RANGE, 136 + PLANE_RANGE, (rows, kb, block_size), np.int16, endpoint=True)
            hi[r : r + rows], lo[r : r + rows] = plane_nibbles(u)
        rms_code = np.sqrt(((2 * PLANE_RANGE + 1) ** 2 - 1) / 12)
        scales = (STD / rms_code * rng.uniform(0.9, 1.1, (n, kb))).astype(np.float32)
        return hi, scales, lo


def tensor_shapes(m: Decoder) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Hugging Face checkpoint of model m, by the architecture's own names."""
    if m.model_type not in SUPPORTED:
        raise SyntheticError(f"synthetic weights for {m.model_type} are not supported ({', '.join(SUPPORTED)})")
    if m.model_type in ("lfm2", "qwen3_5", "qwen3_5_moe"):
        return _hybrid_shapes(m)
    h, q, kv = m.hidden, m.heads * m.head_dim, m.kv_heads * m.head_dim
    out = {"model.embed_tokens.weight": (m.vocab, h)}
    for i in range(m.n_layers):
        p = m.layer_prefix(i)
        a = p + "self_attn."
        out[p + "input_layernorm.weight"] = (h,)
        for proj, rows in (("q", q), ("k", kv), ("v", kv)):
            out[f"{a}{proj}_proj.weight"] = (rows, h)
            if m.qkv_bias:
                out[f"{a}{proj}_proj.bias"] = (rows,)
        out[a + "o_proj.weight"] = (h, q)
        if m.qk_norm:
            head = m.qk_norm == "head"
            out[a + "q_norm.weight"], out[a + "k_norm.weight"] = ((m.head_dim,), (m.head_dim,)) if head else ((q,), (kv,))
        out[p + "post_attention_layernorm.weight"] = (h,)
        out.update(_ffn_shapes(m, i))
    for i in range(m.n_layers):
        p = m.layer_prefix(i)
        if m.model_type == "phi3":              # fused projections
            out[p + "self_attn.qkv_proj.weight"] = (sum(out.pop(f"{p}self_attn.{x}_proj.weight")[0] for x in "qkv"), h)
            out[p + "mlp.gate_up_proj.weight"] = (out.pop(p + "mlp.gate_proj.weight")[0] + out.pop(p + "mlp.up_proj.weight")[0], h)
        if m.model_type == "gemma3_text":       # four norms per layer
            out[p + "pre_feedforward_layernorm.weight"] = out[p + "post_feedforward_layernorm.weight"] = (h,)
        if m.model_type == "gpt_oss":           # sinks, o_proj and router biases, experts stacked [E, in, out]
            e, f = m.routing.experts, m.expert_ffn
            out.update({p + "self_attn.o_proj.bias": (h,), p + "self_attn.sinks": (m.heads,), p + "mlp.router.bias": (e,)})
            for x in [n for n in out if n.startswith(p + "mlp.experts.")]:
                del out[x]
            out.update({p + "mlp.experts.gate_up_proj": (e, h, 2 * f), p + "mlp.experts.gate_up_proj_bias": (e, 2 * f),
                        p + "mlp.experts.down_proj": (e, f, h), p + "mlp.experts.down_proj_bias": (e, h)})
    out["model.norm.weight"] = (h,)
    if not m.tied:
        out["lm_head.weight"] = (m.vocab, h)
    return out


def _hybrid_shapes(m: Decoder) -> dict[str, tuple[int, ...]]:
    """LFM2 (short conv + GQA) and Qwen3.5 (Gated DeltaNet + gated GQA), by their checkpoints' names."""
    h, hd, q, kv = m.hidden, m.head_dim, m.heads * m.head_dim, m.kv_heads * m.head_dim
    lfm = m.model_type == "lfm2"
    pre_norm, post_norm = m.norm_names
    out = {"model.embed_tokens.weight": (m.vocab, h), m.final_norm + ".weight": (h,)}
    for i in range(m.n_layers):
        p = m.layer_prefix(i)
        out[p + pre_norm + ".weight"] = out[p + post_norm + ".weight"] = (h,)
        if m.is_attention(i):
            a = p + "self_attn."
            out.update({a + "q_proj.weight": (q if lfm else 2 * q, h), a + "k_proj.weight": (kv, h), a + "v_proj.weight": (kv, h),
                        a + m.o_proj + ".weight": (h, q)})
            out.update({a + n + ".weight": (hd,) for n in m.qk_norm_names})
        elif lfm:
            c = p + "conv."
            out.update({c + "in_proj.weight": (3 * h, h), c + "conv.weight": (h, 1, m.conv_kernel), c + "out_proj.weight": (h, h)})
        else:
            d = p + "linear_attn."
            key, value, hv = m.lin_hk * m.lin_dk, m.lin_hv * m.lin_dv, m.lin_hv
            out.update({d + "in_proj_qkv.weight": (2 * key + value, h), d + "in_proj_z.weight": (value, h),
                        d + "in_proj_b.weight": (hv, h), d + "in_proj_a.weight": (hv, h),
                        d + "conv1d.weight": (2 * key + value, 1, m.conv_kernel), d + "dt_bias": (hv,), d + "A_log": (hv,),
                        d + "norm.weight": (m.lin_dv,), d + "out_proj.weight": (h, value)})
        out.update(_swiglu_shapes(p + "feed_forward.", m.ffn_dim, h, ("w1", "w3", "w2")) if lfm else _ffn_shapes(m, i))
    if not m.tied:
        out["lm_head.weight"] = (m.vocab, h)
    return out


def _swiglu_shapes(pre: str, ffn: int, h: int, names=("gate_proj", "up_proj", "down_proj")) -> dict:
    return {f"{pre}{names[0]}.weight": (ffn, h), f"{pre}{names[1]}.weight": (ffn, h), f"{pre}{names[2]}.weight": (h, ffn)}


def _ffn_shapes(m: Decoder, i: int) -> dict:
    h, p = m.hidden, m.layer_prefix(i)
    if not (isinstance(m, MoEDecoder) and m.is_sparse(i)):
        return _swiglu_shapes(p + "mlp.", m.ffn_dim, h)
    pre = p + m.moe_prefix
    out = {pre + m.router_name: (m.routing.experts, h)}
    for e in range(m.routing.experts):
        out.update(_swiglu_shapes(pre, m.expert_ffn, h, tuple(n.format(e=e) for n in m.expert_names)))
    shared = m.config.get("shared_expert_intermediate_size")
    if m.model_type in ("qwen2_moe", "qwen3_5_moe") and shared:
        out.update(_swiglu_shapes(pre + "shared_expert.", shared, h))
        out[pre + "shared_expert_gate.weight"] = (1, h)
    return out


def _is_matrix(m: Decoder, name: str, shape) -> bool:
    """Weights the exporter quantizes (routers and the [1, H] shared-expert gate stay fp32)."""
    router = isinstance(m, MoEDecoder) and name.endswith("." + m.router_name)
    gates = name.endswith(("in_proj_a.weight", "in_proj_b.weight"))      # Gated DeltaNet's fp32 decay/beta projections
    return len(shape) in (2, 3) and min(shape) > 1 and not router and not name.endswith("_bias") and not gates


class SyntheticCheckpoint:
    """The Checkpoint interface (config, names, shape, get, rows) over generated weights."""

    def __init__(self, config: dict, seed: int = 0):
        self.config, self.generation_config, self.seed = config, {}, seed
        self.model = model_for(config)
        self._shapes = tensor_shapes(self.model)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    @property
    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str):
        shape = self._shapes[name]
        if _is_matrix(self.model, name, shape):
            return SyntheticWeight(shape, name, self.seed)
        x = _rng(self.seed, name).normal(0, STD, shape).astype(np.float32)
        return x + np.float32(1) if "norm" in name else x

    rows = get      # the embedding path reads tables through rows(); a placeholder serves both

    def kv_ranges(self, model: Decoder):
        """What calibration gives the int8 KV cache, for these weights: its per-channel ranges, so that
        the artifact has the kv8gqa graphs a real export has (GroupQueryAttention on the int8 cache:
        the bench times what a user's export runs). A key or value here is ~N(0, hidden * STD^2):
        4 sigma, and sqrt(2) more for a key's rotary pair."""
        from .calibrate import ActivationStats
        stats = ActivationStats({}, {}, 0)
        sigma = STD * model.hidden ** 0.5
        for i in range(model.n_layers):
            for n, top in (("key", 4 * sigma * 2 ** 0.5), ("value", 4 * sigma)):
                stats.kv_ranges[f"past_key_values.{i}.{n}"] = np.full((model.kv_heads, model.padded_head_dim), top, np.float32)
        return stats

    def linear(self, *names: str):
        return np.concatenate([self.get(n) for n in names])

    def release(self) -> None:
        pass


# ---- sizes and the memory check -------------------------------------------------------------

def quantized_bytes(n: int, k: int, bits: int, block_size: int) -> int:
    """Bytes of an [n, k] weight in the artifact (k padded to whole blocks)."""
    return int(n * -(-k // block_size) * block_size * bytes_per_weight(bits, block_size))


def weight_bytes(config: dict, recipe: Recipe) -> int:
    """The data file an export of `config` writes, give or take alignment."""
    m = model_for(config)
    total = 0
    for name, shape in tensor_shapes(m).items():
        if not _is_matrix(m, name, shape):
            total += 4 * int(np.prod(shape))
            continue
        cls = "embed" if name == "model.embed_tokens.weight" else "lm_head" if name == "lm_head.weight" else "mlp"
        if len(shape) == 3:     # stacked experts [E, in, out] (gpt-oss)
            total += shape[0] * quantized_bytes(shape[2], shape[1], recipe.bits, recipe.block_for(shape[1]))
            continue
        block = recipe.block_for(shape[1]) if cls == "mlp" else recipe.table_block(shape[1])
        total += quantized_bytes(*shape, recipe.bits_for(cls), block)   # (a tied table is stored once)
    context = min(m.max_positions, DEFAULT_MAX_CONTEXT)
    return total + 2 * 4 * context * m.padded_head_dim // 2      # + the rotary tables


def kv_cache_bytes(config: dict, context: int, kv_cache: str | None = None) -> int:
    """An upper bound on the bench's KV cache: 4 bytes an element (fp32), 2 for fp16, 1 for int8
    (+ an fp32 scale per row and head for an uncalibrated int8 cache), 4 when left to the default."""
    m = model_for(config)
    attention = sum(m.is_attention(i) for i in range(m.n_layers))      # hybrid models: their attention layers only
    per = {"fp16": 2, "int8": 1 + 4 / m.padded_head_dim}.get(kv_cache, 4)
    return int(2 * per * attention * m.kv_heads * m.padded_head_dim * context)


def check_fits(shape: str, need_memory: int, need_disk: int, folder: Path, available: int | None = None) -> None:
    """Refuse, in one line, a shape whose weights + KV cache exceed free memory, or whose files the disk."""
    available = (available_memory() or (None, ""))[0] if available is None else available
    if available is not None and need_memory > available:
        raise SyntheticError(f"{shape} needs {need_memory / 2**30:.1f} GiB of memory (weights + KV cache + runtime) but "
                             f"{available / 2**30:.1f} GiB is available: pick a smaller shape, --bits 4 or a shorter --context")
    env = " (EDGERT_SYNTHETIC_DIR)" if os.environ.get("EDGERT_SYNTHETIC_DIR") else ""   # said with the variable that moves it
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:        # a file in the way, no permission
        why = ("is not a folder (a file is in the way)" if isinstance(e, (FileExistsError, NotADirectoryError))
               else f"cannot be made ({e.strerror})")
        raise SyntheticError(f"the synthetic model cache {folder}{env} {why}: point EDGERT_SYNTHETIC_DIR at a folder") from None
    if need_disk and not os.access(folder, os.W_OK | os.X_OK):     # a build writes there; a cached one only reads
        raise SyntheticError(f"the synthetic model cache {folder}{env} is not writable: point EDGERT_SYNTHETIC_DIR at a "
                             "folder you can write")
    free = shutil.disk_usage(folder).free
    if need_disk > free:
        raise SyntheticError(f"{shape} needs {need_disk / 2**30:.1f} GiB of disk in {folder} but {free / 2**30:.1f} GiB "
                             f"is free (set EDGERT_SYNTHETIC_DIR to build elsewhere)")


# ---- build and cache ------------------------------------------------------------------------

def cache_dir() -> Path:
    if os.environ.get("EDGERT_SYNTHETIC_DIR"):
        return Path(os.environ["EDGERT_SYNTHETIC_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgert" / "synthetic"


def _key(config: dict, bits: int, seed: int, kv_cache: str | None = None) -> str:
    parts = [config, bits, seed, GENERATOR_VERSION] + ([kv_cache] if kv_cache else [])   # (older builds' keys kept)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def build(shape: str, bits: int = 4, context: int = 256, folder: Path | None = None, seed: int = 0,
          config: dict | None = None, progress: bool = True, available: int | None = None,
          kv_cache: str | None = None) -> Path:
    """The artifact for a built-in shape (or `config`), from the cache when it is there and current.
    `context` is the KV cache the bench will allocate (for the memory check); kv_cache: the export's
    --kv-cache (None: its default), a build of its own."""
    if config is None and shape not in SHAPES:
        raise SyntheticError(f"unknown shape {shape!r}; built-in shapes: {', '.join(SHAPES)}")
    if bits not in (4, 8):
        raise SyntheticError(f"--bits must be 4 or 8 for a synthetic model, not {bits}")
    if kv_cache not in (None, "int8", "fp16", "fp32"):
        raise SyntheticError(f"--kv-cache must be int8, fp16 or fp32, not {str(kv_cache)[:20]!r}")
    config = dict(config or SHAPES[shape])
    longest = min(config.get("max_position_embeddings", 4096), DEFAULT_MAX_CONTEXT)   # what export gives it
    if context > longest:
        raise SyntheticError(f"--context must be at most {longest} for {shape} (the context its artifact is exported for)")
    shaped = model_for(config)
    need = shaped.min_onnxruntime(kv_cache or shaped.default_kv_cache)
    if need:        # refused before gigabytes are written, not when the bench loads them
        from edgert.model import ort, ort_version
        if ort_version() < tuple(int(p) for p in need.split(".")):
            raise SyntheticError(f"{shape} needs onnxruntime >= {need} (this is {ort.__version__})")
    out = Path(folder or cache_dir()) / (f"{shape}-int{bits}" + (f"-kv-{kv_cache}" if kv_cache else ""))
    key = _key(config, bits, seed, kv_cache)
    cached = all((out / f).is_file() for f in ("synthetic.json", "edgert.json", "model.onnx.data")) \
        and json.loads((out / "synthetic.json").read_text()).get("key") == key
    data = (out / "model.onnx.data").stat().st_size if cached else weight_bytes(config, Recipe(bits=bits))
    # the same estimate as the runtime's check before loading (edgert/device.py)
    need = int(data * WEIGHT_FACTOR) + kv_cache_bytes(config, context, kv_cache) + RUNTIME_BYTES
    check_fits(shape, need, 0 if cached else data, out.parent, available)
    if cached:
        return out
    if (out / "synthetic.json").is_file():    # a stale build: its stamp is this module's, not an export's (which
        (out / "synthetic.json").unlink()     # --force would refuse to replace)
    with tempfile.TemporaryDirectory(prefix=".synthetic-src-", dir=out.parent) as src:
        src = Path(src)    # the exporter copies config and tokenizer from a folder; the weights come from the source
        (src / "config.json").write_text(json.dumps(config, indent=2))
        (src / "generation_config.json").write_text(json.dumps(
            {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}))
        shutil.copyfile(BUNDLED_MODEL / "tokenizer.json", src / "tokenizer.json")   # any tokenizer: bench needs none
        # random codes need no calibration pass (the recipe only decides how real weights are rounded)
        export(src, out, bits=bits, force=True, progress=progress, recipe="rtn", checkpoint=SyntheticCheckpoint(config, seed),
               kv_cache=kv_cache)
    (out / "synthetic.json").write_text(json.dumps({"shape": shape, "bits": bits, "seed": seed, "key": key,
                                                    **({"kv_cache": kv_cache} if kv_cache else {})}) + "\n")
    return out
