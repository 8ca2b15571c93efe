"""The int4 recipes (export/quantize.py, export/calibrate.py): GPTQ against the block search on
known inputs, a deterministic calibration pass, the manifest, and the --recipe/--calib errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import BUNDLED_STORIES
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
    from edgert_export import export
    runs = [export(BUNDLED_STORIES, tmp_path / f"a{i}", progress=False) for i in range(2)]
    assert runs[0]["files"]["model.onnx.data"]["sha256"] == runs[1]["files"]["model.onnx.data"]["sha256"]
    q = runs[0]["quantization"]
    assert q["recipe"] == "gptq" and q["calibration"] == "built-in" and q["calibration_tokens"] > 1000
    assert 5 < q["bits_per_weight"] < 12
    rtn = export(BUNDLED_STORIES, tmp_path / "rtn", progress=False, recipe="rtn")["quantization"]
    assert rtn["recipe"] == "rtn" and "calibration" not in rtn
    # another calibration text gives other weights, and the manifest names it
    calib = tmp_path / "my-calib.txt"
    calib.write_text("The dog ran to the park. The cat sat on the mat and looked at the bird. " * 40)
    other = export(BUNDLED_STORIES, tmp_path / "other", progress=False, calib=calib)
    assert other["quantization"]["calibration"] == "my-calib.txt"
    assert other["files"]["model.onnx.data"]["sha256"] != runs[0]["files"]["model.onnx.data"]["sha256"]
    # fp32 and int8 exports do not run the calibration pass at all
    assert "calibration" not in export(BUNDLED_STORIES, tmp_path / "i8", bits=8, progress=False)["quantization"]


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
    assert not out.exists()
    r = edgert("export", "--help")
    assert "--recipe" in r.stdout and "--calib" in r.stdout
