"""Every built-in synthetic shape's code path at its REAL vocabulary size (the split int8 lm_head
starts at 16,384 rows, so a 512-token toy never reaches it), with tiny hidden sizes; and the bench
command itself on a full-size shape, as a user runs it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from edgert.model import Model
from edgert_export.decoder import Decoder
from edgert_export.graph import Recipe
from edgert_export.synthetic import SHAPES, SyntheticError, build, weight_bytes

TINY_DIMS = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def tiny(shape: str, heads: int = 4) -> dict:
    """The shape's config with small dimensions and everything else real: vocabulary, tying, type,
    expert count and top-k, explicit head_dim (scaled to 64 / heads), kv heads (GQA or not). heads 2:
    32-wide heads, which get the int8 KV cache (narrower ones get fp16: Decoder.default_kv_cache)."""
    c = dict(SHAPES[shape], **{**TINY_DIMS, "num_attention_heads": heads})
    full = SHAPES[shape]
    c["num_key_value_heads"] = heads if full["num_key_value_heads"] == full["num_attention_heads"] else heads // 2
    if "head_dim" in full:
        c["head_dim"] = 64 // heads if "linear_num_key_heads" not in full else 32    # Qwen3.5: a quarter of it rotates
    if "full_attn_idxs" in full:                     # LFM2: a conv layer, then attention
        c["full_attn_idxs"] = [1]
    if "linear_num_key_heads" in full:               # Qwen3.5: a Gated DeltaNet layer, then attention
        c.update(full_attention_interval=2, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
                 linear_value_head_dim=16)
    scaling = full.get("rope_scaling") or {}
    if "short_factor" in scaling:       # LongRoPE: one factor per rotated pair of the smaller head
        hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        pairs = int(hd * c.get("partial_rotary_factor", 1.0)) // 2
        c["rope_scaling"] = dict(scaling, short_factor=[1.0] * pairs, long_factor=[1.0] * pairs)
    return c


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shape_builds_and_runs_at_its_real_vocabulary(shape, tmp_path):
    config = tiny(shape)
    assert config["vocab_size"] >= Decoder.split_head_min_vocab          # all of them take the split-head path
    art = build(shape, 4, folder=tmp_path, config=config, progress=False)
    manifest = json.loads((art / "edgert.json").read_text())
    assert manifest["quantization"]["lm_head_int8_candidates"] == Decoder.lm_head_candidates
    assert manifest["quantization"]["lm_head"] == 8
    model = Model(art, context=64)
    model.track_experts()
    ids = [int(i) for i in np.random.default_rng(0).integers(0, config["vocab_size"], 24)]
    logits = model.forward(ids, num_logits=len(ids))
    assert logits.shape == (len(ids), config["vocab_size"]) and np.isfinite(logits).all()
    # the random int8 planes give logits of the spread the random weights imply: not zero, not huge
    assert 0.005 < float(logits.std()) < 5, float(logits.std())
    step = model.forward([ids[-1]])[-1]
    assert np.isfinite(step).all()
    if "num_experts" in config:
        assert (model.expert_counts > 0).sum() >= config["num_experts"] // 2, model.expert_counts


def test_a_synthetic_int8_cache_gets_the_kv8gqa_graph_a_real_export_has(tmp_path):
    """No calibration pass, yet the int8 cache's per-channel scales (synthetic.kv_ranges): the artifact has
    the kv8gqa graph of a calibrated export, which onnxruntime >= 1.27 runs by default, so `bench
    --synthetic` times what a user's export runs (before, the standard-op int8 graph). The ranges
    fit the random weights: both graphs within 5% of the same weights with an fp32 cache (1.3%
    measured; all ranges 10x too small clip, 43%; 30x too large, 21%). Random weights attend almost
    uniformly, so it is the values' ranges that move the logits here, not the keys'."""
    from edgert.model import KV8GQA_SINCE, ort_version
    from edgert_export.artifact import BUNDLED_MODEL, export
    from edgert_export.synthetic import SyntheticCheckpoint
    config = tiny("qwen2.5-0.5b", heads=2)         # 32-wide heads: the int8 cache
    art = build("qwen2.5-0.5b", 4, folder=tmp_path, config=config, progress=False)
    manifest = json.loads((art / "edgert.json").read_text())
    q = manifest["quantization"]
    assert q["kv_cache"] == "int8" and q["kv_scales"] == "per-channel" and "calibration" not in q
    assert "kv8gqa" in manifest["graphs"]
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    shutil.copyfile(BUNDLED_MODEL / "tokenizer.json", src / "tokenizer.json")
    export(src, tmp_path / "fp32-cache", bits=4, recipe="rtn", checkpoint=SyntheticCheckpoint(config),
           kv_cache="fp32", progress=False)
    ids = [int(i) for i in np.random.default_rng(1).integers(0, config["vocab_size"], 24)]
    ref = Model(tmp_path / "fp32-cache", context=64).forward(ids, num_logits=len(ids))
    graphs = ["default"] + (["kv8gqa"] if ort_version() >= KV8GQA_SINCE else [])
    assert Model(art, context=64).strategy == graphs[-1]
    for graph in graphs:
        got = Model(art, context=64, strategy=graph).forward(ids, num_logits=len(ids))
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert rel < 0.05, (graph, rel)


def test_a_synthetic_build_takes_the_kv_cache_asked_for(tmp_path):
    """`bench --synthetic SHAPE --kv-cache fp16`: a build of its own beside the default's (int8),
    with that cache, the folded decode's headroom, and the same logits as the int8 build within the
    int8 cache's rounding; a bad value and --kv-cache without --synthetic are one line each."""
    config = tiny("qwen2.5-0.5b", heads=2)
    base = build("qwen2.5-0.5b", 4, folder=tmp_path, config=config, progress=False)
    half = build("qwen2.5-0.5b", 4, folder=tmp_path, config=config, progress=False, kv_cache="fp16")
    assert half != base and half.name == "qwen2.5-0.5b-int4-kv-fp16"
    assert build("qwen2.5-0.5b", 4, folder=tmp_path, config=config, progress=False, kv_cache="fp16") == half   # cached
    m = {a: json.loads((a / "edgert.json").read_text()) for a in (base, half)}
    assert m[base]["quantization"]["kv_cache"] == "int8" and m[half]["quantization"]["kv_cache"] == "fp16"
    assert m[half]["model"]["kv_headroom"] > 0 and "kv_headroom" not in m[base]["model"]
    ids = list(range(1, 25))
    a, b = (Model(x, context=64).forward(ids, num_logits=len(ids)) for x in (base, half))
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.05
    with pytest.raises(SyntheticError, match="--kv-cache must be int8, fp16 or fp32"):
        build("qwen2.5-0.5b", 4, folder=tmp_path, config=config, progress=False, kv_cache="fp8")
    for args, said in ((["--synthetic", "qwen2.5-0.5b", "--kv-cache", "fp8"], "--kv-cache must be int8, fp16 or fp32"),
                       ([str(base), "--kv-cache", "fp16"], "--kv-cache applies to --synthetic models only")):
        r = subprocess.run([sys.executable, "-m", "edgert.cli", "bench", *args], capture_output=True, text=True,
                           cwd=ROOT, timeout=120, env=dict(os.environ, EDGERT_SYNTHETIC_DIR=str(tmp_path)))
        assert r.returncode == 1 and said in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shape_with_the_int8_cache_builds_and_runs_its_kv8gqa_graph(shape, tmp_path):
    """The synthetic int8-cache ranges across every family's attention (MoE, hybrid, sliding window,
    partial rotary, sinks): the artifact has per-channel scales, a kv8gqa twin of each graph, and
    the graph the runtime picks runs at the shape's real vocabulary."""
    from edgert.model import KV8GQA_SINCE, ort_version
    config = tiny(shape, heads=2)
    art = build(shape, 4, folder=tmp_path, config=config, progress=False)
    manifest = json.loads((art / "edgert.json").read_text())
    assert manifest["quantization"]["kv_cache"] == "int8" and manifest["quantization"]["kv_scales"] == "per-channel"
    graphs = manifest["graphs"]
    assert all(("kv8gqa" if n == "default" else f"{n}+kv8gqa") in graphs for n in graphs if not n.endswith("kv8gqa"))
    model = Model(art, context=64)
    assert model.strategy.endswith("kv8gqa") == (ort_version() >= KV8GQA_SINCE)
    logits = model.forward(list(range(1, 9)), num_logits=8)
    assert np.isfinite(logits).all() and 0.005 < float(logits.std()) < 5, float(logits.std())


