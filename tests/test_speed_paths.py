"""The int8 lm_head stored as two int4 planes (graph.split_int8 / candidate_logits): the best
candidates must come out at int8 accuracy, the rest within the int4 reading's bound, the
embedding lookup must return the int8 rows, and a real model must keep its greedy tokens."""
from __future__ import annotations


import numpy as np
import pytest
from onnx import TensorProto

from conftest import BUNDLED_STORIES, hf_greedy, hf_logits, hf_model, runtime_greedy
from edgert.model import Model, uses_int8_matmul
from edgert_export import graph as G
from edgert_export.decoder import Decoder

V, H, BS, N, K = 3000, 200, 32, 3, 64       # H is not a multiple of the block: the last block is padded


def _run_head(tmp_path, w, x, ids):
    """One graph: candidate_logits over split planes of w for hidden states x, and the planes' lookup of ids."""
    import onnxruntime as ort
    g = G.Graph(tmp_path / "m.onnx.data")
    h = g.input("h", TensorProto.FLOAT, [1, N, H])
    rows = g.input("ids", TensorProto.INT64, [1, len(ids)])
    table = G.quantized_rows(g, w, "t", 8, BS, planes=True)
    g.output(G.candidate_logits(g, h, table, V, H, BS, K, "lm_head"), "logits", TensorProto.FLOAT, None)
    padded = -(-H // BS) * BS
    g.output(G.gather_quantized_rows(g, rows, *table[:3], 8, H, padded, "embed", table[3]), "rows", TensorProto.FLOAT, None)
    g.save(tmp_path / "m.onnx", "test")
    g.close()
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"h": x, "ids": np.array([ids], np.int64)})


def test_candidates_are_int8_exact_and_the_rest_within_the_int4_bound(tmp_path):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((V, H)) * 0.05).astype(np.float32)
    w[7, 3] = 0.9                                          # an outlier: one block on a coarse grid
    x = rng.standard_normal((1, N, H)).astype(np.float32)
    ids = [0, 7, 2999, 1234]
    logits, rows = _run_head(tmp_path, w, x, ids)
    assert logits.shape == (1, N, V)
    want = x[0] @ w.T                                       # [N, V]
    # per-row error bounds from the block scales: int8 rounding <= s/2, the hi plane alone <= 8 s
    blocks = np.zeros((V, -(-H // BS) * BS), np.float32)
    blocks[:, :H] = w
    s = np.abs(blocks.reshape(V, -1, BS)).max(-1) / G.PLANE_RANGE                   # [V, kb]
    xb = np.zeros((N, blocks.shape[1]), np.float32)
    xb[:, :H] = x[0]
    xabs = np.abs(xb.reshape(N, -1, BS)).sum(-1)                                    # [N, kb]
    bound8, bound4 = 0.5 * xabs @ s.T + 1e-4, 8.5 * xabs @ s.T + 1e-4
    err = np.abs(logits[0] - want)
    assert (err <= bound4).all()
    best = np.argsort(-want, -1)[:, :10]                    # the true top-10 are among the int8 candidates
    assert (np.take_along_axis(err, best, -1) <= np.take_along_axis(bound8, best, -1)).all()
    assert (logits[0].argmax(-1) == want.argmax(-1)).all()
    # most logits outside the candidates carry the coarse error: the test sees the difference
    assert (err > bound8).mean() > 0.1          # (a worst-case bound: the int8 ones never pass it)
    # the embedding lookup reads both planes: int8 rows
    assert np.abs(rows[0] - w[ids]).max() <= 0.5 * s[ids].max() + 1e-6


def _log_softmax(x):
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture
def split_head(monkeypatch):
    """Split the lm_head even for stories260K's 512-token vocabulary."""
    monkeypatch.setattr(Decoder, "split_head_min_vocab", 0)


def test_stories_keeps_greedy_tokens_and_quality(tmp_path, split_head, monkeypatch):
    from edgert_export import export
    src = BUNDLED_STORIES                    # the real trained stories260K, shipped with the exporter
    arts = {}
    for candidates in (0, 64):
        monkeypatch.setattr(Decoder, "lm_head_candidates", candidates)
        arts[candidates] = tmp_path / f"c{candidates}"
        export(src, arts[candidates], bits=8, progress=False)
    ref = hf_model(src)
    prompt = [1, 403, 407]                      # a story opening: no near-ties for 100 greedy tokens at fp32
    want_ids = hf_greedy(ref, prompt, 100)
    plain, split = Model(arts[0]), Model(arts[64])
    assert split.manifest["quantization"]["lm_head_int8_candidates"] == 64
    assert "lm_head_int8_candidates" not in plain.manifest["quantization"]
    # int8 layers still need the 8-bit kernel (absent from onnxruntime 1.22 on aarch64); a split head does not
    assert uses_int8_matmul(split.manifest) and uses_int8_matmul(plain.manifest)
    q = split.manifest["quantization"]
    four = {"quantization": {**q, "attention": 4, "mlp": 4, "tensors": {t: {**v, "bits": 4} for t, v in q["tensors"].items()}}}
    assert not uses_int8_matmul(four)
    four["quantization"]["tensors"]["layers.1.mlp.gate_up"]["bits"] = 8     # a budget's int8 projection
    assert uses_int8_matmul(four)
    assert uses_int8_matmul({"quantization": {**plain.manifest["quantization"], "attention": 4, "mlp": 4}})
    assert runtime_greedy(split, prompt, 100) == want_ids == runtime_greedy(plain, prompt, 100)
    # teacher-forced over the model's own sampled text (as test_quality): as close to fp32 as the plain int8 head
    import torch
    torch.manual_seed(1234)
    with torch.no_grad():
        ids = ref.generate(torch.ones((1, 1), dtype=torch.long), max_new_tokens=300, min_new_tokens=300, do_sample=True,
                           temperature=1.0, top_k=0, pad_token_id=0)[0].tolist()
    want = hf_logits(ref, ids)
    top1, kl, top5_err = {}, {}, {}
    lp, best = _log_softmax(want), np.argsort(-want, -1)[:, :5]
    for k, model in ((0, plain), (64, split)):
        model.reset()
        got = model.forward(ids, num_logits=len(ids))
        top1[k] = (got.argmax(-1) == want.argmax(-1)).mean()
        kl[k] = (np.exp(lp) * (lp - _log_softmax(got))).sum(-1).mean()
        top5_err[k] = np.abs(np.take_along_axis(got - want, best, -1)).mean()
    print(f"\nplain / split int8 head: top-1 {top1}, KL {kl}, mean |error| of the 5 best logits {top5_err}")
    assert top1[64] >= top1[0] - 0.01 and top1[64] > 0.95, top1
    # measured: equal to the plain head; the hi plane alone (no int8 candidates) gives 40x the KL, 5x the error
    assert kl[64] < 1.1 * kl[0] + 1e-4, kl
    assert top5_err[64] < 1.1 * top5_err[0], top5_err


def test_split_head_on_old_onnxruntime(tmp_path, split_head, old_ort_python):
    """TopK, ScatterElements and int4 MatMulNBits without zero points: the same choices on onnxruntime 1.22."""
    from edgert_export import export
    from test_onnxruntime_versions import same_choices
    export(BUNDLED_STORIES, tmp_path / "art", bits=4, progress=False)
    old, _ = same_choices(old_ort_python, [(str(tmp_path / "art"), [1, 403, 407])], exact=[False])
    assert old["version"].startswith("1.22"), old["version"]
