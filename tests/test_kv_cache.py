"""The KV cache precision (`edgert export --kv-cache fp16|fp32`, fp16 by default for quantized
exports): half the bytes, the same answers. Against the fp32 cache of the same weights:
perplexity within 0.5% on trained stories260K, the trained reasoning fixture's greedy answers,
logits to fp16's rounding; and against transformers fp32 through the transformers reference."""
from __future__ import annotations

import json
import sys

import numpy as np

from conftest import BUNDLED_STORIES, ROOT, hf_logits, hf_model, make_checkpoint

sys.path[:0] = [str(ROOT / "fixtures")]
import reasoning_task as task  # noqa: E402

QWEN2 = ROOT / "export" / "data" / "reasoning-qwen2"


def test_default_is_fp16_and_the_cache_holds_half_the_bytes(exported):
    import edgert
    from edgert.device import kv_bytes
    half, full = exported(QWEN2, bits=4), exported(QWEN2, bits=4, kv_cache="fp32")
    assert json.loads((half / "edgert.json").read_text())["quantization"]["kv_cache"] == "fp16"
    assert json.loads((exported(QWEN2, bits=32) / "edgert.json").read_text())["quantization"]["kv_cache"] == "fp32"
    a, b = edgert.load(half, context=256).model, edgert.load(full, context=256).model
    assert a.cache[0].dtype == np.float16 and b.cache[0].dtype == np.float32
    assert sum(c.nbytes for c in a.cache) * 2 == sum(c.nbytes for c in b.cache)
    assert kv_bytes(a.manifest, 256) * 2 == kv_bytes(b.manifest, 256) == sum(c.nbytes for c in b.cache)


def test_fp16_cache_perplexity_within_half_a_percent_on_stories(exported):
    from edgert.evaluate import evaluate
    ppl = {kv: evaluate(exported(BUNDLED_STORIES, bits=8, kv_cache=kv), window=256)["ppl"] for kv in ("fp32", "fp16")}
    assert abs(ppl["fp16"] / ppl["fp32"] - 1) < 0.005, ppl


def test_fp16_cache_answers_like_the_fp32_cache(exported):
    import edgert
    runs = {}
    for kv in ("fp32", "fp16"):
        llm = edgert.load(exported(QWEN2, bits=4, kv_cache=kv), context=256)
        runs[kv] = ["".join(t.text for t in llm.generate(p.prompt, max_tokens=80, temperature=0))
                    for p in task.held_out_problems()[:24]]
    same = sum(task.extract_answer(a) == task.extract_answer(b) for a, b in zip(runs["fp32"], runs["fp16"]))
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
    assert r.exit_code != 0 and "--kv-cache must be one of fp32, fp16" in r.output
    assert not (tmp_path / "x").exists()
