"""Random-weight Hugging Face checkpoints with real model shapes.

No machine here reaches a model hub, so benchmarks run on checkpoints whose
configs and tensor shapes are those of real models while the weights are
random (normal, std 0.02; RMSNorm weights close to 1).  Speed does not depend
on the weight values, so these are faithful for throughput and memory work.

    make_checkpoint("qwen2.5-0.5b", "/tmp/q05")          # -> Path("/tmp/q05")
    python benchmarks/checkpoints.py qwen2.5-0.5b /tmp/q05

The folder holds what a Hub download holds: config.json,
generation_config.json, model.safetensors (or model-0000x-of-0000y.safetensors
shards plus model.safetensors.index.json once the weights pass 2 GB),
tokenizer.json and tokenizer_config.json (with a ChatML chat template).

Weights are written without torch: float32 from numpy, rounded to bfloat16
(or cast to float16 / kept as float32) and streamed through a small
safetensors writer one chunk at a time, so even the 1.5B shape never sits
whole in memory.  Every tensor has its own random stream seeded from
(seed, tensor name), so the values do not depend on sharding or order.

The tokenizer is a byte-level BPE trained with the `tokenizers` library on a
corpus built into this file, with Qwen2's pre-tokenizer (the same split regex
followed by ByteLevel) and the added tokens <|endoftext|>, <|im_start|>,
<|im_end|>, <think>, </think>.  As in real Qwen checkpoints the config's
vocab_size is larger than the tokenizer's vocabulary; the rows past it are
never produced by the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One architecture.  `config` is written verbatim as config.json
    (token ids are filled in from the tokenizer)."""

    name: str
    config: dict
    real_params: int | None = None  # published parameter count, if a real model
    notes: str = ""


def _qwen2_config(**kw) -> dict:
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "model_type": "qwen2",
        "rms_norm_eps": 1e-06,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
    }
    cfg.update(kw)
    return cfg


def _qwen3_attention(**kw) -> dict:
    """Attention block shared by the qwen3-* shapes."""
    cfg = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "initializer_range": 0.02,
        "max_position_embeddings": 40960,
        "max_window_layers": 12,
        "num_attention_heads": 16,
        "num_hidden_layers": 12,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 32000,
    }
    cfg.update(kw)
    return cfg


def _qwen3_moe_config(num_experts: int) -> dict:
    return _qwen3_attention(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        decoder_sparse_step=1,
        # Dense FFN width that mlp_only_layers would use (none do here).
        intermediate_size=2048,
        mlp_only_layers=[],
        moe_intermediate_size=512,
        norm_topk_prob=True,
        num_experts=num_experts,
        num_experts_per_tok=4,
        output_router_logits=False,
        router_aux_loss_coef=0.001,
    )


