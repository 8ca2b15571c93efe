"""Two artifacts' decode steps compared in one process, alternating: for changes worth a few percent.

    python benchmarks/ab_decode.py ART_A ART_B [--rounds 20] [--steps 15] [--prompt-len 128]
                                   [--threads 2] [--context 2048] [--json out.json]

Separate bench processes on a shared box drift by 10% and more between runs, which buries a
2-3% change. Here both models are loaded once, fed the same seeded prompt, and then take turns:
each round times `steps` greedy decode steps of one and then of the other, and the next round
swaps who goes first. The box's drift then hits both alike, but going second in a round is a
bias of its own (a few percent here), so the ratio B/A is reported per order, and their geometric
mean, in which the order's bias cancels, is the figure to quote.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np


def steps(model, token: int, n: int) -> tuple[float, int]:
    """n greedy decode steps from `token`; (seconds, the next token)."""
    t0 = time.perf_counter()
    for _ in range(n):
        token = int(model.forward([token])[-1].argmax())
    return time.perf_counter() - t0, token


def compare(art_a, art_b, rounds: int = 20, n: int = 15, prompt_len: int = 128, threads: int = 2,
            context: int = 2048) -> dict:
    from edgert.model import Model

    models = [Model(a, context=context, threads=threads) for a in (art_a, art_b)]
    if models[0].vocab != models[1].vocab:
        raise ValueError("the two artifacts have different vocabularies: compare builds of one model")
    if prompt_len + (rounds + 1) * n + 1 > min(m.context for m in models):
        raise ValueError(f"{prompt_len} + {(rounds + 1) * n} tokens do not fit the context: fewer --rounds or --steps")
    prompt = np.random.default_rng(0).integers(3, models[0].vocab, prompt_len)
    tokens = []
    for m in models:
        tokens.append(steps(m, int(m.forward(prompt)[-1].argmax()), n)[1])     # warm-up steps, untimed
    ms = [[], []]
    for r in range(rounds):
        for j in ((0, 1) if r % 2 == 0 else (1, 0)):
            secs, tokens[j] = steps(models[j], tokens[j], n)
            ms[j].append(secs / n * 1e3)
    a, b = np.array(ms[0]), np.array(ms[1])
    ratio = b / a
    a_first, b_first = float(np.median(ratio[0::2])), float(np.median(ratio[1::2])) if rounds > 1 else float("nan")
    return {"a": str(art_a), "b": str(art_b), "rounds": rounds, "steps_per_round": n, "prompt_len": prompt_len,
            "threads": threads, "a_ms": ms[0], "b_ms": ms[1],
            "a_median_ms": float(np.median(a)), "b_median_ms": float(np.median(b)),
            "ratio_a_first": a_first, "ratio_b_first": b_first,
            "ratio": math.sqrt(a_first * b_first) if rounds > 1 else a_first}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.prompt_len < 1:
        p.error("--rounds, --steps and --prompt-len must be at least 1")
    from edgert.artifact import ArtifactError
    try:
        r = compare(args.a, args.b, args.rounds, args.steps, args.prompt_len, args.threads, args.context)
    except (ValueError, OSError, ArtifactError) as e:
        print(f"ab_decode: {e}", file=sys.stderr)
        return 2
    print(f"A {r['a']}: {r['a_median_ms']:.2f} ms a step (median of {r['rounds']} rounds of {r['steps_per_round']})")
    print(f"B {r['b']}: {r['b_median_ms']:.2f} ms a step")
    print(f"B / A per round, median: {r['ratio_a_first']:.3f} when A went first, {r['ratio_b_first']:.3f} when B did; "
          f"geometric mean {r['ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
