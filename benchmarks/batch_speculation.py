"""More than one token per weight read: batched decode, speculative verification, votes.

    python benchmarks/batch_speculation.py [--shape qwen2.5-0.5b] [--threads 2] [--rounds 5] [--json out.json]

On a real shape (synthetic weights: only speed is measured there) it times, interleaved round by
round, one decode step against
  - a step of B sequences together (B = 2, 4, 8): aggregate tok/s and its ratio to one sequence;
  - a verify forward of 1 + k tokens on one sequence (k = 2, 4, 8): its cost in decode steps;
  - `--votes 4` against one sample of the same length (wall time ratio).
Speculation's acceptance comes from trained models only (random weights loop and would flatter
it): the reasoning-qwen2 fixture (20 held-out problems) and stories260K (3 story openings),
greedy, --speculate ngram. The speed-up they imply on the real shape is
tokens per forward / (verify cost at the mean draft length).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "fixtures")]


def timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def speed(shape: str, threads: int | None, rounds: int, steps: int = 16) -> dict:
    from edgert.bench import synthetic_artifact
    from edgert.engine import Engine
    from edgert.model import Model
    art = synthetic_artifact(shape, 4, 1024)
    model = Model(art, context=1024, threads=threads, slots=8)
    eng = Engine(model)
    prompt = list(range(1000, 1128))
    first = eng.open(prompt)
    eng.step({first: prompt})
    seqs = [first] + [eng.open(prompt) for _ in range(7)]
    eng.step({s: prompt[-1:] for s in seqs[1:]})
    base = [s.pos for s in seqs]

    def reset():
        for s, n in zip(seqs, base):
            eng.rewind(s, n)

    def decode(b):
        def go():
            eng.step({s: [7] for s in seqs[:b]})
        return go

    def verify(k):
        def go():
            eng.score(seqs[0], [7] * (k + 1))
            eng.rewind(seqs[0], base[0])
        return go

    cases = {f"batch{b}": decode(b) for b in (1, 2, 4, 8)} | {f"verify{k}": verify(k) for k in (2, 4, 8)}
    times = {name: [] for name in cases}
    for _ in range(rounds):                        # interleaved: every case once per round
        for name, fn in cases.items():
            reset()
            times[name].append(timed(fn, steps if name.startswith("batch") else 4))
            reset()
    med = {name: statistics.median(t) for name, t in times.items()}
    one = med["batch1"]
    return {"shape": shape, "threads": model.threads, "decode_tok_s": 1 / one,
            "batch": {b: {"aggregate_tok_s": b / med[f"batch{b}"], "ratio": one * b / med[f"batch{b}"]} for b in (2, 4, 8)},
            "verify_cost_in_steps": {k: med[f"verify{k}"] / one for k in (2, 4, 8)}}


def votes_cost(threads: int | None, rounds: int) -> dict:
    """Wall time of --votes 4 against one sample of the same length, on the reasoning fixture."""
    import edgert
    from edgert_export import export
    import reasoning_task as task
    with tempfile.TemporaryDirectory() as d:
        art = Path(d) / "a"
        export(ROOT / "export" / "data" / "reasoning-qwen2", art, bits=4, progress=False)
        llm = edgert.load(art, threads=threads, slots=4)
        p = task.held_out_problems()[0].prompt
        one, four = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            list(llm.generate(p, max_tokens=60, temperature=1.0, seed=1, ignore_eos=True))
            one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            llm.vote(p, 4, max_tokens=60, temperature=1.0, seed=1)
            four.append(time.perf_counter() - t0)
    return {"model": "reasoning-qwen2 int4 (tiny: overhead-bound)", "one_s": statistics.median(one),
            "votes4_s": statistics.median(four), "ratio": statistics.median(four) / statistics.median(one)}


def acceptance(k: int = 4) -> dict:
    import edgert
    from edgert_export import export
    import reasoning_task as task
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for name, src, prompts, raw in (
                ("reasoning-qwen2", "reasoning-qwen2", [p.prompt for p in task.held_out_problems()[:20]], False),
                ("stories260K", "stories260K", ["Once upon a time", "Tom and Lily went", "The cat"], True)):
            art = Path(d) / name
            export(ROOT / "export" / "data" / src, art, bits=32, progress=False)
            llm = edgert.load(art, context=256)
            gen = fwd = drafted = accepted = verify = 0
            for p in prompts:
                list(llm.generate(p, max_tokens=150, temperature=0, raw=raw, speculate=k))
                st = llm.stats
                gen += st.generated
                fwd += st.decode_steps - st.extra.get("accepted", 0)
                drafted += st.extra.get("drafted", 0)
                accepted += st.extra.get("accepted", 0)
                verify += st.extra.get("verify_steps", 0)
            out[name] = {"tokens": gen, "forwards": fwd, "tokens_per_forward": gen / fwd, "drafted": drafted,
                         "accepted": accepted, "verify_forwards": verify,
                         "mean_draft": drafted / max(verify, 1)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    res = {"speed": speed(a.shape, a.threads, a.rounds), "acceptance": acceptance(), "votes": votes_cost(a.threads, a.rounds)}
    cost = res["speed"]["verify_cost_in_steps"]
    for name, acc in res["acceptance"].items():       # interpolate the verify cost at the mean draft length
        ks = sorted(cost)
        c = float(np.interp(acc["mean_draft"], [0] + ks, [1.0] + [cost[k] for k in ks]))
        share = acc["verify_forwards"] / acc["forwards"]
        acc["implied_speedup"] = acc["tokens_per_forward"] / (1 + share * (c - 1))
    s = res["speed"]
    print(f"{a.shape}, {s['threads']} threads: one sequence {s['decode_tok_s']:.1f} tok/s")
    for b, r in s["batch"].items():
        print(f"  {b} sequences together: {r['aggregate_tok_s']:.1f} tok/s aggregate, {r['ratio']:.2f}x one")
    for k, c in cost.items():
        print(f"  verify 1+{k} tokens: {c:.2f} decode steps")
    for name, acc in res["acceptance"].items():
        print(f"  speculate ngram on {name}: {acc['tokens_per_forward']:.2f} tokens/forward, "
              f"{acc['accepted']}/{acc['drafted']} drafted accepted -> {acc['implied_speedup']:.2f}x implied on {a.shape}")
    v = res["votes"]
    print(f"  --votes 4 / one sample (wall, {v['model']}): {v['ratio']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