# Qwen/Qwen3.5-0.8B's text model, the published numbers (export/synthetic.py has the same shape): 18 Gated
# DeltaNet layers, 6 gated attention layers (every 4th); the text-only layout of the multimodal checkpoint
_QWEN3_5_08B = {
    "architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", "hidden_size": 1024,
    "intermediate_size": 3584, "num_hidden_layers": 24, "num_attention_heads": 8, "num_key_value_heads": 2,
    "head_dim": 256, "linear_num_key_heads": 16, "linear_num_value_heads": 16, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
    "layer_types": ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(24)],
    "vocab_size": 248320, "max_position_embeddings": 262144, "rms_norm_eps": 1e-06,
    "tie_word_embeddings": True, "hidden_act": "silu", "attn_output_gate": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25},
}


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in [
        Shape(
            "qwen2.5-0.5b",
            _qwen2_config(
                hidden_size=896,
                intermediate_size=4864,
                max_position_embeddings=32768,
                max_window_layers=24,
                num_attention_heads=14,
                num_hidden_layers=24,
                num_key_value_heads=2,
                rope_theta=1000000.0,
                sliding_window=32768,
                tie_word_embeddings=True,
                vocab_size=151936,
            ),
            real_params=494_032_768,
            notes="Qwen/Qwen2.5-0.5B(-Instruct)",
        ),
        Shape(
            "r1-distill-qwen-1.5b",
            _qwen2_config(
                hidden_size=1536,
                intermediate_size=8960,
                max_position_embeddings=131072,
                max_window_layers=21,
                num_attention_heads=12,
                num_hidden_layers=28,
                num_key_value_heads=2,
                rope_theta=10000,
                sliding_window=4096,
                tie_word_embeddings=False,
                use_mrope=False,
                vocab_size=151936,
            ),
            real_params=1_777_088_000,
            notes="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        ),
        Shape(
            "qwen3-moe-small",
            _qwen3_moe_config(64),
            notes="Qwen3-MoE layout, 64 experts x 512, top-4",
        ),
        Shape(
            "qwen3-moe-small-8x",
            _qwen3_moe_config(8),
            notes="as qwen3-moe-small with 8 experts: same active parameters",
        ),
        Shape(
            "qwen3-dense-active",
            _qwen3_attention(
                architectures=["Qwen3ForCausalLM"],
                model_type="qwen3",
                intermediate_size=4 * 512,
            ),
            notes="Qwen3 dense with qwen3-moe-small's attention and a 4*512 FFN (same active parameters)",
        ),
        Shape(
            "lfm2.5-1.2b",
            {   # the published config.json's numbers (export/synthetic.py has the same shape)
                "architectures": ["Lfm2ForCausalLM"], "model_type": "lfm2", "hidden_size": 2048,
                "intermediate_size": 12288, "block_ff_dim": 12288, "block_auto_adjust_ff_dim": True,
                "block_ffn_dim_multiplier": 1.0, "block_multiple_of": 256, "num_hidden_layers": 16,
                "num_attention_heads": 32, "num_key_value_heads": 8, "conv_L_cache": 3, "conv_bias": False,
                "layer_types": ["full_attention" if i in (2, 5, 8, 10, 12, 14) else "conv" for i in range(16)],
                "norm_eps": 1e-05, "vocab_size": 65536, "max_position_embeddings": 128000,
                "rope_theta": 1000000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
            },
            real_params=1_170_340_608,
            notes="LiquidAI/LFM2.5-1.2B(-Thinking): 10 gated short-conv layers, 6 GQA layers",
        ),
        Shape(
            "qwen3.5-0.8b",
            _QWEN3_5_08B,
            notes="Qwen/Qwen3.5-0.8B's text model: 18 Gated DeltaNet + 6 attention layers",
        ),
        Shape(
            "qwen3.5-2b",
            {   # the 0.8B layout at Qwen3.5-2B's published sizes (model cards: hidden 2048, FFN 6144, 24 layers,
                # DeltaNet 16 QK / 16 V heads of 128, attention 8 Q / 2 KV heads of 256, rotary 64); its
                # config.json was not reachable here, so the tied table is the 0.8B's choice: 1.88B parameters
                **_QWEN3_5_08B, "hidden_size": 2048, "intermediate_size": 6144,
            },
            notes="Qwen/Qwen3.5-2B's text model (sizes from its model card): 18 Gated DeltaNet + 6 attention layers",
        ),
        Shape(
            "gpt-oss-20b-8x",
            {   # the published config.json's numbers but num_local_experts (32 -> 8): the same 3.6B parameters
                # a token reads (top-4 experts of 2880, the attention, the 201k lm_head), 6.6B in all (13 GB in bf16)
                "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
                "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
                "head_dim": 64, "num_local_experts": 8, "num_experts_per_tok": 4, "experts_per_token": 4,
                "vocab_size": 201088, "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"] * 12,
                "max_position_embeddings": 131072, "rope_theta": 150000.0,
                "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "original_max_position_embeddings": 4096, "truncate": False},
                "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "attention_bias": True, "attention_dropout": 0.0,
                "swiglu_limit": 7.0, "hidden_act": "silu", "initial_context_length": 4096, "router_aux_loss_coef": 0.9,
                "output_router_logits": False, "use_cache": True,
                "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
            },
            notes="openai/gpt-oss-20b with 8 of its 32 experts per layer: the same top-4 decode reads",
        ),
    ]
}


