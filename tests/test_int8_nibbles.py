"""int8 weights on onnxruntime builds without an 8-bit MatMulNBits kernel (1.22 on ARM: Termux).

Artifacts with int8 tensors carry a twin graph that reads the same bytes as int4 nibbles
(export/graph.py `nibble_matmul`); the runtime picks it when the kernel probe fails.
EDGERT_INT8_KERNEL=0 makes this machine act like such a build.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import BUNDLED_STORIES, ROOT, hf_logits, hf_model, make_checkpoint, runtime_greedy
from edgert.artifact import ArtifactError
from edgert.model import Model, ort_version
from edgert.tokenizer import Tokenizer

PROMPT = [1, 403, 407, 261, 378, 290, 300, 17]
STORY = (ROOT / "edgert" / "data" / "stories.txt").read_text()[:4000]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    # hidden 72: K is not a multiple of the 32-block, so the padding path runs; q/k/v carry biases
    return make_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", hidden_size=72, num_attention_heads=6,
                           num_key_value_heads=2, intermediate_size=100)


def test_nibble_twin_is_as_faithful_as_the_int8_graph(dense, exported):
    art = exported(dense, 8)             # every linear int8, K = 72 is not a multiple of the block
    assert json.loads((art / "edgert.json").read_text())["graphs"] == {"default": "model.onnx",
                                                                      "nibbles": "model.nibbles.onnx"}
    exact = Model(exported(dense, 32)).forward(PROMPT, num_logits=len(PROMPT))
    native = Model(art).forward(PROMPT, num_logits=len(PROMPT))
    nib = Model(art, strategy="nibbles").forward(PROMPT, num_logits=len(PROMPT))
    # The int4 kernel rounds activations its own way, so the twin is not bit-equal to the int8
    # kernel; it must be as close to the unquantized model (a wrong nibble order or zero point
    # gives errors of the logits' own size).
    err_native, err_nib = np.abs(native - exact).max(), np.abs(nib - exact).max()
    assert err_nib < 1.5 * err_native and err_nib < 0.05 * np.abs(exact).max(), (err_native, err_nib)
    assert (nib.argmax(-1) == hf_logits(hf_model(dense), PROMPT).argmax(-1)).mean() >= 0.85


def test_nibble_twin_of_a_real_model_gives_the_same_story(exported):
    art = exported(BUNDLED_STORIES, 4, block_size=32)   # uniform int4 layers, int8 tied lm_head
    assert set(json.loads((art / "edgert.json").read_text())["graphs"]) == {"default", "nibbles"}
    assert runtime_greedy(Model(art, strategy="nibbles"), PROMPT, 40) == runtime_greedy(Model(art), PROMPT, 40)


def test_nibble_twin_of_a_budgeted_export_is_as_faithful(exported):
    """stories260K's default export holds some gate_up at int8 in blocks of 64 (its budget): the
    twin splits them too, and must stay as close to the fp32 model as the int8 kernel over a text
    (the int4 kernel rounds activations its own way; a wrong plane or zero point is far off)."""
    art = exported(BUNDLED_STORIES, 4)
    tensors = json.loads((art / "edgert.json").read_text())["quantization"]["tensors"]
    assert any(v["bits"] == 8 and v["block_size"] == 64 for t, v in tensors.items() if t.startswith("layers."))
    ids = [1] + Tokenizer.from_dir(BUNDLED_STORIES).encode(STORY, add_special_tokens=False)[:127]
    exact = Model(exported(BUNDLED_STORIES, 32)).forward(ids, num_logits=len(ids))
    err = [np.abs(Model(art, strategy=s).forward(ids, num_logits=len(ids)) - exact).mean() for s in ("default", "nibbles")]
    assert err[1] < 1.1 * err[0], err


def test_missing_kernel_picks_the_twin(dense, exported, monkeypatch):
    monkeypatch.setenv("EDGERT_INT8_KERNEL", "0")
    assert Model(exported(dense, 8)).strategy == "nibbles"
    assert Model(exported(dense, 4, embed_bits=4)).strategy == "default"     # no int8 at all
    # int8 only among a budget's projections (stories260K's default), no int8 table: the twin all the same
    # (onnxruntime 1.22 on ARM: "Only 4b quantization is supported for unpacked compute")
    budgeted = exported(BUNDLED_STORIES, 4, embed_bits=32)
    assert any(v["bits"] == 8 for v in json.loads((budgeted / "edgert.json").read_text())["quantization"]["tensors"].values())
    assert Model(budgeted).strategy == "nibbles"


def test_moe_twin_and_refusal(tmp_path, exported, monkeypatch):
    moe = make_checkpoint(tmp_path / "moe", "qwen3_moe", num_experts=8, num_experts_per_tok=2,
                          moe_intermediate_size=32, norm_topk_prob=True, head_dim=16)
    default = exported(moe, 4)        # int4 experts, int8 lm_head
    graphs = json.loads((default / "edgert.json").read_text())["graphs"]
    assert set(graphs) == {"qmoe", "plain", "plain+nibbles"}
    plain = Model(default, strategy="plain")
    want = runtime_greedy(plain, PROMPT, 16)
    monkeypatch.setenv("EDGERT_INT8_KERNEL", "0")
    twin = Model(default)
    assert twin.strategy == "plain+nibbles"
    assert runtime_greedy(twin, PROMPT, 16) == want
    # int8 experts sit inside If branches, which get no twin: refused in one line, not mid-run
    with pytest.raises(ArtifactError, match="no 8-bit MatMulNBits kernel.*--bits 4"):
        Model(exported(moe, 8))


def test_twin_on_onnxruntime_122(dense, exported, monkeypatch, old_ort_python):
    from test_onnxruntime_versions import same_choices
    jobs = [(str(exported(src, bits)), PROMPT) for src, bits in ((dense, 8), (BUNDLED_STORIES, 4))]
    monkeypatch.setenv("EDGERT_INT8_KERNEL", "0")
    old, new = same_choices(old_ort_python, jobs, exact=[False, False])
    assert old["version"].startswith("1.22") and old["strategies"] == new["strategies"] == ["nibbles", "nibbles"]
