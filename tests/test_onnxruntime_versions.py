"""The same artifacts on an older onnxruntime (Termux packages 1.22): identical greedy tokens.
MoE artifacts run the plain expert graph there (no QMoE kernel before 1.23); here they run
QMoE by default, so this also checks the two strategies against each other.

Runs when EDGERT_ORT_PYTHON names a Python whose onnxruntime is the old one (.ci/run makes a
venv with onnxruntime 1.22.1 for it); otherwise skips, saying so.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import BUNDLED_STORIES, ROOT, make_checkpoint

OTHER = os.environ.get("EDGERT_ORT_PYTHON")

SCRIPT = """
import json, sys
import numpy as np, onnxruntime
from edgert.model import Model
out = {"version": onnxruntime.__version__, "runs": []}
for art, prompt in json.loads(sys.argv[1]):
    m = Model(art, context=128, threads=1)
    out.setdefault("strategies", []).append(m.strategy)
    logits, ids = m.forward(prompt)[-1], []
    for _ in range(24):
        ids.append(int(np.argmax(logits)))
        logits = m.forward([ids[-1]])[-1]
    out["runs"].append(ids)
print(json.dumps(out))
"""


def greedy_on(python: str, jobs) -> dict:
    r = subprocess.run([python, "-c", SCRIPT, json.dumps(jobs)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


@pytest.mark.skipif(not OTHER, reason="set EDGERT_ORT_PYTHON to a Python with onnxruntime 1.22.x (.ci/run does)")
def test_old_onnxruntime_gives_identical_tokens(tmp_path, exported):
    import sys
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
    jobs = [(str(exported(src, bits)), prompt) for src in (BUNDLED_STORIES, qwen3, moe, moe2, mla) for bits in (32, 8, 4)]
    old, new = greedy_on(OTHER, jobs), greedy_on(sys.executable, jobs)
    assert old["version"].startswith("1.22"), old["version"]
    assert "qmoe" not in old["strategies"] and "plain" in old["strategies"]
    assert old["runs"] == new["runs"]
