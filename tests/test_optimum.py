"""The optimum route (`edgert export --via optimum`, automatic for model_types edgert does not build):
optimum-onnx's graph, onnxruntime's MatMulNBits quantizer, the runtime's adapter for the graph's
concatenating KV cache. Against transformers fp32 on two model_types edgert has no builder for;
batched like native artifacts; on the runtime-only install and onnxruntime 1.22.1."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, hf_greedy, hf_logits, hf_model, make_checkpoint, runtime_greedy
from test_engine import greedy_alone, greedy_together
from test_onnxruntime_versions import same_choices

# gpt2: learned positions, LayerNorm, Conv1D (Gemm) linears, MHA; stablelm: partial rotary, GQA
CASES = {"gpt2": {}, "stablelm": {}}
PROMPT = [1, 37, 112, 5, 260, 77, 301, 9, 44, 401, 18]


def edgert_cli(python: str, *args, timeout=600):
    return subprocess.run([python, "-c", "from edgert.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory, optimum_python):
    """(model_type, transformers reference, fp32 artifact by the automatic route, int4 artifact by --via optimum)."""
    name = request.param
    base = tmp_path_factory.mktemp(f"optimum-{name}")
    src = make_checkpoint(base / "src", name, **CASES[name])
    auto = edgert_cli(optimum_python, "export", src, "-o", base / "fp32", "--bits", "32")
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert f"model_type {name!r} is not built natively: exporting through optimum-onnx" in auto.stderr
    q = edgert_cli(optimum_python, "export", src, "-o", base / "int4", "--via", "optimum")
    assert q.returncode == 0, q.stderr[-2000:]
    return name, hf_model(src), base / "fp32", base / "int4"


def test_fp32_matches_transformers(case):
    from edgert.model import Model
    name, ref, fp32, _ = case
    manifest = json.loads((fp32 / "edgert.json").read_text())
    assert manifest["io"] == "optimum" and manifest["architecture"] == name
    model = Model(fp32, context=128)
    got = model.forward(PROMPT, num_logits=len(PROMPT))
    np.testing.assert_allclose(got, hf_logits(ref, PROMPT), atol=1e-4, rtol=1e-4)
    assert runtime_greedy(model, PROMPT, 24) == hf_greedy(ref, PROMPT, 24)
    assert runtime_greedy(model, PROMPT[:1], 8) == hf_greedy(ref, PROMPT[:1], 8)


def test_prefill_in_bounded_chunks(case):
    """optimum's graphs return logits for every token fed, so the engine feeds them at most
    feed_limit tokens per forward (a 152k vocabulary: 441); chunked, the tokens stay transformers'."""
    import edgert
    _, ref, fp32, _ = case
    llm = edgert.load(fp32, context=96)
    assert llm.model.feed_limit == max(16, (256 << 20) // (4 * 512))
    llm.model.feed_limit = 3
    fed, run = [], llm.model.run
    llm.model.run = lambda first, ids, *a, **k: fed.append(ids.shape[1]) or run(first, ids, *a, **k)
    assert [t for t in greedy_alone(llm, PROMPT, 12) if t >= 0] == hf_greedy(ref, PROMPT, 12)
    assert max(fed) == 3 and sum(fed) == len(PROMPT) + 11, fed


def test_int4_stays_close(case):
    from edgert.model import Model
    name, ref, _, int4 = case
    q = json.loads((int4 / "edgert.json").read_text())["quantization"]
    assert q["attention"] == 4 and q["quantized_matmuls"] >= 4 * 2, q     # every projection of both layers
    assert q["embed"] == 4, q                                            # the token table: GatherBlockQuantized
    got = Model(int4, context=128).forward(PROMPT, num_logits=len(PROMPT))
    want = hf_logits(ref, PROMPT)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    agree = (got.argmax(-1) == want.argmax(-1)).mean()
    print(f"\n{name} optimum int4: relative logit error {rel:.3f}, top-1 agreement {agree:.2f}")
    assert 0 < rel < 0.35 and agree >= 0.5, (rel, agree)


def test_batch_equals_each_alone(case):
    """The adapter under the engine: rows of different lengths, padded to the longest, stepped together."""
    import edgert
    _, _, fp32, _ = case
    prompts = [PROMPT, PROMPT[:3], PROMPT[2:9], [1, 7]]
    one = edgert.load(fp32, context=96)
    alone = [[t for t in greedy_alone(one, ids, 12) if t >= 0] for ids in prompts]   # -1: held-back text
    together = edgert.load(fp32, context=96, slots=len(prompts))
    assert greedy_together(together, prompts, 12) == alone


def test_runtime_only_and_onnxruntime_122(case, old_ort_python):
    """Its artifacts run where only the runtime is installed, onnxruntime 1.22.1 included."""
    _, _, fp32, int4 = case
    old, _ = same_choices(old_ort_python, [(str(fp32), PROMPT), (str(int4), PROMPT)], [True, False])
    assert old["version"] == "1.22.1"
    runtime = os.environ.get("EDGERT_RUNTIME_PYTHON")
    if runtime:
        r = edgert_cli(runtime, "run", int4, "--raw", "Once upon a time", "--max-tokens", "8", "--temperature", "0")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-1000:]


