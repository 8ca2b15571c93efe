"""The int4 recipes (export/quantize.py, export/calibrate.py): GPTQ against the block search on
known inputs, a deterministic calibration pass, the manifest, and the --recipe/--calib errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import BUNDLED_STORIES, ROOT
from test_cli import assert_one_line_error, edgert

from edgert_export.quantize import Quantizer, Stats, quantize


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> np.ndarray:
    """Activations like a real layer's: channels of very different power, strongly correlated."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(k // 4, k)) * np.exp(rng.normal(0, 1, size=k))
    return (rng.normal(size=(tokens, k // 4)) @ mix + 0.1 * rng.normal(size=(tokens, k))).astype(np.float32)


@pytest.mark.parametrize("k", [128, 100, 1100])          # whole blocks; padded; more than one GPTQ span
def test_gptq_lowers_the_output_error(k):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.05, size=(48, k)).astype(np.float32)
    x = correlated_inputs(2048, k)
    stats = Stats(x)

    def out_err(q):
        return float(((x @ (q.dequantize() - w).T) ** 2).mean())
    rtn, search, gptq = (Quantizer(m, {"lin": stats})(w, 4, 32, "lin") for m in ("rtn", "search", "gptq"))
    assert gptq.packed.shape == search.packed.shape == (48, -(-k // 32), 16)
    assert out_err(gptq) < 0.7 * out_err(search) < 0.7 * out_err(rtn)
    # without statistics for that linear, gptq is the block search, exactly
    plain = Quantizer("gptq", {"lin": stats})(w, 4, 32, "other")
    assert np.array_equal(plain.packed, search.packed) and np.array_equal(plain.scales, search.scales)
    # int8 ignores the recipe: symmetric round to nearest
    assert np.array_equal(Quantizer("gptq", {"lin": stats})(w, 8, 32, "lin").packed, quantize(w, 8, 32).packed)


def test_dead_inputs_and_padding():
    """An input channel that is always 0 (a singular Hessian) and zero padding past K must not
    break GPTQ: finite scales, and still a lower output error than the block search."""
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.05, size=(16, 40)).astype(np.float32)
    x = correlated_inputs(256, 40)
    x[:, 5] = 0
    q = quantize(w, 4, 32, stats=Stats(x))
    assert np.isfinite(q.scales).all() and q.dequantize().shape == w.shape

    def out_err(q):
        return float(((x @ (q.dequantize() - w).T) ** 2).mean())
    assert out_err(q) < 0.7 * out_err(quantize(w, 4, 32))


def test_export_is_deterministic_and_recorded(tmp_path):
    """The default calibration, the model's own text sampled seeded, gives the same bytes twice;
    the built-in text (twice: the same bytes too) and a user's file give other weights, and the
    manifest names each."""
    from edgert_export import export
    from edgert_export.artifact import DEFAULT_CALIBRATION
    from edgert_export.calibrate import SELF_SEED, SELF_TOKENS
    runs = [export(BUNDLED_STORIES, tmp_path / f"s{i}", progress=False) for i in range(2)]
    assert runs[0]["files"]["model.onnx.data"]["sha256"] == runs[1]["files"]["model.onnx.data"]["sha256"]
    assert runs[0]["files"]["model.onnx"]["sha256"] == runs[1]["files"]["model.onnx"]["sha256"]
    q = runs[0]["quantization"]
    assert q["recipe"] == "gptq" and q["calibration"] == DEFAULT_CALIBRATION == "self"
    assert q["calibration_tokens"] >= SELF_TOKENS and q["calibration_seed"] == SELF_SEED
    assert 5 < q["bits_per_weight"] < 14      # stories260K: its default budget of 6 bits over the projections
    built_in = [export(BUNDLED_STORIES, tmp_path / f"b{i}", progress=False, calib="built-in") for i in range(2)]
    assert built_in[0]["files"]["model.onnx.data"]["sha256"] == built_in[1]["files"]["model.onnx.data"]["sha256"]
    b = built_in[0]["quantization"]
    assert b["calibration"] == "built-in" and b["calibration_tokens"] > 1000 and "calibration_seed" not in b
    assert built_in[0]["files"]["model.onnx.data"]["sha256"] != runs[0]["files"]["model.onnx.data"]["sha256"]
    rtn = export(BUNDLED_STORIES, tmp_path / "rtn", progress=False, recipe="rtn")["quantization"]
    assert rtn["recipe"] == "rtn" and "calibration" not in rtn
    # another calibration text gives other weights, and the manifest names it
    calib = tmp_path / "my-calib.txt"
    calib.write_text("The dog ran to the park. The cat sat on the mat and looked at the bird. " * 40)
    other = export(BUNDLED_STORIES, tmp_path / "other", progress=False, calib=calib)
    assert other["quantization"]["calibration"] == "my-calib.txt"
    assert other["files"]["model.onnx.data"]["sha256"] not in {r["files"]["model.onnx.data"]["sha256"]
                                                               for r in (runs[0], built_in[0])}
    # fp32 and int8 exports do not run the calibration pass at all
    assert "calibration" not in export(BUNDLED_STORIES, tmp_path / "i8", bits=8, progress=False)["quantization"]


def test_self_calibration_samples_the_model(tmp_path):
    """Self-calibration starts from BOS, and from the chat template's prompts when there is one; it
    feeds exactly the tokens it counts, the same ones for the same seed and others for another."""
    from edgert_export import calibrate
    from edgert_export.archs import model_for
    from edgert_export.checkpoint import Checkpoint
    from edgert.tokenizer import Tokenizer
    assert calibrate.self_prompts(BUNDLED_STORIES) == [[1]]
    fixture = BUNDLED_STORIES.parent / "reasoning-qwen2"
    starts = calibrate.self_prompts(fixture)
    tok = Tokenizer.from_dir(fixture)
    assert len(starts) == 2 * len(calibrate.CHAT_PROMPTS) and starts[0] == [506]
    assert tok.decode(starts[1]) == "<｜begin▁of▁sentence｜><｜User｜>" + calibrate.CHAT_PROMPTS[0] + "<｜Assistant｜><think>\n"
    ckpt = Checkpoint(fixture)
    runs = [calibrate.sample_self(model_for(ckpt.config), ckpt, fixture, tmp_path / f"s{i}", tokens=256, rows=4,
                                  seed=seed, eos=[507]) for i, seed in enumerate((0, 0, 1))]
    name = runs[0].linears["layers.0.attn.qkv"]
    assert runs[0].tokens == len(runs[0].stats[name].x) == 256
    assert np.array_equal(runs[0].stats[name].x, runs[1].stats[name].x)
    assert not np.array_equal(runs[0].stats[name].x, runs[2].stats[name].x)


def test_calibration_pass_is_deterministic(tmp_path):
    from edgert_export.archs import model_for
    from edgert_export.calibrate import DEFAULT_CALIB, collect
    from edgert_export.checkpoint import Checkpoint
    ckpt = Checkpoint(BUNDLED_STORIES)
    text = DEFAULT_CALIB.read_text()
    a, b = (collect(model_for(ckpt.config), ckpt, BUNDLED_STORIES, text, tmp_path / f"c{i}") for i in range(2))
    assert a.linears == b.linears and "layers.0.attn.qkv" in a.linears and "lm_head" in a.linears
    assert set(a.linears) >= {f"layers.{i}.{p}" for i in range(5) for p in ("attn.o_proj", "mlp.gate_up", "mlp.down")}
    for t in a.stats:
        assert np.array_equal(a.stats[t].x, b.stats[t].x)
        assert np.abs(a.stats[t].x).max() > 0
    assert a.tokens == b.tokens == len(a.stats[a.linears["layers.0.mlp.down"]].x)


def test_bad_recipe_and_calib_are_one_line_errors(tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(edgert("export", BUNDLED_STORIES, "-o", out, "--recipe", "awq"), "--recipe", "gptq, search, rtn")
    assert_one_line_error(edgert("export", BUNDLED_STORIES, "-o", out, "--calib", tmp_path / "nope.txt"), "--calib",
                          "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    assert_one_line_error(edgert("export", BUNDLED_STORIES, "-o", out, "--calib", tmp_path / "empty.txt"), "empty")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81" * 10)
    assert_one_line_error(edgert("export", BUNDLED_STORIES, "-o", out, "--calib", tmp_path / "bin.txt"), "UTF-8")
    (tmp_path / "ok.txt").write_text("Once upon a time there was a cat.")
    assert_one_line_error(edgert("export", BUNDLED_STORIES, "-o", out, "--recipe", "rtn", "--calib", tmp_path / "ok.txt"),
                          "--calib is for --recipe gptq")
    assert_one_line_error(edgert("export", BUNDLED_STORIES, "-o", out, "--recipe", "rtn", "--calib", "self"),
                          "--calib is for --recipe gptq")
    assert_one_line_error(edgert("export", BUNDLED_STORIES, "-o", out, "--bits-per-weight", "3.5"), "--bits-per-weight",
                          "above 4")
    assert_one_line_error(edgert("export", BUNDLED_STORIES, "-o", out, "--bits-per-weight", "5", "--recipe", "search"),
                          "--bits-per-weight", "--recipe gptq")
    assert_one_line_error(edgert("export", BUNDLED_STORIES, "-o", out, "--bits-per-weight", "4.5", "--calib", "built-in"),
                          "--bits-per-weight 4.5 is below the smallest layout")
    assert not out.exists()
    r = edgert("export", "--help")
    assert "--recipe" in r.stdout and "--calib" in r.stdout and "--bits-per-weight" in r.stdout


def test_plan_budget_spends_exactly_what_it_is_given():
    """The plan's bytes (every code, scale and zero point, padding included) never pass the budget,
    and more budget never costs accuracy (the output error each layout leaves after GPTQ)."""
    from edgert_export.quantize import LAYOUTS, Survey, layout_bytes, layout_errors, plan_budget, quantize
    rng = np.random.default_rng(3)
    survey = Survey(lambda w, bits, block_size, name=None: None)
    shapes = {"a": (96, 256), "b": (64, 200), "c": (128, 512), "d": (40, 96)}
    stats = {}
    for i, (name, (n, k)) in enumerate(shapes.items()):
        survey(rng.normal(0, 0.02 * (i + 1), size=(n, k)).astype(np.float32), 4, 32, name)
        stats[name] = Stats(correlated_inputs(512, k, seed=i))
    errors = {t: layout_errors(survey.linears[t][2], survey.linears[t][0], stats[t]) for t in shapes}
    assert all(e[LAYOUTS.index((4, 16))] < e[LAYOUTS.index((4, 128))] and e[-1] < e[0] for e in errors.values())
    weights = sum(n * k for n, k in shapes.values())
    last = None
    for bpw in (4.6, 5.0, 5.5, 6.5, 8.9):
        plan = plan_budget(survey, stats, bpw)
        spent = sum(layout_bytes(*shapes[t], *plan[t]) for t in plan)
        assert spent <= bpw * weights / 8
        err = sum(errors[t][LAYOUTS.index(plan[t])] for t in plan)
        assert last is None or err <= last
        last = err
    # layout_bytes is what quantize() stores
    w = rng.normal(size=(24, 200)).astype(np.float32)
    for bits, bs in LAYOUTS:
        assert quantize(w, bits, bs).nbytes == layout_bytes(24, 200, bits, bs)
    with pytest.raises(ValueError, match="below the smallest layout"):
        plan_budget(survey, stats, 4.2)


def test_bits_per_weight_budget_in_the_artifact(tmp_path):
    """--bits-per-weight: every stored byte of the projections (codes, scales, zero points, read
    from the ONNX graph) within the budget, the per-tensor choices in edgert.json equal to the
    graph's MatMulNBits nodes, several layouts used, and `edgert eval` reporting them."""
    import onnx
    from edgert_export import export
    out = tmp_path / "bpw"
    m = export(BUNDLED_STORIES, out, progress=False, bits_per_weight=5.5)
    q = m["quantization"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    size = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        size[t.name] = int(ext["length"]) if "length" in ext else len(t.raw_data)
    stored, weights, layouts = 0, 0, set()
    for node in model.graph.node:
        name = node.name[2:]
        if node.op_type != "MatMulNBits" or name in ("lm_head", "embed_tokens") or name not in q["tensors"]:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        nbytes = sum(size[i] for i in node.input[1:4] if i)
        want = q["tensors"][name]
        assert (attrs["bits"], attrs["block_size"], nbytes) == (want["bits"], want["block_size"], want["bytes"])
        stored, weights = stored + nbytes, weights + attrs["K"] * attrs["N"]
        layouts.add((attrs["bits"], attrs["block_size"]))
    assert weights > 0
    assert len([t for t in q["tensors"] if t.startswith("layers.")]) == 20
    assert stored <= 5.5 * weights / 8 and stored > 5.3 * weights / 8
    assert q["bits_per_weight_budget"] == 5.5 and abs(q["linear_bits_per_weight"] - 8 * stored / weights) < 1e-3
    assert len(layouts) >= 2
    r = edgert("eval", out, "--json", "--window", "64", "--text", BUNDLED_STORIES / "README.md")
    assert r.returncode == 0, r.stderr
    rq = json.loads(r.stdout)["quantization"]
    assert rq["bits_per_weight_budget"] == 5.5 and rq["linear_bits_per_weight"] == q["linear_bits_per_weight"]
    assert sum(rq["layouts"].values()) == len(q["tensors"])


def test_narrow_models_default_to_a_budget_that_spends_where_the_perplexity_drops(exported, tmp_path):
    """A model under 128 wide (stories260K: 64) is exported by default under a budget of 6 bits a
    weight, which measures a gated MLP's gate_up where its down is measured, at the MLP's output:
    it must beat uniform int4 (`--block-size 32`, 5.125 bits) clearly, meet issue 14's +3% on the
    held-out stories, and do it by holding some gate_up at int8. Measured: +2.46% against +3.87%;
    with gate_up's error measured at its own output the budget went to down and did worse than
    uniform (+4.11%). A 128-wide model keeps uniform int4 in auto blocks."""
    from edgert.evaluate import evaluate
    from edgert_export import export
    fp32, uniform, default = (evaluate(exported(BUNDLED_STORIES, bits=b, **kw), window=512)["ppl"]
                              for b, kw in ((32, {}), (4, {"block_size": 32}), (4, {})))
    assert default / fp32 - 1 < min(0.03, 0.8 * (uniform / fp32 - 1)), (fp32, uniform, default)
    q = json.loads((exported(BUNDLED_STORIES, bits=4) / "edgert.json").read_text())["quantization"]
    assert q["bits_per_weight_budget"] == 6.0 and 5.9 < q["linear_bits_per_weight"] <= 6.0
    assert any(t.endswith("mlp.gate_up") and v["bits"] == 8 for t, v in q["tensors"].items())
    assert "bits_per_weight_budget" not in json.loads((exported(BUNDLED_STORIES, bits=4, block_size=32) / "edgert.json"
                                                       ).read_text())["quantization"]
    said = edgert("export", BUNDLED_STORIES, "-o", tmp_path / "cli")     # the user is told the layers are mixed
    assert said.returncode == 0 and "under a budget of 6, 3 of 20 at int8" in said.stderr, said.stderr
    wide = export(ROOT / "export" / "data" / "reasoning-qwen2", tmp_path / "wide", progress=False)["quantization"]
    assert "bits_per_weight_budget" not in wide
    assert {v["bits"] for t, v in wide["tensors"].items() if t.startswith("layers.")} == {4}


def test_budget_plan_holds_one_linears_inputs_at_a_time(monkeypatch, tmp_path):
    """Measuring gate_up at the MLP's output reads down's inputs too: the plan must still let each
    linear's calibration inputs go once measured (every layer's gate_up inputs at once: hundreds of MB at 1.5B)."""
    import edgert_export.artifact as artifact
    from edgert_export import export
    plan, held = artifact.plan_budget, []

    def spy(survey, stats, bpw):
        out = plan(survey, stats, bpw)
        held.extend(n for n, s in stats.stats.items() if s._x is not None)
        return out
    monkeypatch.setattr(artifact, "plan_budget", spy)
    export(BUNDLED_STORIES, tmp_path / "art", progress=False, bits_per_weight=6.0)
    assert len(held) <= 1, held


ANCHOR = ROOT / "export" / "data" / "anchor256"


def test_calibration_writes_each_run_before_its_arrays_are_reused(monkeypatch, tmp_path):
    """The probe writes a run's inputs on a thread while onnxruntime computes the next run into the
    other set of arrays; a slow disk must not let a set be overwritten before it is written."""
    import time
    from edgert_export import calibrate
    from edgert_export.archs import model_for
    from edgert_export.checkpoint import Checkpoint
    ckpt = Checkpoint(BUNDLED_STORIES)
    sample = lambda work: calibrate.sample_self(model_for(ckpt.config), ckpt, BUNDLED_STORIES, work, tokens=64, rows=4)
    fast = sample(tmp_path / "fast")                     # 16 runs of one token per row
    append = calibrate._Probe._append
    monkeypatch.setattr(calibrate._Probe, "_append", lambda self, jobs: (time.sleep(0.02), append(self, jobs))[1])
    slow = sample(tmp_path / "slow")
    assert fast.tokens == slow.tokens == 64
    for t in fast.stats:
        assert np.array_equal(fast.stats[t].x, slow.stats[t].x)


def test_gptq_pool_gives_the_same_artifact(monkeypatch, tmp_path):
    """GPTQ in spawned processes (every linear sent to the pool, its bytes written into the place
    reserved for them while the graph goes on): the same data file and graph as in one process."""
    from edgert_export import quantize as qz
    from edgert_export.artifact import export
    monkeypatch.setattr(qz, "_POOL_MIN", 1)
    monkeypatch.setattr(qz, "_GPTQ_CHUNK", 64 * 64)       # several row chunks per linear, out of order
    started = []
    real = qz.GptqPool.__init__
    monkeypatch.setattr(qz.GptqPool, "__init__", lambda self, n: (started.append(n), real(self, n))[1])
    blocks = []                                           # the shared memory block of every chunk
    shared = qz._shared
    monkeypatch.setattr(qz, "_shared", lambda rows, free: (lambda r: (blocks.append(r[1][0]), r)[1])(shared(rows, free)))
    files = {}
    for n in ("1", "2"):
        monkeypatch.setenv("EDGERT_EXPORT_WORKERS", n)
        export(ANCHOR, tmp_path / n, block_size=16, progress=False)     # no linear small enough to inline
        files[n] = {f: (tmp_path / n / f).read_bytes() for f in ("model.onnx", "model.onnx.data")}
    assert started == [2]
    assert files["1"] == files["2"]
    # blocks are reused across chunks and linears (larger ones holding smaller chunks), and none is left behind
    assert len(blocks) > 20 and len(set(blocks)) <= len(blocks) // 4
    from multiprocessing import shared_memory
    for name in set(blocks):
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name=name)


def test_a_gptq_process_that_dies_is_one_clear_error():
    from edgert_export import quantize as qz
    rng = np.random.default_rng(0)
    pool = qz.GptqPool(2)
    try:
        for p in list(pool.pool._processes.values()):
            p.kill()
            p.join()
        with pytest.raises(MemoryError, match="GPTQ process ended unexpectedly.*EDGERT_EXPORT_WORKERS=1"):
            pool.submit(rng.normal(size=(64, 64)).astype(np.float32), qz.Stats(file="/nonexistent", width=64), 4, 32,
                        qz.SHRINK)
            pool.drain()
    finally:
        pool.close()


def test_gptq_pool_takes_the_next_chunk_when_any_one_is_done():
    """A large chunk does not hold up the small ones behind it: with chunks in flight, the pool
    collects whichever finished, not the oldest. Waiting for the oldest left a process idle behind a
    long chunk (the 1.5B export's GPTQ processes were busy 80% of the time). Futures stand in for
    the processes here, so which chunk is done is decided, not raced (a real pool on a loaded box
    can finish the large one first)."""
    import threading
    from collections import deque
    from concurrent.futures import Future
    from edgert_export import quantize as qz

    done = []

    class Part:                         # what _retire needs of a Pending: its parts, finish()
        def __init__(self, name):
            self.name, self.parts = name, [None]

        def finish(self):
            done.append(self.name)

    large, small = Future(), Future()
    small.set_result("codes")
    pool = object.__new__(qz.GptqPool)
    pool.count, pool.free = 2, []
    pool.inflight = deque([[large, Part("large"), 0, None], [small, Part("small"), 0, None]])
    late = threading.Timer(3.0, large.set_result, ("codes",))   # a pool that waits for all gets it only late
    late.start()
    try:
        pool._retire()
        assert done == ["small"]
        pool._retire()
        assert done == ["small", "large"] and not pool.inflight
    finally:
        late.cancel()


def test_gptq_pool_runs_chunks_of_any_size(tmp_path):
    from edgert_export import quantize as qz
    rng = np.random.default_rng(0)
    x = correlated_inputs(256, 1024)
    x.tofile(tmp_path / "x.f32")
    stats = Stats(file=tmp_path / "x.f32", width=1024)
    done, pool = [], qz.GptqPool(2)
    try:
        for name, rows in (("large", 4096), ("small1", 8), ("small2", 8), ("small3", 8)):
            p = pool.submit(rng.normal(size=(rows, 1024)).astype(np.float32), stats, 4, 32, qz.SHRINK)
            p.done = lambda q, name=name: done.append(name)
        pool.drain()
    finally:
        pool.close()
    assert sorted(done) == ["large", "small1", "small2", "small3"]


def test_calibration_inputs_round_trip_as_bfloat16(tmp_path):
    """The probe appends each linear's inputs as bfloat16, rounded to nearest; Stats reads a .bf16
    file back as float32: every value within half a bfloat16 step of what onnxruntime computed."""
    import types
    from edgert_export import calibrate
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 5, 64)) * np.exp(rng.normal(0, 4, size=64))).astype(np.float32)
    x[0, 0, :4] = [0, -0.0, 1 + 2 ** -8, -(1 + 3 * 2 ** -9)]     # a tie (rounds away from zero) and a non-tie
    probe = types.SimpleNamespace(scratch=np.empty(0, np.uint16))
    with open(tmp_path / "x.bf16", "wb") as f:
        calibrate._Probe._append(probe, [(f, x.copy()), (f, x[1:].copy())])
    got = Stats(file=tmp_path / "x.bf16", width=64).x
    want = np.concatenate([x.reshape(-1, 64), x[1:].reshape(-1, 64)])
    assert got.dtype == np.float32 and got.shape == want.shape
    assert not (got.view(np.uint32) & 0xFFFF).any()                    # bfloat16 values
    assert (np.abs(got - want) <= np.abs(want) * 2.0 ** -8).all()      # the nearest of them
    assert list(got[0, :4]) == [0, 0, 1 + 2 ** -7, -(1 + 2 ** -7)]


def test_anchor_fixture_is_fair_to_k_quants():
    """The quantization anchor (fixtures/make_anchor.py): every matrix row a multiple of 256 wide, so
    llama.cpp's k-quants apply unchanged; small enough to commit; its recorded held-out perplexity
    is transformers fp32's on the one held-out story text."""
    import sys
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "fixtures"))
    import make_anchor
    src = ROOT / "export" / "data" / "anchor256"
    config = json.loads((src / "config.json").read_text())
    record = json.loads((src / "fixture.json").read_text())
    widths = (config["hidden_size"], config["num_attention_heads"] * config["head_dim"], config["intermediate_size"])
    assert all(w % 256 == 0 for w in widths)
    assert sum(f.stat().st_size for f in src.iterdir()) <= 10 << 20
    from conftest import hf_model
    ppl, n = make_anchor.heldout_ppl(hf_model(src), config["max_position_embeddings"])
    assert n == record["heldout_tokens"] and abs(ppl / record["heldout_ppl_fp32"] - 1) < 1e-3