def gpt_oss_specs(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """gpt-oss as the hub stores it: attention with biases and one sink per head, a router with a bias,
    the experts in MXFP4 (per expert, the linear's [out, in] rows as blocks of 32 4-bit floats, 16 bytes,
    and one power-of-two exponent per block, + 127; gate/up rows interleaved) with bf16 biases."""
    h, nh, nkv, hd, v = (config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                             "vocab_size"))
    e, inter = config["num_local_experts"], config["intermediate_size"]
    specs = [("model.embed_tokens.weight", (v, h), "weight")]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs.append((p + "input_layernorm.weight", (h,), "norm"))
        for proj, rows, cols in (("q_proj", nh * hd, h), ("k_proj", nkv * hd, h), ("v_proj", nkv * hd, h),
                                 ("o_proj", h, nh * hd)):
            specs += [(p + f"self_attn.{proj}.weight", (rows, cols), "weight"), (p + f"self_attn.{proj}.bias", (rows,), "bias")]
        specs += [(p + "self_attn.sinks", (nh,), "bias"), (p + "post_attention_layernorm.weight", (h,), "norm"),
                  (p + "mlp.router.weight", (e, h), "weight"), (p + "mlp.router.bias", (e,), "bias"),
                  (p + "mlp.experts.gate_up_proj_blocks", (e, 2 * inter, h // 32, 16), "mxfp4_blocks"),
                  (p + "mlp.experts.gate_up_proj_scales", (e, 2 * inter, h // 32), "mxfp4_scales"),
                  (p + "mlp.experts.gate_up_proj_bias", (e, 2 * inter), "bias"),
                  (p + "mlp.experts.down_proj_blocks", (e, h, inter // 32, 16), "mxfp4_blocks"),
                  (p + "mlp.experts.down_proj_scales", (e, h, inter // 32), "mxfp4_scales"),
                  (p + "mlp.experts.down_proj_bias", (e, h), "bias")]
    specs += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (v, h), "weight")]
    return specs


def meta_specs(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """Any other model_type: the names and shapes transformers gives its model (built on the meta
    device: no memory). Qwen3.5 stores its RMSNorm weights as w for 1 + w: those start near 0."""
    import torch
    import transformers
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    one_plus = config["model_type"].startswith("qwen3_5")
    specs = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        norm = t.dim() == 1 and "norm" in name and not (one_plus and "linear_attn.norm" not in name)
        specs.append((name, tuple(t.shape), "norm" if norm else "bias" if t.dim() == 1 else "weight"))
    return specs


def lfm2_ffn_dim(config: dict) -> int:
    """LFM2's FFN width (block_ff_dim, auto-adjusted to 2/3 of it rounded up to block_multiple_of): the
    exporter's own rule, so the checkpoint holds what the export expects."""
    from edgert_export.archs.lfm2 import Model
    return Model(config).ffn_dim


def lfm2_specs(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """LFM2 in Hugging Face naming: conv blocks (in_proj to B, C, x; depthwise conv; out_proj) or
    GQA with q/k layernorms, then the SwiGLU feed_forward (w1, w3, w2)."""
    h, nh, nkv, v = (config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size"))
    hd, ffn = h // nh, lfm2_ffn_dim(config)
    specs = [("model.embed_tokens.weight", (v, h), "weight")]
    for i, kind in enumerate(config["layer_types"]):
        p = f"model.layers.{i}."
        specs.append((p + "operator_norm.weight", (h,), "norm"))
        if kind == "conv":
            specs += [(p + "conv.in_proj.weight", (3 * h, h), "weight"),
                      (p + "conv.conv.weight", (h, 1, config["conv_L_cache"]), "weight"),
                      (p + "conv.out_proj.weight", (h, h), "weight")]
        else:
            specs += [(p + "self_attn.q_proj.weight", (nh * hd, h), "weight"),
                      (p + "self_attn.k_proj.weight", (nkv * hd, h), "weight"),
                      (p + "self_attn.v_proj.weight", (nkv * hd, h), "weight"),
                      (p + "self_attn.out_proj.weight", (h, nh * hd), "weight"),
                      (p + "self_attn.q_layernorm.weight", (hd,), "norm"),
                      (p + "self_attn.k_layernorm.weight", (hd,), "norm")]
        specs += [(p + "ffn_norm.weight", (h,), "norm"), (p + "feed_forward.w1.weight", (ffn, h), "weight"),
                  (p + "feed_forward.w3.weight", (ffn, h), "weight"), (p + "feed_forward.w2.weight", (h, ffn), "weight")]
    specs.append(("model.embedding_norm.weight", (h,), "norm"))
    return specs


def tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) for every tensor of a Qwen2/Qwen3/Qwen3-MoE
    checkpoint, in Hugging Face naming.  kind is "weight", "bias" or "norm"."""
    mt = config["model_type"]
    if mt == "lfm2":
        return lfm2_specs(config)
    if mt == "gpt_oss":
        return gpt_oss_specs(config)
    if mt not in ("qwen2", "qwen3", "qwen3_moe"):
        return meta_specs(config)
    h = config["hidden_size"]
    nh = config["num_attention_heads"]
    nkv = config["num_key_value_heads"]
    hd = config.get("head_dim") or h // nh
    v = config["vocab_size"]
    specs: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (v, h), "weight")]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs.append((p + "input_layernorm.weight", (h,), "norm"))
        for proj, rows in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
            specs.append((p + f"self_attn.{proj}.weight", (rows, h), "weight"))
            if mt == "qwen2" or config.get("attention_bias"):
                specs.append((p + f"self_attn.{proj}.bias", (rows,), "bias"))
        specs.append((p + "self_attn.o_proj.weight", (h, nh * hd), "weight"))
        if config.get("attention_bias"):
            specs.append((p + "self_attn.o_proj.bias", (h,), "bias"))
        if mt in ("qwen3", "qwen3_moe"):
            specs.append((p + "self_attn.q_norm.weight", (hd,), "norm"))
            specs.append((p + "self_attn.k_norm.weight", (hd,), "norm"))
        specs.append((p + "post_attention_layernorm.weight", (h,), "norm"))
        sparse = (
            mt == "qwen3_moe"
            and i not in config.get("mlp_only_layers", [])
            and config.get("num_experts", 0) > 0
            and (i + 1) % config.get("decoder_sparse_step", 1) == 0
        )
        if sparse:
            e, mi = config["num_experts"], config["moe_intermediate_size"]
            specs.append((p + "mlp.gate.weight", (e, h), "weight"))
            for j in range(e):
                q = p + f"mlp.experts.{j}."
                specs += [
                    (q + "gate_proj.weight", (mi, h), "weight"),
                    (q + "up_proj.weight", (mi, h), "weight"),
                    (q + "down_proj.weight", (h, mi), "weight"),
                ]
        else:
            fi = config["intermediate_size"]
            specs += [
                (p + "mlp.gate_proj.weight", (fi, h), "weight"),
                (p + "mlp.up_proj.weight", (fi, h), "weight"),
                (p + "mlp.down_proj.weight", (h, fi), "weight"),
            ]
    specs.append(("model.norm.weight", (h,), "norm"))
    if not config.get("tie_word_embeddings", False):
        specs.append(("lm_head.weight", (v, h), "weight"))
    return specs


# Parameters per stored element, where not one: an MXFP4 byte holds two, its exponents are none
_PARAMS_PER_ELEMENT = {"mxfp4_blocks": 2, "mxfp4_scales": 0}


def param_count(config: dict) -> int:
    return sum(int(np.prod(s)) * _PARAMS_PER_ELEMENT.get(kind, 1) for _, s, kind in tensor_specs(config))


def active_param_count(config: dict) -> int:
    """Parameters touched per token (MoE: router + top-k experts only)."""
    total = 0
    for name, s, kind in tensor_specs(config):
        n = int(np.prod(s)) * _PARAMS_PER_ELEMENT.get(kind, 1)
        if ".mlp.experts." in name:
            n = n * config["num_experts_per_tok"] // (config.get("num_experts") or config["num_local_experts"])
        total += n
    return total


# --------------------------------------------------------------------------
# safetensors writer (streaming)
# --------------------------------------------------------------------------

_DTYPES = {
    # name: (safetensors dtype, bytes per element)
    "bfloat16": ("BF16", 2),
    "float16": ("F16", 2),
    "float32": ("F32", 4),
}
_CHUNK = 1 << 22  # elements generated per step
SHARD_BYTES = 2_000_000_000  # shard once the weights pass 2 GB


def _encode(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "float32":
        return x.astype("<f4", copy=False).tobytes()
    if dtype == "float16":
        return x.astype("<f2").tobytes()
    # bfloat16: round-to-nearest-even on the upper 16 bits of the float32.
    u = x.astype(np.float32, copy=False).view(np.uint32)
    u = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    return u.astype("<u2").tobytes()


def _tensor_chunks(name: str, shape: tuple[int, ...], kind: str, seed: int, dtype: str):
    n = int(np.prod(shape))
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    done = 0
    while done < n:
        m = min(_CHUNK, n - done)
        done += m
        if kind == "mxfp4_blocks":      # any two 4-bit float codes per byte
            yield rng.integers(0, 256, m, dtype=np.uint8).tobytes()
            continue
        if kind == "mxfp4_scales":      # 2^-8..2^-6 x codes up to 6: values of the other weights' size
            yield rng.integers(119, 122, m, dtype=np.uint8).tobytes()
            continue
        x = rng.standard_normal(m, dtype=np.float32)
        x *= np.float32(0.02)
        if kind == "norm":
            x += np.float32(1.0)
        yield _encode(x, dtype)


def _stored(kind: str, dtype: str) -> tuple[str, int]:
    """(safetensors dtype, bytes per element) of a tensor of this kind."""
    return ("U8", 1) if kind.startswith("mxfp4") else _DTYPES[dtype]


def _write_safetensors(path: Path, specs, seed: int, dtype: str) -> int:
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape, kind in specs:
        st_dtype, width = _stored(kind, dtype)
        nbytes = int(np.prod(shape)) * width
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for name, shape, kind in specs:
            for chunk in _tensor_chunks(name, shape, kind, seed, dtype):
                f.write(chunk)
    tmp.replace(path)
    return off


def write_weights(out_dir: Path, config: dict, seed: int, dtype: str, shard_bytes: int = SHARD_BYTES) -> None:
    specs = tensor_specs(config)
    sizes = [int(np.prod(s)) * _stored(kind, dtype)[1] for _, s, kind in specs]
    total = sum(sizes)
    if total <= shard_bytes:
        _write_safetensors(out_dir / "model.safetensors", specs, seed, dtype)
        return
    shards: list[list] = [[]]
    acc = 0
    for spec, size in zip(specs, sizes):
        if shards[-1] and acc + size > shard_bytes:
            shards.append([])
            acc = 0
        shards[-1].append(spec)
        acc += size
    weight_map = {}
    for k, group in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out_dir / fname, group, seed, dtype)
        weight_map.update({name: fname for name, _, _ in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

# Qwen2's pre-tokenizer split pattern (the GPT-4-style regex with single digits).
QWEN2_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]
TOKENIZER_VOCAB = 8192  # upper bound on learned tokens (bytes + merges)

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_PROSE = """\
An on-device runtime turns a trained language model into a program that answers on a laptop or a phone.
The model is exported once: its matrices are quantized to four or eight bits, grouped in blocks of thirty-two
values that share one scale, and the graph is written out so that a small engine can run it without Python.
When a prompt arrives the engine first reads every token of it in one pass, which is called prefill; then it
produces one token at a time, which is called decode. Prefill is limited by arithmetic, decode by memory:
each new token has to stream every weight from memory once, so a model of half a billion parameters stored in
four bits moves about a quarter of a gigabyte for every word it writes.
The key and value cache grows with the conversation. Grouped-query attention keeps it small by letting several
query heads share one key head. Rotary position embeddings rotate the queries and keys by an angle that grows
with the position, and the base of that rotation, theta, sets how quickly the angle turns.
A mixture of experts replaces the feed-forward block with many smaller ones and a router that picks a few of
them for every token. The model then holds many parameters but touches only some of them per token, so it can
decode quickly while knowing more. The router's scores are normalized over the chosen experts before the
outputs are mixed.
People ask such assistants about the weather, recipes, train times, the meaning of a word, how to fix a bicycle
chain, why the sky is blue, what year a bridge was built, or how to write a polite letter to a landlord.
Good answers are short, correct and kind. When the model is unsure it should say so, and when a question needs
a calculation it should show the steps: 12 times 7 is 84, half of 84 is 42, and 42 plus 8 is 50.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. Sphinx of black quartz,
judge my vow. How vexingly quick daft zebras jump!
"""

_CODE = """\
def softmax(x):
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    return [v / s for v in e]

for i in range(10):
    print(f"step {i}: loss={1.0 / (i + 1):.4f}")

class Cache:
    def __init__(self, layers, heads, dim):
        self.k = [[None] * heads for _ in range(layers)]
        self.v = [[None] * heads for _ in range(layers)]

if __name__ == "__main__":
    import json, sys
    config = json.load(open(sys.argv[1]))
    print(config["hidden_size"], config["num_hidden_layers"])
"""

_WORDS = (
    "the a an of to in and or but for with on at by from as is are was were be been being have has had do does "
    "did will would can could should may might must shall not no yes this that these those it its they them their "
    "we us our you your he she his her i me my one two three four five six seven eight nine ten hundred thousand "
    "time year day week month hour minute second people person man woman child world life hand part place case "
    "point group number system program question work government company problem fact water money story example "
    "family house country city state school student teacher book word name page line model token layer weight "
    "matrix vector memory cache thread core phone laptop engine runtime speed answer prompt expert router head "
    "attention query key value position angle block scale bit byte file folder graph node input output batch "
    "good new first last long great little own other old right big high different small large next early young "
    "important few public bad same able fast slow quick simple clear short correct kind "
    "make go know take see come think look want give use find tell ask seem feel try leave call run read write "
    "build load save test measure compare quantize export decode prefill stream route mix choose keep turn grow "
    "very often always never sometimes again still also just only even now then here there when where why how "
    "what which who because while after before during until about between into through over under above below"
).split()


def tokenizer_corpus(n_sentences: int = 6000, seed: int = 1234) -> list[str]:
    """Deterministic training text: the prose and code above plus sentences
    drawn from a fixed word list with numbers and punctuation."""
    rng = random.Random(seed)
    lines = _PROSE.splitlines() + _CODE.splitlines()
    punct = [".", ".", ".", ",", "?", "!", ";", ":"]
    for _ in range(n_sentences):
        k = rng.randint(4, 18)
        words = [rng.choice(_WORDS) for _ in range(k)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 100000)))
        if rng.random() < 0.15:
            words.insert(rng.randrange(len(words)), f"{rng.random() * 100:.2f}")
        s = " ".join(words)
        s = s[0].upper() + s[1:] + rng.choice(punct)
        if rng.random() < 0.1:
            s = f'"{s}"'
        lines.append(s)
    return [ln for ln in lines if ln] + [_PROSE, _CODE] * 20


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE `tokenizers.Tokenizer` with Qwen2's pre-tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZER_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tok


def write_tokenizer(out_dir: Path, model_max_length: int) -> dict[str, int]:
    """Write tokenizer.json / tokenizer_config.json; return the added-token ids."""
    tok = build_tokenizer()
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + THINK_TOKENS}
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t, i in ids.items()
    }
    tcfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    return ids


# --------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------


def make_checkpoint(shape: str, out_dir, seed: int = 0, dtype: str = "bfloat16") -> Path:
    """Write a random-weight Hugging Face checkpoint of `shape` into out_dir."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(_DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()
    config = dict(SHAPES[shape].config)
    ids = write_tokenizer(out, config["max_position_embeddings"])
    eot, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    if im_end >= config["vocab_size"]:
        raise AssertionError("tokenizer does not fit the config's vocab")
    config.update(bos_token_id=eot, eos_token_id=im_end, torch_dtype=dtype)
    config = dict(sorted(config.items()))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {
        "bos_token_id": eot,
        "do_sample": False,
        "eos_token_id": [im_end, eot],
        "pad_token_id": eot,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_weights(out, config, seed, dtype)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    a = ap.parse_args(argv)
    cfg = SHAPES[a.shape].config
    out = make_checkpoint(a.shape, a.out_dir, seed=a.seed, dtype=a.dtype)
    print(f"{a.shape}: {param_count(cfg):,} parameters ({active_param_count(cfg):,} active) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