def test_refusals_are_one_line(tmp_path):
    """Native-only flags with --via optimum; an unknown model_type where optimum is not installed."""
    from edgert_export import optimum_route
    src = make_checkpoint(tmp_path / "src", "gpt2")
    r = edgert_cli(sys.executable, "export", src, "-o", tmp_path / "out", "--via", "optimum", "--calib", "self")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--calib: native export only" in r.stderr, r.stderr
    r = edgert_cli(sys.executable, "export", src, "-o", tmp_path / "out", "--via", "onnx")
    assert r.returncode == 1 and "--via must be native or optimum" in r.stderr, r.stderr
    if not optimum_route.available():
        r = edgert_cli(sys.executable, "export", src, "-o", tmp_path / "out")
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "not built natively" in r.stderr and "edgert[optimum]" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_served_and_evaluated(case):
    """The adapter under the rest of the runtime: a real `edgert serve` (the openai client; n=2
    decoded together in one batch equals one alone) and `edgert eval`."""
    from test_serve import Server
    _, _, fp32, int4 = case
    server = Server(int4, "--parallel", "2")
    try:
        client = server.client()
        model = client.models.list().data[0].id
        ask = dict(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
        two, one = client.completions.create(n=2, **ask), client.completions.create(**ask)
        assert [c.text for c in two.choices] == [one.choices[0].text] * 2
        assert two.usage.completion_tokens == 2 * one.usage.completion_tokens > 0
    finally:
        server.stop()
    assert "Traceback" not in server.output(), server.output()[-2000:]
    r = edgert_cli(sys.executable, "eval", fp32, "--json")
    assert r.returncode == 0, r.stderr[-1000:]
    assert 1 < json.loads(r.stdout)["ppl"] < 1e4


@pytest.mark.parametrize("damage,want", [
    (lambda src: (src / "tokenizer.json").unlink(), "no tokenizer.json"),
    (lambda src: edit_config(src, n_embd=10 ** 9), "n_embd must be an integer"),
    (lambda src: edit_config(src, n_layer="many"), "n_layer must be an integer"),
    (lambda src: edit_config(src, n_embd=60000, n_layer=1000), "more than this machine's"),
])
def test_bad_checkpoints_are_one_line_before_torch(tmp_path, damage, want):
    """Refused in one line, in bounded time, before optimum-onnx builds anything; nothing written."""
    src = make_checkpoint(tmp_path / "src", "gpt2")
    damage(src)
    r = edgert_cli(sys.executable, "export", src, "-o", tmp_path / "out", "--via", "optimum", timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and want in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))
