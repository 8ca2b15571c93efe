"""Folded decode (export/graph.py Fold): with a float cache, a decode step or a short feed after a
past runs GroupQueryAttention with each KV head's query heads as rows of one head, so the kernel
reads every cached key and value once per KV head. It must give what the kernel's per-head path and
transformers give, write its zero rows only into the cache's headroom, and fit at the context's end."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import hf_logits, hf_model, make_checkpoint
from edgert.engine import Engine
from edgert.model import Model

FOLD_MAX = 16
IDS = [1, *np.random.default_rng(3).integers(3, 512, 47).tolist()]     # 48 tokens


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    """14 query heads on 2 KV heads (Qwen2.5-0.5B's grouping), 16-wide heads."""
    src = make_checkpoint(tmp_path_factory.mktemp("g7"), "qwen2", hidden_size=224, num_attention_heads=14,
                          num_key_value_heads=2, intermediate_size=128)
    return src, hf_logits(hf_model(src), IDS)


def feed(model: Model, sizes: list[int]) -> np.ndarray:
    """IDS fed in pieces of these sizes; every position's logits."""
    model.reset()
    out, at = [], 0
    for n in sizes:
        out.append(model.forward(IDS[at:at + n], num_logits=n))
        at += n
    assert at == len(IDS)
    return np.concatenate(out)


@pytest.mark.parametrize("kv,tol", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_folded_steps_match_the_per_head_path_and_transformers(seven, exported, kv, tol):
    src, want = seven
    model = Model(exported(src, 32, kv_cache=kv), context=64)
    room = model.manifest["model"]["kv_headroom"]
    assert room == (7 - 1) * FOLD_MAX and all(c.shape[2] == 64 + room for c in model.cache)
    whole = feed(model, [len(IDS)])                              # 48 tokens: the per-head path
    assert np.abs(whole - want).max() < tol
    for sizes in ([1] * len(IDS), [5, 1, 16, 1, 3, 17, 1, 4], [20, 16, 12]):   # folded after the first piece
        got = feed(model, sizes)
        assert np.abs(got - want).max() < tol, sizes
        assert np.abs(got - whole).max() < tol / 10, sizes


def test_the_fold_writes_zero_rows_into_the_headroom_only(seven, exported):
    """The fold is really in the path: its padding rows land past the sequence's end (the per-head
    path writes none) and are never attended (rows of garbage there change nothing)."""
    src, want = seven
    model = Model(exported(src, 32, kv_cache="fp32"), context=64)
    model.reset()
    model.forward(IDS[:20])
    for buf in model.cache:
        buf[0, :, 20:] = 7.0                     # garbage past the end: what a longer earlier sequence left
    step = model.forward(IDS[20:21])
    assert np.abs(step - want[20]).max() < 1e-3
    for buf in model.cache:
        assert np.all(buf[0, :, 21:27] == 0) and np.all(buf[0, :, 27:] == 7.0)     # 6 zero rows: (G - 1) x 1
    chunk = model.forward(IDS[21:25], num_logits=4)                                 # 4 tokens: 6 x 4 zero rows
    assert np.abs(chunk - want[21:25]).max() < 1e-3
    for buf in model.cache:
        assert np.all(buf[0, :, 25:49] == 0) and np.all(buf[0, :, 49:] == 7.0)
    model.forward(IDS[25:25 + FOLD_MAX + 1], num_logits=1)                        # 17 tokens: per head
    for buf in model.cache:
        assert np.all(buf[0, :, 42:49] == 0) and np.all(buf[0, :, 49:] == 7.0)       # nothing written past its end


def test_batched_steps_stay_per_head_and_match(seven, exported):
    """Several rows in one forward keep the per-head path (the CPU kernel takes several rows only
    one token each): the same logits as each sequence alone, folded."""
    src, want = seven
    art = exported(src, 32, kv_cache="fp16")
    engine = Engine(Model(art, context=64, slots=2))
    a = engine.open(IDS[:11])
    engine.step({a: IDS[:10]})
    b = engine.open(IDS[:16])                       # copies a's 10 rows
    engine.step({b: IDS[b.pos:15]})
    out = engine.step({a: [IDS[10]], b: [IDS[15]]})   # one forward of two rows
    assert np.abs(out[a] - want[10]).max() < 2e-2 and np.abs(out[b] - want[15]).max() < 2e-2


def test_the_fold_fits_at_the_end_of_the_context(seven, exported):
    """The last decode steps of a full context write their zero rows into the headroom, not out of
    the buffer; a verify of 16 tokens that ends at the context's end too."""
    src, want = seven
    model = Model(exported(src, 32, kv_cache="fp32"), context=len(IDS))
    got = feed(model, [len(IDS) - 4, 1, 1, 1, 1])
    assert np.abs(got - want).max() < 1e-3
    got = feed(model, [len(IDS) - FOLD_MAX, FOLD_MAX])
    assert np.abs(got - want).max() < 1e-3


def test_int8_and_sink_models_do_not_fold(tmp_path, exported):
    """No headroom where nothing folds: the int8 cache (its kernels do not gain) and gpt-oss (a sink per query head)."""
    import json
    from conftest import ROOT
    manifest = lambda art: json.loads((art / "edgert.json").read_text())["model"]       # noqa: E731
    assert "kv_headroom" not in manifest(exported(ROOT / "export" / "data" / "reasoning-qwen2", bits=4))
    oss = make_checkpoint(tmp_path / "oss", "gpt_oss", num_local_experts=4, num_experts_per_tok=2, head_dim=16)
    assert "kv_headroom" not in manifest(exported(oss, bits=32, kv_cache="fp16"))


def test_an_edited_headroom_is_refused_at_load_in_one_line(seven, exported, tmp_path):
    """The graph records the rows its fold writes past a sequence's end: an edgert.json that reserves
    fewer (edited by hand) is refused when the model loads, not at the last steps of a full context."""
    import json
    import shutil
    from test_cli import assert_one_line_error, edgert
    art = tmp_path / "art"
    shutil.copytree(exported(seven[0], 32, kv_cache="fp16"), art)
    meta = __import__("onnxruntime").InferenceSession(str(art / "model.onnx")).get_modelmeta().custom_metadata_map
    assert meta["edgert.kv_headroom"] == str((7 - 1) * FOLD_MAX)
    manifest = json.loads((art / "edgert.json").read_text())
    for room in (10, None):
        if room is None:
            del manifest["model"]["kv_headroom"]
        else:
            manifest["model"]["kv_headroom"] = room
        (art / "edgert.json").write_text(json.dumps(manifest))
        assert_one_line_error(edgert("run", art, "Hi", "--max-tokens", "2"), "does not match the graph",
                              "kv_headroom reserves", "re-export")
