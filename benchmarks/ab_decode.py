"""Two artifacts' decode steps compared in one process, alternating: for changes worth a few percent.

    python benchmarks/ab_decode.py ART_A ART_B [--rounds 20] [--steps 15] [--prompt-len 128]
                                   [--threads 2] [--context 2048] [--json out.json]

Separate bench processes on a shared box drift by 10% and more between runs, which buries a
2-3% change. Here both models are loaded into one process, fed the same seeded prompt, and then
take turns, strictly X, Y, X, Y, ..., X: each turn is the prompt and `steps` greedy decode steps
through edgert's generate loop, and times the decode steps. Every turn
follows a turn of the other model, so both start equally cold (a model that runs twice in a row
finds its own bytes in the caches, up to 20% faster on this box). Each Y turn is compared with the
mean of the X turns on either side of it, which cancels a drift of the box that is linear over a
turn. The load order is a bias too (up to ~6% here, either way), so this runs twice: A loaded
first, then, in a fresh pair of sessions, B first. The figure to quote is the geometric mean of
the two legs' median B/A.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def turn(model, prompt: list[int], n: int) -> float:
    """One turn: the prompt, then n greedy decode steps through edgert's own generate loop;
    milliseconds a decode step (the prefill is not timed)."""
    from edgert.generate import Sampling, Stats, generate
    stats = Stats()
    for _ in generate(model, prompt, n + 1, Sampling(0.0), stats=stats):
        pass
    return stats.decode_s / stats.decode_steps * 1e3


def leg(first, second, rounds: int, n: int, prompt_len: int, threads: int, context: int) -> dict:
    """Load `first` then `second`; turns first, second, ..., first. Per-turn ms and second/first ratios."""
    from edgert.model import Model

    models = [Model(a, context=context, threads=threads) for a in (first, second)]
    if models[0].vocab != models[1].vocab:
        raise ValueError("the two artifacts have different vocabularies: compare builds of one model")
    if prompt_len + n + 1 > min(m.context for m in models):
        raise ValueError(f"{prompt_len} + {n + 1} tokens do not fit the context: a shorter --prompt-len or fewer --steps")
    prompt = [int(i) for i in np.random.default_rng(0).integers(3, models[0].vocab, prompt_len)]
    for m in models:
        turn(m, prompt, n)                      # warm-up, untimed
    ms = [[], []]
    for r in range(2 * rounds + 1):             # X Y X Y ... X
        ms[r % 2].append(turn(models[r % 2], prompt, n))
    x, y = np.array(ms[0]), np.array(ms[1])
    ratios = y / ((x[:-1] + x[1:]) / 2)         # each Y turn against the X turns around it
    return {"first": str(first), "first_ms": ms[0], "second_ms": ms[1], "ratios": ratios.tolist(),
            "ratio": float(np.median(ratios))}


def compare(art_a, art_b, rounds: int = 20, n: int = 15, prompt_len: int = 128, threads: int = 2,
            context: int = 2048) -> dict:
    """Two legs, A loaded first and then B; B/A of each and their geometric mean."""
    ab = leg(art_a, art_b, rounds, n, prompt_len, threads, context)
    ba = leg(art_b, art_a, rounds, n, prompt_len, threads, context)
    a_ms, b_ms = ab["first_ms"] + ba["second_ms"], ab["second_ms"] + ba["first_ms"]
    legs = [ab["ratio"], 1 / ba["ratio"]]       # both as B / A
    return {"a": str(art_a), "b": str(art_b), "rounds": rounds, "steps_per_round": n, "prompt_len": prompt_len,
            "threads": threads, "legs": [ab, ba], "a_median_ms": float(np.median(a_ms)),
            "b_median_ms": float(np.median(b_ms)), "ratio_by_leg": legs, "ratio": float(np.sqrt(legs[0] * legs[1]))}


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
    print(f"A {r['a']}: {r['a_median_ms']:.2f} ms a step (median of its turns, {r['steps_per_round']} steps each)")
    print(f"B {r['b']}: {r['b_median_ms']:.2f} ms a step")
    print(f"B / A: {r['ratio_by_leg'][0]:.3f} with A loaded first, {r['ratio_by_leg'][1]:.3f} with B first "
          f"(medians of {r['rounds']} turns, each against the turns around it); geometric mean {r['ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