def test_bench_cli_on_a_full_size_synthetic_shape(tmp_path):
    """The command of the bug report: `edgert bench --synthetic qwen2.5-0.5b --bits 4` (151,936-token
    tied int8 table stored as split planes), built from scratch and run, in a fresh process.
    On a disk too small for its 0.4 GiB the command must refuse in one line and leave nothing behind
    (checked), and the full run is skipped with the numbers."""
    env = dict(os.environ, EDGERT_SYNTHETIC_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "edgert.cli", "bench", "--synthetic", "qwen2.5-0.5b", "--bits", "4",
           "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "1", "--threads", "2", "--json"]
    need = weight_bytes(SHAPES["qwen2.5-0.5b"], Recipe(bits=4))
    free = shutil.disk_usage(tmp_path).free
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert "Traceback" not in r.stderr
    if free < need + 2**28:         # the refusal (or a build that fit after all) in a quarter GiB of slack
        if r.returncode:
            assert r.returncode == 1 and r.stderr.count("\n") == 1 and "GiB of disk" in r.stderr, r.stderr
            assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())
            pytest.skip(f"the full-size build needs {need / 2**30:.2f} GiB of disk; {free / 2**30:.2f} GiB is free "
                        "(its one-line refusal was checked instead)")
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert result["synthetic"] == "qwen2.5-0.5b"
    assert result["decode_tok_s"] > 0 and result["prefill_tok_s"] > 0
    manifest = json.loads((tmp_path / "qwen2.5-0.5b-int4" / "edgert.json").read_text())
    assert manifest["quantization"]["lm_head_int8_candidates"] == Decoder.lm_head_candidates
    assert manifest["model"]["parameters"] == 494_032_768


def test_a_synthetic_build_that_does_not_fit_the_disk_is_refused_in_one_line(tmp_path, monkeypatch):
    """The disk check itself, whatever this machine's disk: a build bigger than the free space is refused
    before a byte is written."""
    import edgert_export.synthetic as synthetic
    monkeypatch.setattr(synthetic.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    with pytest.raises(SyntheticError, match=r"needs 0\.\d GiB of disk in .* but 0\.0 GiB is free"):
        build("qwen2.5-0.5b", 4, folder=tmp_path, progress=False, available=2**40)
    assert not any(tmp_path.iterdir())
