"""The same artifacts on an older onnxruntime (Termux packages 1.22): identical greedy tokens.
MoE artifacts run the plain expert graph there (no QMoE kernel before 1.23); here they run
QMoE by default, so this also checks the two strategies against each other. Like Termux, that
Python has no `tokenizers`: text goes through the pure-Python tokenizer.json reader there and
through `tokenizers` here, and must give the same ids and the same generated text.

The old Python is EDGERT_ORT_PYTHON (.ci/run makes a venv with onnxruntime 1.22.1 for it), else a
venv the tests make once and cache (conftest.old_ort_python); the summary says so if neither can be had.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import BUNDLED_STORIES, ROOT, make_checkpoint

HEADER = """
import importlib.util, json, sys
import numpy as np, onnxruntime
out = {"version": onnxruntime.__version__, "has_tokenizers": importlib.util.find_spec("tokenizers") is not None,
       "runs": [], "strategies": [], "backends": []}
"""

# greedy from token ids, straight through the Model; with `forced` ids the model is
# teacher-forced along them (the other version's greedy path), so every step is compared
IDS_SCRIPT = HEADER + """
from edgert.model import Model
for art, prompt, forced in json.loads(sys.argv[1]):
    m = Model(art, context=128, threads=1)
    out["strategies"].append(m.strategy)
    logits, greedy, margins = m.forward(prompt)[-1], [], []
    for i in range(24):
        second, first = np.sort(logits)[-2:]
        greedy.append(int(np.argmax(logits)))
        margins.append(float(first - second))
        logits = m.forward([forced[i] if forced else greedy[-1]])[-1]
    out["runs"].append({"greedy": greedy, "margins": margins})
print(json.dumps(out))
"""

# text in, text out: tokenizer (whichever backend this Python has), chat template, streaming decoder.
# With `forced` ids the model is teacher-forced along them (the other version's greedy path), so
# every step is compared, not only the steps before a first near-tie.
TEXT_SCRIPT = HEADER + """
import edgert
from edgert.tokenizer import StreamDecoder
for art, prompt, raw, forced in json.loads(sys.argv[1]):
    llm = edgert.load(art, context=128, threads=1)
    out["strategies"].append(llm.model.strategy)
    out["backends"].append(llm.tokenizer.backend)
    ids = llm.encode(prompt, raw=raw)
    logits, greedy, margins = llm.model.forward(ids)[-1], [], []
    for i in range(20):
        second, first = np.sort(logits)[-2:]
        greedy.append(int(np.argmax(logits)))
        margins.append(float(first - second))
        logits = llm.model.forward([forced[i] if forced else greedy[-1]])[-1]
    decoder = StreamDecoder(llm.tokenizer)
    text = "".join(decoder.push(t) for t in forced or greedy) + decoder.flush()
    out["runs"].append({"ids": ids, "greedy": greedy, "margins": margins, "text": text})
print(json.dumps(out))
"""
# `run --votes`: sampled paths stepped together in one batch, each vote's tokens and summed log-probability
VOTES_SCRIPT = HEADER + """
import edgert
for art, prompt in json.loads(sys.argv[1]):
    llm = edgert.load(art, context=128, threads=1, slots=3)
    r = llm.vote(prompt, 3, max_tokens=16, temperature=0.9, top_p=0.95, seed=5)
    out["runs"].append([[v["tokens"], v["logprob"]] for v in r["votes"]])
