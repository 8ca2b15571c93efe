"""`edgert eval`: perplexity of an artifact on a text, and its distance from a reference model.

The definition, so numbers compare across tools: the text is tokenized as one sequence with the
tokenizer's own special tokens (BOS once, at the start), cut into consecutive non-overlapping
windows of W tokens; inside each window every token but the first is scored given its prefix in
that window. A shorter last window is scored like the others when it has at least 2 tokens (a
single leftover token has no prefix to be scored from and is dropped). ppl = exp(mean NLL).

With a reference (another artifact, or a Hugging Face folder run by transformers in fp32), the
same positions also give the mean KL(reference || artifact) of the next-token distributions and
how often both put the same token first. Log-softmax and sums run in float64.
"""
from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import numpy as np

from .artifact import ArtifactError, read_manifest
from .model import Model
from .tokenizer import Tokenizer

DEFAULT_WINDOW = 512
ROWS_PER_CHUNK = 64      # float64 log-softmax of 512 rows x 152k vocab would take 620 MB at once


class EvalError(Exception):
    """Input that cannot be evaluated; one line for the user."""


def sample_text() -> str:
    """The built-in text: original children's stories (held out from every model's training)."""
    return resources.files("edgert").joinpath("data/stories.txt").read_text(encoding="utf-8")


def quantization_summary(manifest: dict) -> dict:
    """What the artifact stores: bits per weight over the whole file and over the projections
    (codes + scales + zero points), the budget it was exported under, the recipe and calibration,
    and how many tensors got each layout ("int4/b32": n, ...)."""
    q = manifest.get("quantization") or {}
    out = {k: q[k] for k in ("bits_per_weight", "linear_bits_per_weight", "bits_per_weight_budget", "recipe",
                             "calibration") if k in q}
    layouts: dict[str, int] = {}
    for t in (q.get("tensors") or {}).values():
        key = f"int{t.get('bits')}/b{t.get('block_size')}"
        layouts[key] = layouts.get(key, 0) + 1
    if layouts:
        out["layouts"] = dict(sorted(layouts.items()))
    return out


def split_windows(ids: list[int], window: int) -> list[list[int]]:
    """Consecutive non-overlapping windows; a last window of fewer than 2 tokens scores nothing."""
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids) - i >= 2]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class ArtifactScorer:
    """Logits of every position of a window from an artifact: one prefill call per window."""

    def __init__(self, path, window: int | None = None, threads: int | None = None, strategy: str | None = None):
        self.manifest = read_manifest(path)
        self.context = self.manifest["context_length"]
        self.window = window or min(self.context, DEFAULT_WINDOW)
        if self.window > self.context:
            raise EvalError(f"--window {self.window} is longer than {path}'s context ({self.context} tokens)")
        self.model = Model(path, context=self.window, threads=threads, strategy=strategy)   # the cache holds one window
        self.tokenizer = Tokenizer.from_dir(path)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.model.reset()
        return self.model.forward(ids, num_logits=len(ids))


def open_scorer(path, window: int | None, threads: int | None = None):
    path = Path(path)
    if (path / "edgert.json").is_file():
        return ArtifactScorer(path, window, threads)
    if (path / "config.json").is_file():
        # the reference through transformers lives outside the runtime package: the runtime never needs torch
        from edgert_export.reference import TransformersScorer
        return TransformersScorer(path, window, threads)
    if not path.is_dir():
        raise EvalError(f"{path}: no such folder")
    raise EvalError(f"{path}: neither an edgert artifact (edgert.json) nor a Hugging Face folder (config.json)")


