"""The KV cache precision (`edgert export --kv-cache int8|fp16|fp32`, int8 by default for quantized
exports): a quarter (half) of the bytes, the same answers. Against the fp32 cache of the same weights:
perplexity within 0.5% on trained stories260K, the trained reasoning fixture's greedy answers,
logits to fp16's rounding; and against transformers fp32 through the transformers reference."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import BUNDLED_STORIES, ROOT, hf_logits, hf_model, make_checkpoint

sys.path[:0] = [str(ROOT / "fixtures")]
import reasoning_task as task  # noqa: E402

QWEN2 = ROOT / "export" / "data" / "reasoning-qwen2"


def test_default_is_int8_and_fp16_holds_half_the_bytes(exported):
    import edgert
    from edgert.device import kv_bytes
    half, full = exported(QWEN2, bits=4, kv_cache="fp16"), exported(QWEN2, bits=4, kv_cache="fp32")
    assert json.loads((exported(QWEN2, bits=4) / "edgert.json").read_text())["quantization"]["kv_cache"] == "int8"
    assert json.loads((exported(QWEN2, bits=32) / "edgert.json").read_text())["quantization"]["kv_cache"] == "fp32"
    # heads of 8 (stories260K): one scale per 8 codes buys little and costs top-1, so fp16
    assert json.loads((exported(BUNDLED_STORIES, bits=8) / "edgert.json").read_text())["quantization"]["kv_cache"] == "fp16"
    a, b = edgert.load(half, context=256).model, edgert.load(full, context=256).model
    assert a.cache[0].dtype == np.float16 and b.cache[0].dtype == np.float32
    assert sum(c.nbytes for c in a.cache) * 2 == sum(c.nbytes for c in b.cache)
    # a float cache also holds the folded decode's headroom (graph.Fold), which the memory check counts
    room = b.manifest["model"]["kv_headroom"]
    assert room == (b.manifest["model"]["heads"] // b.manifest["model"]["kv_heads"] - 1) * 16 and b.headroom == room
    assert kv_bytes(a.manifest, 256 + room) * 2 == kv_bytes(b.manifest, 256 + room) == sum(c.nbytes for c in b.cache) \
        == b.memory_need.kv


def test_fp16_cache_perplexity_within_half_a_percent_on_stories(exported):
    from edgert.evaluate import evaluate
    ppl = {kv: evaluate(exported(BUNDLED_STORIES, bits=8, kv_cache=kv), window=256)["ppl"] for kv in ("fp32", "fp16")}
    assert abs(ppl["fp16"] / ppl["fp32"] - 1) < 0.005, ppl


@pytest.mark.parametrize("lean", ["fp16", "int8"])
def test_lean_cache_answers_like_the_fp32_cache(exported, lean):
    import edgert
    runs = {}
    for kv in ("fp32", lean):
        llm = edgert.load(exported(QWEN2, bits=4, kv_cache=kv), context=256)
        runs[kv] = ["".join(t.text for t in llm.generate(p.prompt, max_tokens=80, temperature=0))
                    for p in task.held_out_problems()[:24]]
    same = sum(task.extract_answer(a) == task.extract_answer(b) for a, b in zip(runs["fp32"], runs[lean]))
    assert same == 24


def test_fp16_cache_logits_against_transformers(tmp_path, exported):
    """Unquantized weights with an fp16 cache: only the cache's rounding separates the logits from
    transformers fp32 (looser than the fp32 cache's 1e-3, far tighter than any int8 weights)."""
    import edgert
    src = make_checkpoint(tmp_path / "q3", "qwen3", head_dim=16)
    ids = [1, 17, 300, 42, 7, 99, 256, 3, 11]
    ref = hf_logits(hf_model(src), ids)
    for kv, tol in (("fp32", 1e-3), ("fp16", 2e-2)):
        model = edgert.load(exported(src, bits=32, kv_cache=kv), context=64).model
        got = model.forward(ids, num_logits=len(ids))
        err = np.abs(got - ref).max()
        assert err < tol, (kv, err)
        if kv == "fp16":
            assert err > 1e-6                       # the fp16 cache is really in the path


def test_bad_kv_cache_option_is_one_line(tmp_path):
    from typer.testing import CliRunner
    from edgert.cli import app
    r = CliRunner().invoke(app, ["export", str(QWEN2), "-o", str(tmp_path / "x"), "--kv-cache", "int3"])
    assert r.exit_code != 0 and "--kv-cache must be one of fp32, fp16, int8" in r.output
    assert not (tmp_path / "x").exists()


# ---- the int8 cache (graph.int8_cache_attention) ------------------------------------------------

def test_int8_cache_layouts(exported, monkeypatch):
    """The standard-op graph's cache: without calibration (round to nearest) codes and one fp32 scale
    per row and head, (1 + 4 / head_dim) / 2 of fp16's bytes; with it (the default GPTQ export) codes
    only with the calibrated per-channel scales as constants, half of fp16's, exactly 1 byte per
    element on every onnxruntime. The memory check counts what the buffers hold."""
    import onnx
    import edgert
    from edgert.device import kv_bytes
    monkeypatch.setenv("EDGERT_KV8_GRAPH", "ops")      # the standard-op graph (onnxruntime 1.22's)
    half = edgert.load(exported(QWEN2, bits=4, kv_cache="fp16"), context=256).model
    for recipe, per_row in (("rtn", True), ("gptq", False)):
        art = exported(QWEN2, bits=4, kv_cache="int8", recipe=recipe)
        q = json.loads((art / "edgert.json").read_text())["quantization"]
        assert q["kv_cache"] == "int8" and (q.get("kv_scales") == "per-channel") != per_row
        model = edgert.load(art, context=256).model
        assert model.strategy == "default"
        codes = [c for c in model.cache if c.dtype == np.int8]
        scales = [c for c in model.cache if c.dtype != np.int8]
        assert len(codes) == 2 * model.layers and len(scales) == (2 * model.layers if per_row else 0)
        assert all(c.dtype == np.float32 for c in scales)
        assert kv_bytes(model.manifest, 256, model.strategy) == sum(c.nbytes for c in model.cache) == model.memory_need.kv
        d = model.manifest["model"]["head_dim"]
        per_half = sum(c.nbytes for c in half.cache) * 256 / (256 + half.headroom)     # the fp16 cache's headroom aside
        assert model.headroom == 0 and sum(c.nbytes for c in model.cache) / per_half == ((1 + 4 / d) / 2 if per_row else 0.5)
        inputs = [i.name for i in onnx.load(str(art / "model.onnx"), load_external_data=False).graph.input]
        assert any(n.endswith("_scale") for n in inputs) == per_row


@pytest.mark.parametrize("case", ["qwen3", "gemma3-window", "gpt_oss-sinks"])
def test_int8_cache_logits_against_transformers(tmp_path, exported, case):
    """Unquantized weights with an int8 cache against transformers fp32: the cache's rounding only
    (one scale per row and head), on a prompt longer than the sliding windows (gemma3, gpt-oss), and
    decode steps after it; gpt-oss's attention sinks; the same greedy tokens."""
    import edgert
    if case == "qwen3":
        src = make_checkpoint(tmp_path / "q3", "qwen3", head_dim=16)
    elif case == "gpt_oss-sinks":
        src = make_checkpoint(tmp_path / "oss", "gpt_oss", num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                              layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                              tweak=lambda m: [layer.self_attn.sinks.data.normal_(0, 2) for layer in m.model.layers])
    else:
        src = make_checkpoint(tmp_path / "g3", "gemma3_text", num_hidden_layers=3, head_dim=32, num_key_value_heads=1,
                              sliding_window=8, sliding_window_pattern=2, pad_token_id=0)
    ids = [1, 17, 300, 42, 7, 99, 256, 3, 11, 5, 80, 401, 12, 19, 260, 33, 71, 2, 90, 120]
    ref = hf_logits(hf_model(src), ids)
    model = edgert.load(exported(src, bits=32, kv_cache="int8"), context=64).model
    got = np.concatenate([model.forward(ids[:13], num_logits=13)] + [model.forward([t]) for t in ids[13:]])
    err = np.abs(got - ref).max() / np.abs(ref).max()
    # measured 0.0167 / 0.0338 / 0.0069 (the queries rounded to 8 bits for the integer scores; 0.013 / 0.036 /
    # 0.006 with fp32 scores); the query codes' zero point off by one: 0.022 / 0.047 / 0.015; without the
    # window mask 0.39, the sinks 0.75
    bound = {"qwen3": 0.02, "gemma3-window": 0.042, "gpt_oss-sinks": 0.011}[case]
    assert 1e-6 < err < bound, err
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("graph", ["ops", "ops-per-row", "gqa"])
def test_int8_cache_is_the_same_however_it_is_fed(exported, monkeypatch, graph):
    """The new rows are quantized in the graph and written by the runtime at each row's own length
    (ops: the calibrated per-channel scales; ops-per-row: a scale per row, without calibration), or by
    GroupQueryAttention in place (gqa): one prefill, chunks, token by token and a batch of rows of
    different lengths give the same logits."""
    import edgert
    from edgert.model import KV8GQA_SINCE, ort_version
    if graph == "gqa" and ort_version() < KV8GQA_SINCE:
        pytest.skip("GroupQueryAttention's int8 cache needs onnxruntime >= 1.27")
    monkeypatch.setenv("EDGERT_KV8_GRAPH", graph[:3])
    # blocks of 32: there onnxruntime's one-row and many-row int4 kernels agree bitwise; at 64 and 128
    # they differ by float rounding (~1e-7 relative), which can move an int8 code of the cache by one
    art = exported(QWEN2, bits=4, kv_cache="int8", block_size=32, recipe="rtn" if graph == "ops-per-row" else "gptq")
    model = edgert.load(art, context=64).model
    assert model.strategy == {"ops": "default", "gqa": "kv8gqa"}[graph[:3]]
    assert len(model.cache) == (4 if graph == "ops-per-row" else 2) * model.layers
    ids = np.array([1, 403, 407, 261, 378, 300, 17, 42, 99, 5, 6, 7, 8, 9, 10, 11], np.int64)
    model = edgert.load(art, context=64).model
    one = model.forward(ids, num_logits=len(ids))
    model.reset()
    chunks = np.concatenate([model.forward(ids[:5], 5), model.forward(ids[5:11], 6), model.forward(ids[11:], 5)])
    model.reset()
    steps = np.concatenate([model.forward([t]) for t in ids])
    assert np.abs(chunks - one).max() < 1e-4 and np.abs(steps - one).max() < 1e-4
    model.reset()
    assert (model.feed_limit == 512) == (graph == "gqa")      # GroupQueryAttention's scratch bound, or the ops graph's
    model.feed_limit = 5           # a long forward is cut at the model's own bound (the scores' memory)
    runs, run = [], model.session.run_with_iobinding
    model.session.run_with_iobinding = lambda *a, **k: (runs.append(1), run(*a, **k))[1]
    cut = model.forward(ids, num_logits=7)
    assert len(runs) == 4 and cut.shape == (7, one.shape[-1]) and np.abs(cut - one[-7:]).max() < 1e-4
    model.feed_limit = None
    from edgert.model import Model
    batch = Model(art, context=64, slots=2)
    batch.run(0, ids[None, :9], np.array([0]))                      # row 0 holds 9 tokens,
    batch.run(1, ids[None, :4], np.array([0]))                      # row 1 holds 4
    rows = [batch.run(0, ids[None, [9, 4]].T, np.array([9, 4]))]   # then both step together
    assert np.abs(rows[0][0, -1] - one[9]).max() < 1e-4 and np.abs(rows[0][1, -1] - one[4]).max() < 1e-4


@pytest.mark.parametrize("scales", ["per-row", "per-channel-ops", "per-channel-gqa"])
def test_int8_cache_perplexity_on_stories(exported, monkeypatch, scales):
    """stories260K's perplexity with the int8 cache against the fp32 cache, the same weights: a scale
    per row (--bits 8, no calibration), and the calibrated per-channel scales (--bits 4) in both graphs
    (its 8-wide heads: at window 256 measured +0.25% / +1.02% / +0.82%, at 512 the latter two +0.65%;
    +7% when the key ranges paired the wrong channels)."""
    from edgert.evaluate import evaluate
    from edgert.model import KV8GQA_SINCE, ort_version
    if scales.endswith("gqa") and ort_version() < KV8GQA_SINCE:
        pytest.skip("GroupQueryAttention's int8 cache needs onnxruntime >= 1.27")
    monkeypatch.setenv("EDGERT_KV8_GRAPH", scales[-3:])
    bits = 8 if scales == "per-row" else 4
    arts = {kv: exported(BUNDLED_STORIES, bits=bits, kv_cache=kv) for kv in ("fp32", "int8")}
    assert json.loads((arts["int8"] / "edgert.json").read_text())["quantization"].get("kv_scales") == \
        (None if scales == "per-row" else "per-channel")
    ppl = {kv: evaluate(art, window=256)["ppl"] for kv, art in arts.items()}
    assert abs(ppl["int8"] / ppl["fp32"] - 1) < (0.01 if scales == "per-row" else 0.015), ppl


def test_groupqueryattention_feeds_are_cut_too(exported):
    """A GroupQueryAttention artifact's long forward is cut at 512 tokens (its scratch holds the
    chunk's scores: an uncut 8k prompt took 4.5 GB), with the logits of one piece."""
    import edgert
    model = edgert.load(exported(QWEN2, bits=4, kv_cache="fp16"), context=64).model
    assert model.feed_limit == 512
    ids = np.array([1, 403, 407, 261, 378, 300, 17, 42, 99, 5, 6, 7, 8, 9, 10, 11], np.int64)
    one = model.forward(ids, num_logits=len(ids))
    model.reset()
    model.feed_limit = 5
    runs, run = [], model.session.run_with_iobinding
    model.session.run_with_iobinding = lambda *a, **k: (runs.append(1), run(*a, **k))[1]
    cut = model.forward(ids, num_logits=7)
    assert len(runs) == 4 and np.abs(cut - one[-7:]).max() < 1e-4


# ---- the int8 cache in GroupQueryAttention (onnxruntime >= 1.27, the "kv8gqa" twin graphs) -------

def test_int8_cache_scales_cover_every_rotation(exported, tmp_path):
    """The calibration records each key channel's rotary-pair norm (equal for the pair: no rotation
    changes it) and each value channel's largest |value|; the twin's scales are those x
    KV_HEADROOM / 127, per layer and kv head, and an export without calibration has no twin."""
    import onnx
    from edgert_export.decoder import KV_HEADROOM
    from edgert_export.calibrate import sample_self
    from edgert_export.checkpoint import Checkpoint
    from edgert_export.archs import model_for
    ckpt = Checkpoint(QWEN2)
    model = model_for(ckpt.config)
    stats = sample_self(model, ckpt, QWEN2, tmp_path / "probe", tokens=64)
    key, value = stats.kv_ranges["past_key_values.0.key"], stats.kv_ranges["past_key_values.0.value"]
    half = model.rotary_dim // 2
    assert key.shape == value.shape == (model.kv_heads, model.padded_head_dim) and (key > 0).all()
    assert np.array_equal(key[:, :half], key[:, half:2 * half]) and not np.array_equal(value[:, :half], value[:, half:])
    art = exported(QWEN2, bits=4)
    graphs = json.loads((art / "edgert.json").read_text())["graphs"]
    assert set(graphs) == {"default", "kv8gqa", "nibbles"}
    g = onnx.load(str(art / graphs["kv8gqa"]), load_external_data=False).graph
    consts = {t.name: t for t in g.initializer}
    k_scale = onnx.numpy_helper.to_array(consts["layers.0.attn.k_scale"])
    assert k_scale.shape == (1, model.kv_heads, 1, model.padded_head_dim)
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == model.n_layers and {a.name: a for a in gqa[0].attribute}["k_quant_type"].s == b"PER_CHANNEL"
    assert not any(i.name.endswith("_scale") for i in g.input)                  # codes only in the cache
    assert "kv8gqa" not in json.loads((exported(QWEN2, bits=8) / "edgert.json").read_text())["graphs"]
    # the calibration of the export set them (it also restarts a row at EOS: a few values differ slightly)
    full = sample_self(model, ckpt, QWEN2, tmp_path / "probe2")
    want = np.maximum(full.kv_ranges["past_key_values.0.key"], 1e-6) * KV_HEADROOM / 127
    assert np.allclose(k_scale[0, :, 0], want, rtol=0.02)


@pytest.mark.parametrize("case", ["stories260K-padded", "phi3-partial", "ernie4_5-interleaved"])
def test_int8_cache_key_ranges_do_not_move_with_position(tmp_path, case):
    """The calibrated key range of a channel is its rotary pair's norm, which no position changes: the
    same tokens written at positions 0.. and 37.. record the same ranges, also where the cached head
    is padded (stories260K's 8-wide heads, 16 wide in the cache), rotates only in part (Phi-4-mini's
    0.75) or in interleaved pairs (ERNIE 4.5). Layer 0's keys see no attention before them, so only
    the rotation differs. (Pairing channels i and i + rotary_dim / 2 instead clipped stories260K's keys
    at positions the calibration never reached: +7% perplexity with the calibrated int8 cache.)"""
    from edgert_export.archs import model_for
    from edgert_export.calibrate import _Probe
    from edgert_export.checkpoint import Checkpoint
    if case.startswith("stories"):
        src = BUNDLED_STORIES
    elif case.startswith("phi3"):
        src = make_checkpoint(tmp_path / "phi3", "phi3", partial_rotary_factor=0.75, pad_token_id=0)
    else:
        src = make_checkpoint(tmp_path / "ernie", "ernie4_5", head_dim=32, pad_token_id=0)
    ckpt = Checkpoint(src)
    model = model_for(ckpt.config)
    ids = np.array([[1, 403, 407, 261, 378, 300, 17, 42, 99, 5, 6, 7, 8, 9, 10, 11]], np.int64) % model.vocab
    ranges = []
    for start in (0, 37):
        probe = _Probe(model, ckpt, tmp_path / f"probe{start}", 64)
        probe.run(ids, np.array([start]))
        ranges.append(probe.finish().kv_ranges["past_key_values.0.key"])
    assert model.rotary_dim < model.padded_head_dim or case.startswith("ernie")
    assert np.allclose(ranges[0], ranges[1], rtol=1e-2, atol=1e-3), np.abs(ranges[0] - ranges[1]).max()


def test_a_graph_asked_for_by_name_runs_as_named(exported):
    """--moe-strategy default on an artifact with a kv8gqa twin runs the standard-op graph, also where
    onnxruntime >= 1.27 would pick the twin (before, the twin was put first: benchmarks that asked for
    the standard-op graph by name timed GroupQueryAttention's)."""
    from edgert.model import KV8GQA_SINCE, Model, ort_version
    art = exported(QWEN2, bits=4)
    assert Model(art, context=64, strategy="default").strategy == "default"
    assert Model(art, context=64).strategy == ("kv8gqa" if ort_version() >= KV8GQA_SINCE else "default")


@pytest.mark.parametrize("graph", ["gqa", "ops"])
def test_int8_cache_with_calibrated_scales_answers_like_the_fp32_cache(exported, monkeypatch, graph):
    """The default export's int8 cache, codes only with the calibrated per-channel scales, in both of
    its graphs: the kv8gqa twin, which onnxruntime >= 1.27 runs by default, and the standard-op graph
    (onnxruntime 1.22's), against the same weights with an fp32 cache: logits within the int8 rounding,
    the same greedy answers on held-out problems, several sequences of different lengths in one batch
    as each alone."""
    import edgert
    from edgert.model import KV8GQA_SINCE, Model, ort_version
    if graph == "gqa" and ort_version() < KV8GQA_SINCE:
        pytest.skip("GroupQueryAttention's int8 cache needs onnxruntime >= 1.27")
    monkeypatch.setenv("EDGERT_KV8_GRAPH", graph)
    art, full = exported(QWEN2, bits=4), exported(QWEN2, bits=4, kv_cache="fp32")
    from edgert.device import kv_bytes
    model, ref = Model(art, context=256), Model(full, context=256)
    assert model.strategy == {"gqa": "kv8gqa", "ops": "default"}[graph] and all(c.dtype == np.int8 for c in model.cache)
    # the memory check and bench's roofline count what the cache holds: codes, no scales, 1 byte per element
    m = model.manifest["model"]
    assert kv_bytes(model.manifest, 256, model.strategy) == sum(c.nbytes for c in model.cache) \
        == 2 * m["layers"] * m["kv_heads"] * 256 * m["head_dim"] == model.memory_need.kv
    ids = edgert.load(art, context=256).tokenizer.encode(" ".join(p.prompt for p in task.held_out_problems()[:6]))
    got, want = model.forward(ids, num_logits=len(ids)), ref.forward(ids, num_logits=len(ids))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert 1e-6 < err < 0.05, err
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95
    llm, llm32 = edgert.load(art, context=256), edgert.load(full, context=256)
    problems = task.held_out_problems()[24:40]
    answers = [["".join(t.text for t in m.generate(p.prompt, max_tokens=80, temperature=0)) for p in problems]
               for m in (llm, llm32)]
    assert [task.extract_answer(a) for a in answers[0]] == [task.extract_answer(a) for a in answers[1]]
    batch = Model(art, context=64, slots=3)
    seq = np.array(ids[:12], np.int64)
    alone = Model(art, context=64).forward(seq, num_logits=len(seq))
    for slot, n in enumerate((9, 4, 11)):
        batch.run(slot, seq[None, :n], np.array([0]))
    rows = batch.run(0, seq[None, [9, 4, 11]].T, np.array([9, 4, 11]))
    for r, n in enumerate((9, 4, 11)):
        assert np.abs(rows[r, -1] - alone[n]).max() < 1e-4
