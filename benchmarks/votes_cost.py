"""What `--votes N` costs: the wall time of N answers sampled together against one sampled answer of
the same length (the issue's goal: 4 votes <= 1.6x one sample on the Qwen2.5-0.5B shape).

    python benchmarks/votes_cost.py ART [--votes 4] [--tokens 200] [--rounds 3] [--threads 2] [--json OUT]

Both sides run through the Python API as `edgert run` does, sampling included (temperature 1, so
every step draws from the whole vocabulary and, for votes, also keeps each token's log-probability):
`LLM.generate` consumed to the end, and `LLM.vote`. One model with N cache slots serves both (a
single answer uses one). EOS is ignored for the single answer and, for the votes, rare enough with
random weights not to end a vote early (the script reports every vote's length). Rounds alternate
the two; the ratio is of medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--votes", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default="A farmer has 12 apples and gives 5 away. How many are left?")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from edgert.llm import LLM
    llm = LLM(args.artifact, threads=args.threads, slots=args.votes)
    one, many, lengths = [], [], []
    for r in range(args.rounds + 1):            # round 0 warms up
        t0 = time.perf_counter()
        n = sum(1 for t in llm.generate(args.prompt, max_tokens=args.tokens, temperature=1.0, seed=r,
                                        ignore_eos=True) if t.id >= 0)
        t1 = time.perf_counter()
        result = llm.vote(args.prompt, args.votes, max_tokens=args.tokens, temperature=1.0, seed=r)
        t2 = time.perf_counter()
        if r:
            one.append(t1 - t0)
            many.append(t2 - t1)
            lengths.append([len(v["tokens"]) for v in result["votes"]])
            print(f"round {r}: one answer of {n} tokens {one[-1]:.2f} s; {args.votes} votes "
                  f"{lengths[-1]} {many[-1]:.2f} s: {many[-1] / one[-1]:.2f}x", flush=True)
    ratio = statistics.median(many) / statistics.median(one)
    print(f"{args.votes} votes cost {ratio:.2f}x one answer (medians {statistics.median(many):.2f} / "
          f"{statistics.median(one):.2f} s)")
    if args.json:
        args.json.write_text(json.dumps({"artifact": str(args.artifact), "votes": args.votes, "tokens": args.tokens,
                                         "threads": args.threads, "one_s": one, "votes_s": many,
                                         "vote_lengths": lengths, "ratio": round(ratio, 3)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