def score_window(ids: list[int], logits: np.ndarray, ref_logits: np.ndarray | None = None) -> dict:
    """Sums over the window's scored positions: NLL (and the reference's NLL, KL, top-1 matches)."""
    targets = np.asarray(ids[1:])
    out = {"nll": 0.0, "ref_nll": 0.0, "kl": 0.0, "top1": 0}
    for a in range(0, len(targets), ROWS_PER_CHUNK):
        rows = slice(a, a + ROWS_PER_CHUNK)
        t = targets[rows]
        lq = log_softmax(logits[:-1][rows])
        out["nll"] -= lq[np.arange(len(t)), t].sum()
        if ref_logits is not None:
            lp = log_softmax(ref_logits[:-1][rows])
            out["ref_nll"] -= lp[np.arange(len(t)), t].sum()
            p, keep = np.exp(lp), np.isfinite(lp)      # tokens the reference rules out (-inf) add 0, not nan
            out["kl"] += (p[keep] * (lp[keep] - lq[keep])).sum()
            out["top1"] += int((lp.argmax(-1) == lq.argmax(-1)).sum())
    return out


def evaluate(artifact, text: str | None = None, reference=None, window: int | None = None,
             threads: int | None = None, moe_strategy: str | None = None) -> dict:
    """Perplexity of `artifact` on `text` (default: the built-in stories) and, with a reference,
    mean KL(reference || artifact), top-1 agreement and the reference's perplexity. moe_strategy picks
    the artifact's expert graph (a MoE artifact against itself with another strategy compares the two)."""
    if window is not None and window < 2:
        raise EvalError(f"--window must be at least 2 tokens (one to condition on, one to score), not {window}")
    text = sample_text() if text is None else text
    if not text.strip():
        raise EvalError("the text is empty")
    asked = window
    scorer = ArtifactScorer(artifact, window, threads, moe_strategy)
    window = scorer.window
    if window < 2:
        raise EvalError(f"{artifact}'s context holds {window} token: a window needs at least 2 (one to condition on, "
                        f"one to score); re-export with a longer --context")
    # an unasked window: the reference opens at its own default, and the shorter context wins (below)
    ref = open_scorer(reference, window if asked is not None else None, threads) if reference is not None else None
    ids = scorer.tokenizer.encode(text, add_special_tokens=True)
    if ref is not None:
        if ref.tokenizer.encode(text, add_special_tokens=True) != ids:
            raise EvalError(f"{reference} tokenizes the text differently from {artifact}: they do not share a tokenizer")
        if ref.context is not None and window > ref.context:
            if asked is not None or ref.context < 2:
                raise EvalError(f"--window {window} is longer than the reference's context ({ref.context} tokens)")
            window = ref.context                    # the default: the shorter of the two contexts
    windows = split_windows(ids, window)
    if not windows:
        raise EvalError(f"the text is {len(ids)} token(s) long: nothing to score (a window needs at least 2)")
    t0 = time.perf_counter()
    totals = {"nll": 0.0, "ref_nll": 0.0, "kl": 0.0, "top1": 0}
    for w in windows:
        logits = scorer.logits(w)
        ref_logits = ref.logits(w) if ref is not None else None
        if ref_logits is not None and ref_logits.shape[-1] != logits.shape[-1]:
            raise EvalError(f"the reference has {ref_logits.shape[-1]} logits per token, the artifact "
                            f"{logits.shape[-1]}: different vocabularies")
        for k, v in score_window(w, logits, ref_logits).items():
            totals[k] += v
    n = sum(len(w) - 1 for w in windows)
    result = {"ppl": float(np.exp(totals["nll"] / n)), "tokens": n, "windows": len(windows), "window": window,
              "seconds": round(time.perf_counter() - t0, 3), "quantization": quantization_summary(scorer.manifest)}
    if ref is not None:
        result.update(kld=float(totals["kl"] / n), top1=totals["top1"] / n, ref_ppl=float(np.exp(totals["ref_nll"] / n)))
    for key, who in (("ppl", artifact), ("ref_ppl", reference), ("kld", reference)):
        if key in result and not np.isfinite(result[key]):
            raise EvalError(f"{who} gives logits that are not finite (NaN or infinite weights?): no {key} to report")
    return result


__all__ = ["evaluate", "sample_text", "split_windows", "EvalError", "ArtifactError", "DEFAULT_WINDOW"]