def reference_gptq(w: np.ndarray, x: np.ndarray, block: int) -> np.ndarray:
    """Textbook GPTQ (one span, full K x K inverse, every later column updated after each column)
    with act order (largest input power first) and static grids (each block's grid searched on the
    weights as given), the exporter's damping, block grid search and asymmetric int4: the
    dequantized weights."""
    from edgert_export.quantize import DAMP, _search
    w = w.astype(np.float64).copy()
    h = x.T.astype(np.float64) @ x / len(x)
    imp = np.diag(h) + DAMP * np.diag(h).mean()
    h[np.diag_indices(len(h))] = imp
    grids = [_search(w[:, lo:lo + block].astype(np.float32)[:, None, :], 4, False,
                     weight=imp[lo:lo + block].astype(np.float32))[1:] for lo in range(0, w.shape[1], block)]
    order = np.argsort(-imp, kind="stable")
    u = np.linalg.cholesky(np.linalg.inv(h[order][:, order])).T
    w = w[:, order]
    out = np.empty_like(w)
    for j, col in enumerate(order):
        s, zp = grids[col // block]
        s, zp = s[:, 0].astype(np.float64), zp[:, 0]
        q = (np.clip(np.rint(w[:, j] / np.where(s == 0, 1, s)) + zp, 0, 15) - zp) * s
        out[:, col] = q
        e = (w[:, j] - q) / u[j, j]
        w[:, j + 1:] -= e[:, None] * u[j, j + 1:][None, :]
    return out


@pytest.mark.parametrize("k", [96, 256])
def test_gptq_matches_the_textbook_algorithm(k):
    """The exporter's GPTQ (W transposed and permuted to act order, errors spread by sub-blocks and
    groups as matrix products, Hessian factor from a reversed Cholesky) is the textbook
    column-by-column algorithm: the same
    weights up to float32 rounding (a code may flip where a value sits on a rounding boundary)."""
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.05, size=(64, k)).astype(np.float32)
    x = correlated_inputs(1024, k, seed=3)
    got = quantize(w, 4, 32, stats=Stats(x)).dequantize()
    want = reference_gptq(w, x, 32)
    assert np.mean(np.isclose(got, want, rtol=0, atol=1e-6)) > 0.99

    def out_err(d):
        return float(((x @ (d - w).T) ** 2).mean())
    assert out_err(got) == pytest.approx(out_err(want), rel=0.02)