print(json.dumps(out))
"""
# int4/int8 MatMulNBits (accuracy_level 4) logits differ between onnxruntime 1.22 and 1.32 by up to
# ~0.3 on these models (fp32 artifacts agree exactly), so a top-2 margin below this is a near-tie.
NEAR_TIE = 0.5


def same_choices(old_python: str, jobs, exact: list[bool]) -> tuple[dict, dict]:
    """Greedy on the current onnxruntime, then the old one teacher-forced along that path: fp32
    artifacts must agree exactly, quantized ones everywhere but at near-ties (MatMulNBits rounds
    activations slightly differently across versions)."""
    new = run_on(sys.executable, IDS_SCRIPT, [(art, prompt, None) for art, prompt in jobs])
    old = run_on(old_python, IDS_SCRIPT, [(art, prompt, run["greedy"]) for (art, prompt), run in zip(jobs, new["runs"])])
    for (art, _), o, n, must_equal in zip(jobs, old["runs"], new["runs"], exact):
        differ = [(i, n["margins"][i]) for i, (a, b) in enumerate(zip(o["greedy"], n["greedy"])) if a != b]
        assert not differ if must_equal else all(margin < NEAR_TIE for _, margin in differ), (art, differ)
    return old, new


def run_on(python: str, script: str, jobs) -> dict:
    r = subprocess.run([python, "-c", script, json.dumps(jobs)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def chatml_checkpoint(out):
    """A tiny Qwen2 with the benchmarks' byte-level BPE tokenizer (Qwen2's pre-tokenizer) and ChatML template."""
    pytest.importorskip("tokenizers")
    spec = importlib.util.spec_from_file_location("checkpoints", ROOT / "benchmarks" / "checkpoints.py")
    checkpoints = sys.modules.setdefault("checkpoints", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(checkpoints)     # registered first: its dataclasses look their module up
    make_checkpoint(out, "qwen2", vocab_size=2048)
    checkpoints.write_tokenizer(out, 256)
    return out


def test_old_onnxruntime_gives_identical_tokens(tmp_path, exported, old_ort_python):
    qwen3 = make_checkpoint(tmp_path / "qwen3", "qwen3", head_dim=16, tie_word_embeddings=True)
    moe = make_checkpoint(tmp_path / "moe", "qwen3_moe", num_experts=16, num_experts_per_tok=2, moe_intermediate_size=32,
                          norm_topk_prob=True, head_dim=16)
    moe2 = make_checkpoint(tmp_path / "moe2", "qwen2_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=64)
    mla = make_checkpoint(tmp_path / "mla", "deepseek_v3", n_routed_experts=16, num_experts_per_tok=3,
                          moe_intermediate_size=32, n_shared_experts=1, kv_lora_rank=32, q_lora_rank=24,
                          qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, first_k_dense_replace=1,
                          num_key_value_heads=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    prompt = [1, 403, 407, 261, 378]
    # bits 4 is the default export (int4 with int8 embeddings and lm_head, block 32)
    cases = [(src, bits, {}) for src in (BUNDLED_STORIES, qwen3, moe, moe2, mla) for bits in (32, 8, 4)]
    # the int8 cache: the standard-op graph on 1.22; the calibrated int4 export also carries the kv8gqa
    # twin, which onnxruntime >= 1.27 runs (GroupQueryAttention's own int8 cache): the same choices
    cases += [(qwen3, bits, {"kv_cache": "int8"}) for bits in (32, 4)]
    jobs = [(str(exported(src, bits, **kw)), prompt) for src, bits, kw in cases]
    old, new = same_choices(old_ort_python, jobs, exact=[bits == 32 for _, bits, _ in cases])
    assert old["version"].startswith("1.22"), old["version"]
    assert not old["has_tokenizers"], "the old-onnxruntime Python must lack tokenizers, as Termux does"
    assert "qmoe" not in old["strategies"] and "plain" in old["strategies"]
    from edgert.model import KV8GQA_SINCE, ort_version
    assert old["strategies"][-1] == "default" and "kv8gqa" not in old["strategies"]
    assert new["strategies"][-1] == ("kv8gqa" if ort_version() >= KV8GQA_SINCE else "default")


def test_old_onnxruntime_without_tokenizers_gives_identical_text(tmp_path, exported, old_ort_python):
    """Default exports, dense and MoE, from text to text: pure-Python tokenizer + onnxruntime 1.22
    against `tokenizers` + the current onnxruntime."""
    pytest.importorskip("tokenizers")
    chatml = chatml_checkpoint(tmp_path / "qwen2-chatml")
    moe = make_checkpoint(tmp_path / "moe", "qwen3_moe", num_experts=16, num_experts_per_tok=2, moe_intermediate_size=32,
                          norm_topk_prob=True, head_dim=16)
    jobs = [(str(exported(BUNDLED_STORIES, 4)), 'Once upon a time, Lily\'s cat said: "Hi!" and ran 3 km.', True),
            (str(exported(chatml, 4)), "Wie viel kostet 3 × 4 € — naïve café 🙂? def f(x): return x**2", False),
            (str(exported(moe, 4)), "The little dog found a big red ball in the park.", True)]
    new = run_on(sys.executable, TEXT_SCRIPT, [(*job, None) for job in jobs])
    old = run_on(old_ort_python, TEXT_SCRIPT, [(*job, run["greedy"]) for job, run in zip(jobs, new["runs"])])
    assert not old["has_tokenizers"] and set(old["backends"]) == {"python"}
    assert set(new["backends"]) == {"tokenizers"}
    assert old["strategies"][-1] == "plain" and new["strategies"][-1] == "qmoe"
    for o, n in zip(old["runs"], new["runs"]):
        assert o["ids"] == n["ids"] and len(n["ids"]) > 10                 # the same tokenization
        assert o["text"] == n["text"] and len(n["text"]) > 10               # the same streamed text
        differ = [(i, n["margins"][i]) for i, (a, b) in enumerate(zip(o["greedy"], n["greedy"])) if a != b]
        assert all(margin < NEAR_TIE for _, margin in differ), differ      # the same choices but at near-ties


def test_the_exporter_calibrates_on_old_onnxruntime(tmp_path, exported, old_ort_python):
    """The exporter runs on the device too (Termux: onnxruntime 1.22, no tokenizers): its calibration
    probe (fp16 cache, batched self-sampling, reused output arrays) must run there, and the artifact
    must answer as the one calibrated on this onnxruntime (a trained fixture: its greedy answers)."""
    fixture = ROOT / "export" / "data" / "reasoning-qwen2"
    path = tmp_path / "path"               # the packages as the installed names, without installing
    path.mkdir()
    (path / "edgert").symlink_to(ROOT / "edgert")
    (path / "edgert_export").symlink_to(ROOT / "export")
    out = tmp_path / "old-export"
    r = subprocess.run([old_ort_python, "-c", "import sys; from edgert_export.artifact import export; "
                        "export(sys.argv[1], sys.argv[2], progress=False)", str(fixture), str(out)],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(path)))
    assert r.returncode == 0, r.stderr[-2000:]
    q = json.loads((out / "edgert.json").read_text())["quantization"]
    assert q["calibration"] == "self" and q["calibration_tokens"] >= 2048
    from edgert.model import Model
    here = Model(exported(fixture, 4), context=128, threads=1)
    there = Model(out, context=128, threads=1)
    for p in json.loads((fixture / "fixture.json").read_text())["held_out_ids"][:4]:       # problem + answer ids
        a, b = (m.forward(p, num_logits=len(p)).argmax(-1) for m in (here, there))
        here.reset(), there.reset()
        assert (a == b).mean() >= 0.9, (a, b)


def test_old_onnxruntime_draws_the_same_votes(exported, old_ort_python):
    """Seeded votes (the batch engine, the sampler's top-p draw and each vote's log-probability, numpy
    alone) on onnxruntime 1.22 and this one: an fp32 artifact, whose logits agree exactly across
    versions, gives the same tokens and log-probabilities."""
    job = [(str(exported(BUNDLED_STORIES, 32)), [1, 403, 407, 261, 378])]
    old, new = run_on(old_ort_python, VOTES_SCRIPT, job), run_on(sys.executable, VOTES_SCRIPT, job)
    assert old["version"].startswith("1.22"), old["version"]
    (o,), (n,) = old["runs"], new["runs"]
    assert [t for t, _ in o] == [t for t, _ in n] and len({tuple(t) for t, _ in n}) > 1   # the votes differ
    assert [lp for _, lp in o] == pytest.approx([lp for _, lp in n], abs=1e-4)


def test_wide_tables_on_old_onnxruntime(tmp_path, exported, old_ort_python, monkeypatch):
    """Crossing the tables' blocks of 128 (rows 256 wide, as every real shape's) with onnxruntime 1.22:
    the split int8 lm_head of a 20k vocabulary (coarse int4 plane + int8 candidates) and the plain
    int8 lm_head of a 512-token one, and that one's nibble twin (ARM's 1.22 has no 8-bit kernel)."""
    wide = dict(hidden_size=256, intermediate_size=128, tie_word_embeddings=True)
    split = make_checkpoint(tmp_path / "split", "qwen2", vocab_size=20000, **wide)
    small = make_checkpoint(tmp_path / "small", "qwen2", **wide)
    arts = [exported(src, 4) for src in (split, small)]
    for art, candidates in zip(arts, (True, False)):
        q = json.loads((art / "edgert.json").read_text())["quantization"]
        assert q["block_size"] == 128 and ("lm_head_int8_candidates" in q) == candidates
    prompt = [1, 403, 407, 261, 378]
    old, new = same_choices(old_ort_python, [(str(a), prompt) for a in arts], exact=[False, False])
    assert old["version"].startswith("1.22")
    monkeypatch.setenv("EDGERT_INT8_KERNEL", "0")
    old, new = same_choices(old_ort_python, [(str(arts[1]), prompt)], exact=[False])
    assert old["strategies"] == new["strategies"] == ["nibbles"]
