"""int8 / int4 quality on a real trained model (stories260K) against transformers fp32.

The evaluation text is the reference model's own sampled stories (seeded), scored teacher-forced
in windows that fill the model's 512-token context: 4 x 512 = 2048 scored positions.
Measured here (x86-64, onnxruntime 1.32): int8 top-1 98.5%, KL 1.0e-3; int4 (the default,
calibrated GPTQ) top-1 87.9%, KL 0.061 (the uncalibrated block search: 85.2%, 0.084).
A 64-wide model is the harshest case for int4 (one block covers half a row), and sampled text
has many near-ties, so top-1 flips there first. Bounds: the issue's int8 floor (98%), and for
int4 1.2x the measured KL, below the block search's: losing the calibration fails it, and a
layout or scale bug lands far outside (top-1 < 50%).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import ROOT, hf_logits, hf_model, stories_dir
from edgert.model import Model

WINDOWS, WINDOW = 4, 512
HELDOUT = ROOT / "edgert" / "data" / "stories.txt"     # the one held-out story text (`edgert eval`'s default)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def reference():
    import torch
    src = stories_dir()
    ref = hf_model(src)
    torch.manual_seed(1234)
    with torch.no_grad():
        texts = ref.generate(torch.ones((WINDOWS, 1), dtype=torch.long), max_new_tokens=WINDOW - 1, do_sample=True,
                             temperature=1.0, top_k=0, min_new_tokens=WINDOW - 1, pad_token_id=0)
    windows = [t.tolist() for t in texts]
    return src, windows, [hf_logits(ref, w) for w in windows]


def quality(artifact, windows, ref_logits) -> tuple[float, float]:
    model = Model(artifact, context=WINDOW)
    agree, kls = [], []
    for ids, want in zip(windows, ref_logits):
        model.reset()
        got = model.forward(ids, num_logits=len(ids))
        lp, lq = _log_softmax(want.astype(np.float64)), _log_softmax(got.astype(np.float64))
        kls.append((np.exp(lp) * (lp - lq)).sum(-1))
        agree.append(got.argmax(-1) == want.argmax(-1))
    return float(np.concatenate(agree).mean()), float(np.concatenate(kls).mean())


def test_int8_and_int4_against_fp32(reference, exported):
    src, windows, ref_logits = reference
    assert sum(len(w) for w in windows) >= 2000
    top1_32, kl_32 = quality(exported(src, 32), windows, ref_logits)
    top1_8, kl_8 = quality(exported(src, 8), windows, ref_logits)
    top1_4, kl_4 = quality(exported(src, 4), windows, ref_logits)
    print(f"\nstories260K top-1 / KL: fp32 {top1_32:.4f}/{kl_32:.2e}  int8 {top1_8:.4f}/{kl_8:.2e}  "
          f"int4 {top1_4:.4f}/{kl_4:.2e}")
    assert top1_32 > 0.999 and kl_32 < 1e-6          # the reference export is exact
    assert top1_8 >= 0.98 and kl_8 < 0.002
    # int4: the default's 6-bit budget on these 64-wide rows (quantize.default_budget) measured 0.883 / 0.043;
    # the same without GPTQ's calibration 0.856 / 0.070, uniform int4 ~0.06
    assert top1_4 >= 0.87 and kl_4 < 0.055
    assert kl_8 < kl_4                               # more bits, closer


def test_greedy_story_identical_at_32_and_8_bits(exported):
    from edgert import load
    src = stories_dir()
    runs = {}
    for bits in (32, 8):
        llm = load(exported(src, bits))
        runs[bits] = "".join(t.text for t in llm.generate("Once upon a time", raw=True, max_tokens=60, temperature=0))
    assert runs[32] == runs[8]
    assert runs[32].startswith(", there was a little girl named Lily")


def test_default_int4_recipe_perplexity(exported):
    """The issue's acceptance on held-out text (edgert/data/stories.txt: original stories, never seen
    by the calibration): the default int4 (GPTQ on the model's own samples) costs <= +5% perplexity
    over fp32, and plain round to nearest at least twice as much. Measured here over 10367 scored
    tokens: default +3.6% (KL 0.062; seeds 1, 2: +4.0%, +4.5%), `--calib built-in` +4.0%,
    `--recipe rtn` +10.0% (KL 0.104);
    the noise of such an increase is ~0.5 points, a regression of the recipe (no calibration, a
    broken GPTQ update, misrouted statistics) lands near the block search or above."""
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quant_recipes import artifact_logprobs, reference_logprobs, score, windows_of
    src = stories_dir()
    windows = windows_of(src, HELDOUT.read_text(), WINDOW)
    ref = reference_logprobs(src, windows)
    base = score(windows, ref, ref)["ppl"]
    got = {r: score(windows, ref, artifact_logprobs(exported(src, 4, **kw), windows, WINDOW))
           for r, kw in (("default", {}), ("rtn", {"recipe": "rtn"}))}
    rise = {r: g["ppl"] / base - 1 for r, g in got.items()}
    print(f"\nstories260K held-out ppl fp32 {base:.4f}; increase: default {rise['default']:+.2%} (KL {got['default']['kl']:.4f}),"
          f" rtn {rise['rtn']:+.2%} (KL {got['rtn']['kl']:.4f})")
    assert got["default"]["tokens"] > 5000
    assert 0 < rise["default"] <= 0.05
    assert rise["rtn"] >= 2 * rise["default"]
    assert got["default"]["kl"] < 0.7 * got["rtn"]["kl"]
