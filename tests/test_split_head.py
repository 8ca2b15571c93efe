"""The default lm_head of every real model: int8 over a vocabulary of 16k or more, stored as two
int4 planes (graph.split_int8 / candidate_logits), exported from a tiny random Qwen2 at a real
vocabulary size and compared with transformers fp32.

The layers are int8 so that the head's own error shows. Measured here (96 positions):
  vocab 151,936 tied:  split KL 1.9e-3 top-1 0.969 | int4 head 4.9e-3 0.646 | fp32 head 9e-5 0.969
  vocab 20,000 untied: split KL 1.4e-2 top-1 0.948 | int4 head 4.9e-2 0.635 | fp32 head 8e-4 0.938
and the mean error of the reference's 8 best logits: split 0.0115 / 0.033, int4 head 0.083 / 0.27,
fp32 head (the int8 layers' error alone) 0.0106 / 0.031. 256 wide (the table's blocks 128, as on the
real shapes): split KL 1.1e-2 top-1 0.865, int4 head 5.3e-2 0.521, fp32 head 8.8e-4 0.948; best
logits 0.040 / 0.30 / 0.033 (blocks of 32 gave KL 8.3e-3, the flat tail's int4 error).
The split head must keep an fp32 head's top-1 (its picks are int8's) and well under the int4
head's KL and error on the best logits; a head left at int4 precision (candidates not recomputed) lands at the int4 figures,
and a split head that is switched off is caught by the manifest and the graph."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import hf_logits, hf_model, make_checkpoint
from edgert.model import Model
from edgert_export import export
from edgert_export.decoder import Decoder

POSITIONS = 96


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _score(art, ids, want) -> tuple[float, float, np.ndarray]:
    got = Model(art, context=128).forward(ids, num_logits=len(ids)).astype(np.float64)
    lp, lq = _log_softmax(want), _log_softmax(got)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean()), float((got.argmax(-1) == want.argmax(-1)).mean()), got


@pytest.mark.parametrize("vocab,tied,head_scale,hidden", [(151936, True, 1.0, 64), (20000, False, 3.0, 64),
                                                          (151936, True, 1.0, 256)],
                         ids=["qwen2.5-vocab-tied", "20k-untied", "qwen2.5-vocab-tied-256wide"])
def test_split_int8_head_against_transformers(vocab, tied, head_scale, hidden, tmp_path):
    """(256 wide: the table's blocks are 128, as on every real shape; 64 wide: 32.)"""
    def widen_head(model):      # untied: sharper distributions, so the head's error carries weight
        if not tied:
            model.lm_head.weight.mul_(head_scale)
    src = make_checkpoint(tmp_path / "hf", "qwen2", vocab_size=vocab, tie_word_embeddings=tied, intermediate_size=128,
                          hidden_size=hidden, tweak=widen_head)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 512, POSITIONS)]
    want = hf_logits(hf_model(src), ids).astype(np.float64)

    # fp32 KV caches: the fp16 cache's rounding moves near-tie top-1 picks by a few positions either way
    export(src, tmp_path / "split", bits=8, progress=False, kv_cache="fp32")          # default --embed-bits 8
    manifest = json.loads((tmp_path / "split" / "edgert.json").read_text())
    assert manifest["quantization"]["lm_head"] == 8 and manifest["quantization"]["block_size"] == (128 if hidden == 256 else 32)
    assert manifest["quantization"]["lm_head_int8_candidates"] == Decoder.lm_head_candidates == 64
    graph = onnx.load(str(tmp_path / "split" / "model.onnx"), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    head = "embed_tokens" if tied else "lm_head"
    assert {f"{head}.qweight_hi", f"{head}.qweight_lo"} <= inits
    assert any(n.op_type == "TopK" for n in graph.node)

    export(src, tmp_path / "int4head", bits=8, embed_bits=4, progress=False, kv_cache="fp32")
    export(src, tmp_path / "fp32head", bits=8, embed_bits=32, progress=False, kv_cache="fp32")
    kl_split, top1_split, got_split = _score(tmp_path / "split", ids, want)
    kl_int4, top1_int4, got_int4 = _score(tmp_path / "int4head", ids, want)
    kl_fp32, top1_fp32, got_fp32 = _score(tmp_path / "fp32head", ids, want)
    print(f"\nvocab {vocab}: KL / top-1 split {kl_split:.2e}/{top1_split:.3f} int4 head {kl_int4:.2e}/{top1_int4:.3f} "
          f"fp32 head {kl_fp32:.2e}/{top1_fp32:.3f}")
    # 256 wide, the random model's best logits are near ties (median gap 0.18) under the int8 layers'
    # error: over five prompts its top-1 spread 0.84-0.95 with tables of 32 and 0.87-0.95 with 128
    # (the fp32 head 0.95-0.97), so there only a head of int4 precision is caught by top-1
    assert top1_split >= top1_fp32 - (2 / POSITIONS if hidden == 64 else 0.12) and top1_split >= 0.82
    assert kl_split < 0.5 * kl_int4
    # the head of the distribution is int8's: the logits of the reference's 8 best tokens
    top8 = np.argsort(want, -1)[:, -8:]
    err = {k: float(np.abs(np.take_along_axis(g - want, top8, -1)).mean()) for k, g in
           (("split", got_split), ("int4", got_int4), ("fp32", got_fp32))}
    print("mean |error| of the 8 best logits:", err)
    assert err["split"] < 0.3 * err["int4"] and err["split"] < 1.5 * err["fp32"]
