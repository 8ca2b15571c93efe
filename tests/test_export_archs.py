"""The 2025-26 dense families (SmolLM3, Phi-3/4-mini, Gemma 3) vs transformers fp32: logits within
1e-3 and identical greedy tokens at fp32, on prompts longer than their sliding windows and past
LongRoPE's switch length; int8/int4 within the bounds of test_export_dense.py."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from conftest import ROOT, hf_greedy, hf_logits, hf_model, make_checkpoint, runtime_greedy
from edgert.model import Model
from test_export_moe import CONFIGS as MOE_CONFIGS
from test_onnxruntime_versions import same_choices

SHORT = [1, 403, 407, 261, 378, 290, 300, 11, 57, 490, 5, 77, 12]
LONG = [1, *np.random.default_rng(7).integers(3, 512, 59).tolist()]      # 60 tokens: past every window below

CONFIGS = {
    # every 4th layer without rotary (no_rope_layers), tied embeddings
    "smollm3": ("smollm3", dict(num_hidden_layers=4, tie_word_embeddings=True, pad_token_id=0)),
    # + sliding window 8 on the NoPE layers (use_sliding_window)
    "smollm3-window": ("smollm3", dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=8, pad_token_id=0)),
    # Phi-4-mini's layout: rotary over 0.75 of each head, LongRoPE switching at 32 positions (< LONG, and
    # crossed while decoding from SHORT)
    "phi3-longrope-partial": ("phi3", dict(partial_rotary_factor=0.75, original_max_position_embeddings=32,
                                           pad_token_id=0, rope_scaling=dict(
                                               rope_type="longrope", short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                               long_factor=[1.0, 1.5, 3.0, 5.0, 8.0, 12.0]))),
    # Phi-3-mini's: full rotary, multi-head, a sliding window over every layer
    "phi3-window": ("phi3", dict(num_key_value_heads=4, sliding_window=8, pad_token_id=0)),
    # ERNIE-4.5-0.3B: interleaved rotary pairs, explicit head_dim, tied
    "ernie4_5": ("ernie4_5", dict(head_dim=32, tie_word_embeddings=True, pad_token_id=0)),
    # Gemma 3 1B's layout in small: local layers (window 8, theta 10k) and a global one (theta 1M, linear
    # scaling), head_dim 32 != hidden / heads, one KV head, tied embeddings, final logit soft-capping
    "gemma3": ("gemma3_text", dict(num_hidden_layers=3, head_dim=32, num_key_value_heads=1, sliding_window=8,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                   query_pre_attn_scalar=24, final_logit_softcapping=5.0, tie_word_embeddings=True,
                                   rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1e6),
                                                    "sliding_attention": dict(rope_type="default", rope_theta=1e4)})),
    # Gemma 3 4B+'s multimodal checkpoint (an image tower beside the text model, its own weight names), untied
    "gemma3-multimodal": ("gemma3", dict(tie_word_embeddings=False, mm_tokens_per_image=4, text_config=dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=512, max_position_embeddings=256, sliding_window=8, rms_norm_eps=1e-6, pad_token_id=0,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2), vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14))),
    # the hub's older config keys: rope_theta + rope_local_base_freq, sliding_window_pattern
    "gemma3-hub-config": ("gemma3_text", dict(num_hidden_layers=2, head_dim=16, sliding_window=8, pad_token_id=0,
                                              sliding_window_pattern=2, rope_theta=5e5, rope_local_base_freq=2e4)),
}


def gemma_norms(model):
    """Gemma multiplies by (1 + w): centre the random norm weights on 0, as trained ones are."""
    if model.config.model_type.startswith("gemma"):
        for name, p in model.named_parameters():
            if "norm" in name:
                p.sub_(1.0)


def hub_style(path):
    """Rewrite a Gemma 3 config.json as the hub's files have it (transformers 5 writes rope_parameters
    per layer type and layer_types; the hub has rope_theta, rope_local_base_freq and a pattern)."""
    c = json.loads(path.read_text())
    rope = c.pop("rope_parameters")
    c.pop("layer_types")
    c.update(rope_theta=rope["full_attention"]["rope_theta"], rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
             sliding_window_pattern=2)
    path.write_text(json.dumps(c))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    model_type, overrides = CONFIGS[request.param]
    src = make_checkpoint(tmp_path_factory.mktemp(request.param), model_type, tweak=gemma_norms, **overrides)
    if request.param.endswith("hub-config"):
        hub_style(src / "config.json")
    return request.param, src, hf_model(src)


def test_fp32_matches_transformers(case, exported):
    name, src, ref = case
    model = Model(exported(src, 32))
    assert model.manifest["model"].get("longrope_switch") == (32 if name == "phi3-longrope-partial" else None)
    for prompt in (SHORT, LONG):
        model.reset()
        want = hf_logits(ref, prompt)
        err = np.abs(model.forward(prompt, num_logits=len(prompt)) - want).max()
        print(f"\n{name} fp32, {len(prompt)} tokens: max |logit error| {err:.2e}")
        assert err < 1e-3
    # decode one token at a time against the cache (past the window and the LongRoPE switch), then a
    # chunk on top of a cache
    assert runtime_greedy(model, SHORT, 40) == hf_greedy_cached(ref, SHORT, 40)
    if not name.startswith("phi3-longrope"):
        assert runtime_greedy(model, SHORT, 40) == hf_greedy(ref, SHORT, 40)
    model.reset()
    model.forward(LONG[:21])
    assert np.abs(model.forward(LONG[21:], num_logits=len(LONG) - 21) - hf_chunk_logits(ref, LONG, 21)).max() < 1e-3
    # a short chunk (a speculative verify) on a cache runs folded (graph.Fold: <= 16 tokens after a past)
    model.reset()
    model.forward(LONG[:30])
    assert np.abs(model.forward(LONG[30:42], num_logits=12) - hf_chunk_logits(ref, LONG[:42], 30)).max() < 1e-3


def hf_greedy_cached(ref, ids: list[int], n: int) -> list[int]:
    """Greedy decoding one token at a time on transformers' cache. (Its generate() differs for Phi-3
    LongRoPE: when the sequence first passes the switch length it drops the cache and re-encodes
    everything with the long factors; edgert, like a forward pass with a cache, keeps the keys.)"""
    import torch
    out = []
    with torch.no_grad():
        r = ref(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            out.append(int(r.logits[0, -1].argmax()))
            r = ref(torch.tensor([[out[-1]]]), past_key_values=r.past_key_values, use_cache=True)
    return out


def hf_chunk_logits(ref, ids: list[int], split: int) -> np.ndarray:
    """transformers' logits of ids[split:] on top of its cache of ids[:split] (LongRoPE keeps the
    short rotation of the cached keys when the chunk passes the switch, as edgert does)."""
    import torch
    with torch.no_grad():
        past = ref(torch.tensor([ids[:split]]), use_cache=True).past_key_values
        return ref(torch.tensor([ids[split:]]), past_key_values=past, use_cache=True).logits[0].numpy()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_exports_stay_close(case, exported, bits):
    name, src, ref = case
    got = Model(exported(src, bits)).forward(LONG, num_logits=len(LONG))
    want = hf_logits(ref, LONG)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    agree = (got.argmax(-1) == want.argmax(-1)).mean()
    print(f"\n{name} int{bits}: relative logit error {rel:.3f}, top-1 agreement {agree:.2f}")
    assert rel < (0.05 if bits == 8 else 0.35), rel
    assert agree >= (0.9 if bits == 8 else 0.5), agree


def test_old_onnxruntime_gives_identical_tokens(tmp_path, exported, old_ort_python):
    """Every family on onnxruntime 1.22 (Termux) from the 60-token prompt: past the sliding windows and
    the LongRoPE switch; fp32 identical, int4 the same choices but at near-ties."""
    configs = {**CONFIGS, "ernie4_5_moe": MOE_CONFIGS["ernie4_5_moe"]}      # its plain expert graph there
    cases = [(make_checkpoint(tmp_path / name, configs[name][0], tweak=gemma_norms, **configs[name][1]), bits)
             for name in ("smollm3-window", "phi3-longrope-partial", "gemma3", "ernie4_5_moe") for bits in (32, 4)]
    old, _ = same_choices(old_ort_python, [(str(exported(src, bits)), LONG) for src, bits in cases],
                          exact=[bits == 32 for _, bits in cases])
    assert old["version"].startswith("1.22"), old["version"]
    assert old["strategies"][-1] == "plain"


def test_gpt_oss_on_old_onnxruntime(tmp_path, exported, old_ort_python):
    """gpt-oss's attention sinks: with an fp16 cache they are GroupQueryAttention's head_sink
    (onnxruntime 1.23), and 1.22 says so in one line; the int8 cache's graph (the default for real
    gpt-oss, 64-wide heads) adds them itself, and 1.22 runs it (the plain expert graph) with the same
    tokens as here."""
    name, overrides = MOE_CONFIGS["gpt_oss"]
    src = make_checkpoint(tmp_path / "gpt_oss", name, **overrides)
    old, _ = same_choices(old_ort_python, [(str(exported(src, 4, kv_cache="int8")), list(range(3, 40)))], exact=[False])
    assert old["version"].startswith("1.22") and old["strategies"][-1] == "plain"
    art = exported(src, 4, kv_cache="fp16")
    r = subprocess.run([old_ort_python, "-c", "from edgert.cli import main; main()", "run", str(art), "--raw", "hello"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "edgert: error: this gpt_oss artifact needs onnxruntime >= 1.23 (this is 1.22.1): pip install -U onnxruntime"]


@pytest.mark.parametrize("shape,case,params", [("phi-4-mini", "phi3-longrope-partial", 3_836_021_760),
                                               ("gemma-3-1b", "gemma3", 999_885_952),
                                               ("gpt-oss-20b", "gpt_oss", 20_914_757_184)])
def test_synthetic_bench_shapes(tmp_path, shape, case, params):
    """`edgert bench --synthetic` shapes: the real parameter count, the tensor names and shapes of a
    transformers checkpoint of the family, and a small build of the shape runs."""
    from edgert_export.checkpoint import Checkpoint
    from edgert_export.synthetic import SHAPES, SyntheticCheckpoint, build
    full = SyntheticCheckpoint(SHAPES[shape])
    assert sum(int(np.prod(full.shape(n))) for n in full.names) == params
    model_type, overrides = {**CONFIGS, **MOE_CONFIGS}[case]
    real = Checkpoint(make_checkpoint(tmp_path / "hf", model_type, tweak=gemma_norms, **overrides))
    fake = SyntheticCheckpoint(real.config)
    assert {n: real.shape(n) for n in real.names} == {n: fake.shape(n) for n in fake.names}
    small = dict(SHAPES[shape], num_hidden_layers=2, hidden_size=128, intermediate_size=256, vocab_size=512,
                 num_attention_heads=4, num_key_value_heads=2,   # token ids inside the small vocabulary (export checks them)
                 bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if "num_local_experts" in small:
        small["num_local_experts"] = 4
    if "rope_scaling" in small:      # 12 factors for rotary over 0.75 of a 32-wide head
        small["rope_scaling"] = dict(small["rope_scaling"], short_factor=[1.0] * 12, long_factor=[1.0] * 12)
    logits = Model(build(shape, 4, folder=tmp_path, config=small, progress=False)).forward([1, 2, 3])
    assert logits.shape == (1, 512) and np.isfinite(logits).all()


def test_synthetic_gpt_oss_refused_before_building_on_old_onnxruntime(tmp_path, monkeypatch):
    """A shape that would need a newer onnxruntime is refused before gigabytes are written (gpt-oss
    with a GroupQueryAttention cache; the default int8 cache runs on 1.22)."""
    import edgert.model
    from edgert_export import synthetic
    from edgert_export.decoder import Decoder
    monkeypatch.setattr(edgert.model, "ort_version", lambda: (1, 22))
    monkeypatch.setattr(Decoder, "default_kv_cache", "fp16")
    with pytest.raises(synthetic.SyntheticError, match=r"^gpt-oss-20b needs onnxruntime >= 1\.23 \(this is "):
        synthetic.build("gpt-oss-20b", 4, folder=tmp_path)
    assert not list(tmp_path.iterdir())
    assert synthetic.model_for(synthetic.SHAPES["gpt-oss-20b"]).min_onnxruntime("int8") is None
