"""fp32 export of dense architectures vs transformers fp32: logits within 1e-3, same greedy tokens."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import hf_greedy, hf_logits, hf_model, make_checkpoint, runtime_greedy
from edgert.model import Model

PROMPT = [1, 403, 407, 261, 378, 290, 300, 11, 57, 490, 5, 77, 12]

# Every feature of the dense exporter appears in at least one config.
CONFIGS = {
    "llama-gqa-untied": ("llama", {}),
    "llama-tied-llama3-rope": ("llama", dict(tie_word_embeddings=True, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64))),
    "llama-linear-rope-mha": ("llama", dict(num_key_value_heads=4, rope_scaling=dict(rope_type="linear", factor=2.0))),
    # hidden 80 and FFN 172 are not multiples of the 32-wide quantization block; head_dim 20 needs padding
    "llama-odd-dims": ("llama", dict(hidden_size=80, intermediate_size=172, num_attention_heads=4, num_key_value_heads=1)),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2-yarn": ("qwen2", dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64))),
    # explicit head_dim 32 != hidden / heads (16)
    "qwen3-qknorm-headdim": ("qwen3", dict(head_dim=32, num_attention_heads=4, num_key_value_heads=2)),
    "qwen3-tied": ("qwen3", dict(tie_word_embeddings=True, head_dim=16)),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    model_type, overrides = CONFIGS[request.param]
    src = make_checkpoint(tmp_path_factory.mktemp(request.param), model_type, **overrides)
    return src, hf_model(src)


def test_fp32_logits_and_greedy_match_transformers(case, exported):
    src, ref = case
    model = Model(exported(src, 32))
    logits = model.forward(PROMPT, num_logits=len(PROMPT))
    want = hf_logits(ref, PROMPT)
    assert logits.shape == want.shape
    assert np.abs(logits - want).max() < 1e-3
    # decode one token at a time against the cache, then a chunk on top of a cache
    assert runtime_greedy(model, PROMPT, 24) == hf_greedy(ref, PROMPT, 24)
    model.reset()
    model.forward(PROMPT[:5])
    chunk = model.forward(PROMPT[5:], num_logits=len(PROMPT) - 5)
    assert np.abs(chunk - want[5:]).max() < 1e-3


@pytest.mark.parametrize("dtype,shard", [("bfloat16", None), ("float16", "100KB")])
def test_bf16_fp16_and_sharded_checkpoints(tmp_path, exported, dtype, shard):
    src = make_checkpoint(tmp_path / "ckpt", "qwen2", dtype=dtype, shard=shard, hidden_size=128,
                          intermediate_size=256)
    if shard:
        assert (src / "model.safetensors.index.json").is_file()
    ref = hf_model(src)   # transformers widens the same 16-bit weights to fp32
    model = Model(exported(src, 32))
    assert np.abs(model.forward(PROMPT, num_logits=len(PROMPT)) - hf_logits(ref, PROMPT)).max() < 1e-3


def _safetensors(path, tensors: dict) -> None:
    """name -> (safetensors dtype, array of that dtype's bytes) as one .safetensors file."""
    import json
    import struct
    header, at = {}, 0
    for name, (dtype, a) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [at, at + a.nbytes]}
        at += a.nbytes
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(a.tobytes() for _, a in tensors.values()))


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_checkpoint_linear_reuses_one_buffer_per_shape(tmp_path, dtype):
    """Checkpoint.linear (how the exporter reads gate | up and down): exactly get()'s values stacked,
    written into one buffer per shape that the next layer's call reuses (a fresh layer-sized array
    per layer costs its page faults every time); get() stays a fresh array; a NaN is refused."""
    from edgert_export.checkpoint import Checkpoint, CheckpointError
    rng = np.random.default_rng(0)
    values, tensors = {}, {}
    for i in range(2):
        for part, shape in (("gate", (48, 32)), ("up", (48, 32)), ("down", (32, 48))):
            w = rng.normal(0, 1, shape).astype(np.float32)
            if dtype == "BF16":
                raw = (w.view(np.uint32) >> 16).astype(np.uint16)
                w = (raw.astype(np.uint32) << 16).view(np.float32)
            else:
                raw = w.astype(np.float16 if dtype == "F16" else np.float32)
                w = raw.astype(np.float32)
            values[f"{part}{i}"], tensors[f"{part}{i}"] = w, (dtype, raw)
    tensors["nan"] = (dtype, np.full((4, 32), np.nan, {"BF16": np.float32, "F16": np.float16, "F32": np.float32}[dtype]))
    if dtype == "BF16":
        tensors["nan"] = ("BF16", (tensors["nan"][1].view(np.uint32) >> 16).astype(np.uint16))
    (tmp_path / "config.json").write_text("{}")
    _safetensors(tmp_path / "model.safetensors", tensors)
    ckpt = Checkpoint(tmp_path)
    first = ckpt.linear("gate0", "up0")
    assert first.dtype == np.float32 and np.array_equal(first, np.concatenate([values["gate0"], values["up0"]]))
    down = ckpt.linear("down0")
    assert np.array_equal(down, values["down0"]) and not np.shares_memory(down, first)
    again = ckpt.linear("gate1", "up1")
    assert np.shares_memory(again, first) and np.array_equal(again, np.concatenate([values["gate1"], values["up1"]]))
    assert np.shares_memory(ckpt.linear("down1"), down) and np.array_equal(down, values["down1"])
    fresh = ckpt.get("up1")
    assert np.array_equal(fresh, values["up1"]) and not np.shares_memory(fresh, again)
    with pytest.raises(CheckpointError, match="NaN"):
        ckpt.linear("nan")
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.linear("gate0", "nope")
    ckpt.release()
    assert not np.shares_memory(ckpt.linear("gate0", "up0"), first)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_exports_stay_close(case, exported, bits):
    """Random weights make a harsh test for int4; the bound catches layout bugs (which give ~100% error)."""
    src, ref = case
    model = Model(exported(src, bits))
    got = model.forward(PROMPT, num_logits=len(PROMPT))
    want = hf_logits(ref, PROMPT)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < (0.05 if bits == 8 else 0.35), rel
    agree = (got.argmax(-1) == want.argmax(-1)).mean()
    assert agree >= (0.9 if bits == 8 else 0.5), agree


@pytest.mark.parametrize("config", ["qwen2-bias-tied", "llama-odd-dims"])
def test_int4_embeddings_and_lm_head(tmp_path, exported, config):
    """--embed-bits 4: the int4 lookup must return the same rows the int4 lm_head multiplies by."""
    from edgert_export.quantize import quantize
    model_type, overrides = CONFIGS[config]
    src = make_checkpoint(tmp_path / "c", model_type, **overrides)
    ref = hf_model(src)
    art = exported(src, 4, embed_bits=4)
    got = Model(art).forward(PROMPT, num_logits=len(PROMPT))
    want = hf_logits(ref, PROMPT)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.4
    # the lookup alone: an fp32 graph fed with int4-dequantized embeddings gives the same hidden path
    table = ref.get_input_embeddings().weight.detach().numpy()
    deq = quantize(table, 4, 32).dequantize()
    import torch
    with torch.no_grad():
        ref.get_input_embeddings().weight.copy_(torch.from_numpy(deq))
    closer = hf_logits(ref, PROMPT)
    assert np.linalg.norm(got - closer) < np.linalg.norm(got - want)