def test_hessian_factor_is_the_cholesky_factor_of_the_inverse():
    """U with H^-1 = U^T U, upper triangular, as GPTQ defines it, with H's columns in act order
    (largest damped diagonal first); a dead input (always 0) handled."""
    from edgert_export.quantize import DAMP, _hessian_factor
    rng = np.random.default_rng(5)
    for n in (40, 300):        # one block; several halvings of the triangular inverse
        x = correlated_inputs(4 * n, n, seed=n) * rng.uniform(0.2, 3, n)    # column powers apart
        x[:, 3] = 0
        h = x.T.astype(np.float64) @ x / len(x)
        u, imp, dead, order = _hessian_factor(h.copy(), n)
        ref = h.copy()
        ref[3, 3] = 1
        ref[np.diag_indices(n)] += DAMP * np.diag(h).mean()
        assert order.tolist() == np.argsort(-np.diag(ref), kind="stable").tolist() and order[0] != 0
        want = np.linalg.cholesky(np.linalg.inv(ref[order][:, order])).T
        assert dead.tolist() == [i == 3 for i in range(n)]
        assert np.array_equal(u, np.triu(u)) and np.allclose(imp, np.diag(ref))
        assert np.allclose(u, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
        # in float32, as Stats.factor computes it: the same order and factor to float32's precision
        u32, imp32, dead32, order32 = _hessian_factor(h.astype(np.float32), n)
        assert order32.tolist() == order.tolist() and dead32.tolist() == dead.tolist()
        assert np.allclose(u32, want, rtol=2e-3, atol=2e-4 * np.abs(want).max())


def test_block_search_on_threads_gives_the_same_bytes(monkeypatch):
    """The block search (embeddings, lm_head, --recipe search) runs its row chunks on one thread per
    core: the same bytes as on one."""
    import os
    rng = np.random.default_rng(6)
    w = rng.normal(0, 0.05, size=(1500, 1000)).astype(np.float32)
    got = {}
    for cores in (1, 2, 3):
        monkeypatch.setattr(os, "cpu_count", lambda c=cores: c)
        got[cores] = [quantize(w, bits, 32) for bits in (4, 8)]
    for cores in (2, 3):
        for a, b in zip(got[1], got[cores]):
            assert np.array_equal(a.packed, b.packed) and np.array_equal(a.scales, b.scales)
            assert (a.zero_points is None) == (b.zero_points is None)
            if a.zero_points is not None:
                assert np.array_equal(a.zero_points, b.zero_points)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_default_blocks_follow_each_projections_width(tmp_path):
    """Without --block-size a projection gets blocks of 128 where its input width holds two of them,
    else 64, else 32 (a layer's experts one block for both their matrices: QMoE's attribute); an int8
    embedding / lm_head table of the hidden width the same (its coarse int4 plane is read every
    decode step), an int4 table 32. On anchor256, every width a multiple of 256, that is 128 for
    every projection: 4.28 bits per weight, under llama.cpp Q4_K_M's 4.80 there (README, issue 14),
    and the logits stay near transformers fp32 on held-out text (quant_recipes.py over 10k tokens:
    top-1 96.7%, KL 0.0039; a block layout bug is far off)."""
    import onnx
    from conftest import hf_logits, hf_model
    from edgert.model import Model
    from edgert.tokenizer import Tokenizer
    from edgert_export import export
    from edgert_export.quantize import auto_block
    assert [auto_block(w) for w in (896, 2880, 4864, 256, 128, 64, 172)] == [128, 64, 128, 128, 64, 32, 32]
    assert auto_block(2048, 768) == 128 and auto_block(2880, 2880) == 64 and auto_block(256, 128) == 64
    assert auto_block(896, bits=8) == 32 and export(ANCHOR, tmp_path / "i8", bits=8, progress=False,
                                                   recipe="rtn")["quantization"]["tensors"]["layers.0.mlp.down"]["block_size"] == 32
    from edgert_export.graph import Recipe
    assert [Recipe().table_block(w) for w in (896, 2048, 128, 64)] == [128, 128, 64, 32]
    assert Recipe(embed_bits=4).table_block(896) == 32 and Recipe(block_size=64).table_block(896) == 64
    m = export(ANCHOR, tmp_path / "auto", progress=False)
    q = m["quantization"]
    assert q["block_size"] == 128 and q["linear_block_size"] == "auto"
    projections = {t: v for t, v in q["tensors"].items() if t.startswith("layers.")}
    assert len(projections) == 8 and {v["block_size"] for v in projections.values()} == {128}
    assert abs(q["linear_bits_per_weight"] - (4 + (32 + 4) / 128)) < 1e-3 and q["linear_bits_per_weight"] < 4.80
    graph = onnx.load(str(tmp_path / "auto" / "model.onnx"), load_external_data=False).graph
    blocks = {n.name: {a.name: a.i for a in n.attribute}["block_size"] for n in graph.node if n.op_type == "MatMulNBits"}
    assert {b for n, b in blocks.items() if n[2:] in projections} == {128}
    assert {b for n, b in blocks.items() if n[2:] not in projections} == {128}     # lm_head
    fixed = export(ANCHOR, tmp_path / "b32", progress=False, block_size=32)["quantization"]
    assert fixed["block_size"] == 32 and "linear_block_size" not in fixed
    assert {v["block_size"] for v in fixed["tensors"].values()} == {32}

    ids = Tokenizer.from_dir(ANCHOR).encode((ROOT / "edgert" / "data" / "stories.txt").read_text()[:20000], add_special_tokens=False)
    ref, model = hf_model(ANCHOR), Model(tmp_path / "auto", context=128)
    agree, kls = [], []
    for w in range(4):
        window = [1] + ids[w * 127:(w + 1) * 127]
        model.reset()
        got, want = model.forward(window, num_logits=len(window)).astype(np.float64), hf_logits(ref, window)
        lp, lq = log_softmax(want.astype(np.float64)), log_softmax(got)
        kls.append((np.exp(lp) * (lp - lq)).sum(-1))
        agree.append(got.argmax(-1) == want.argmax(-1))
    top1, kl = float(np.concatenate(agree).mean()), float(np.concatenate(kls).mean())
    print(f"\nanchor256 default int4 (block 128): top-1 {top1:.3f}, KL {kl:.4f}")
    assert top1 >= 0.9 and kl < 0.01


def test_experts_keep_their_layout_under_a_budget_and_are_recorded_together():
    """A layer's experts read the router's input statistics under its name, but a budget's plan for
    that name must not reach them (QMoE takes one layout per layer), the survey must not count them
    as a linear, and the per-tensor table sums them under the experts' own entry."""
    from edgert_export.quantize import Quantizer, Survey
    rng = np.random.default_rng(0)
    q = Quantizer("rtn", plan={"l.moe.router": (8, 64), "l.attn.qkv": (8, 64)})
    survey = Survey(q)
    for _ in range(3):
        got = survey(rng.standard_normal((64, 128)).astype(np.float32), 4, 32, "l.moe.router", record="l.moe.experts.gate_up")
        assert (got.bits, got.block_size) == (4, 32)
    assert (survey(rng.standard_normal((64, 128)).astype(np.float32), 4, 32, "l.attn.qkv").bits, q.chosen["l.attn.qkv"]["bits"]) == (8, 8)
    assert list(survey.linears) == ["l.attn.qkv"]
    one = 64 * 4 * 16 + 64 * 4 * 4 + 64 * 4 // 2          # codes, fp32 scales, packed zero points of one expert
    assert q.chosen["l.moe.experts.gate_up"] == {"bits": 4, "block_size": 32, "bytes": 3 * one}
    assert q.weights["l.moe.experts.gate_up"] == 3 * 64 * 128 and "l.moe.router" not in q.chosen
