"""`edgert bench`: prefill and decode speed of an artifact on this device, with synthetic tokens
(no tokenizer, no prompt file: the number people compare across a Pi, a phone and a laptop)."""
from __future__ import annotations

import platform
import resource
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

from .generate import Sampling, Stats, generate
from .model import Model


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def bench(path, prompt_tokens: int = 128, gen_tokens: int = 64, repeat: int = 3, threads: int | None = None,
          context: int | None = None, seed: int = 0, strategy: str | None = None, max_memory=None) -> dict:
    t0 = time.perf_counter()
    model = Model(path, context=context or max(prompt_tokens + gen_tokens + 1, 256), threads=threads, strategy=strategy,
                  max_memory=max_memory)
    load_s = time.perf_counter() - t0
    special = model.manifest["special_tokens"]
    avoid = {i for i in [special.get("bos"), special.get("pad"), *(special.get("eos") or [])] if i is not None}
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in rng.integers(0, model.vocab, prompt_tokens * 2) if int(i) not in avoid][:prompt_tokens]
    runs = []
    model.track_experts()                            # only the untimed warm-up round counts expert use
    for _ in range(repeat + 1):                      # the first round warms up (page-in, prepacking)
        stats = Stats()
        for _ in generate(model, ids, gen_tokens, Sampling(0.0), stats=stats):
            pass
        runs.append(stats)
        if len(runs) == 1:
            experts = model.expert_report()
            model.track_experts(False)
    runs = runs[1:]
    m = model.manifest
    return {
        "artifact": str(path), "architecture": m["architecture"], "parameters": m["model"]["parameters"],
        "quantization": m["quantization"], "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
        "threads": model.threads, "repeat": repeat,
        "prefill_tok_s": statistics.median(r.prefill_tok_s for r in runs),
        "decode_tok_s": statistics.median(r.decode_tok_s for r in runs),
        "ms_per_token": 1000 / statistics.median(r.decode_tok_s for r in runs),
        "load_s": load_s, "peak_rss_mb": peak_rss_mb(), "strategy": model.strategy,
        "active_parameters_per_token": experts["active_parameters_per_token"],
        "expert_usage": experts.get("expert_usage"),
        "onnxruntime": ort.__version__, "machine": platform.machine(), "python": platform.python_version(),
    }


def table(r: dict) -> str:
    arch = f"{r['architecture']}, {r['parameters'] / 1e6:.1f}M parameters"
    if r["active_parameters_per_token"] != r["parameters"]:
        arch += f", {r['active_parameters_per_token'] / 1e6:.1f}M active per token ({r['strategy']} experts)"
    rows = [("artifact", r["artifact"]), ("architecture", arch),
            ("prompt / generated", f"{r['prompt_tokens']} / {r['gen_tokens']} tokens, {r['threads']} threads, "
                                   f"median of {r['repeat']}"),
            ("prefill", f"{r['prefill_tok_s']:.1f} tok/s"),
            ("decode", f"{r['decode_tok_s']:.1f} tok/s ({r['ms_per_token']:.1f} ms/token)"),
            ("load", f"{r['load_s']:.2f} s"), ("peak RSS", f"{r['peak_rss_mb']:.0f} MB"),
            ("onnxruntime", f"{r['onnxruntime']} on {r['machine']}")]
    return "\n".join(f"{k:<20} {v}" for k, v in rows)
