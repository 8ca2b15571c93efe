"""Does `edgert bench --synthetic SHAPE` tell what a real artifact of that shape does? (issue #4's
acceptance: within 10%)

    python benchmarks/synthetic_check.py [--shape qwen2.5-0.5b] [--bits 4] [--rounds 3] [--threads 2]
                                         [--work bench-out] [--json OUT]

Builds the random-weight checkpoint of the real shape (benchmarks/checkpoints.py), exports it with
the defaults, builds the synthetic artifact of the same shape, then runs `edgert bench ART --json`
and `edgert bench --synthetic SHAPE --json` alternately, each in a fresh process (load time and
peak RSS are per process), and prints the medians over rounds and the median of the per-round
synthetic/real ratios (the load of a shared machine drifts; adjacent processes see the same).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import checkpoint, export  # noqa: E402

FIGURES = ("decode_tok_s", "prefill_tok_s", "ttft_s", "load_s", "peak_rss_mb", "model_mb", "bits_per_weight",
           "bytes_per_token_mb", "bandwidth_gbs", "roofline_tok_s", "roofline_pct")
TOLERANCE = 0.10


def run_bench(args: list[str], env: dict) -> dict:
    r = subprocess.run([sys.executable, "-m", "edgert.cli", "bench", *args, "--json"], capture_output=True, text=True,
                       env=env)
    if r.returncode:
        sys.exit(f"edgert bench {' '.join(args)} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(r.stdout)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="alternating real/synthetic bench processes, each")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds inside each bench process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("bench-out"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    real, _ = export(checkpoint(a.shape, a.work), a.work / f"edgert-{a.shape}-int{a.bits}", bits=a.bits)
    env = {**os.environ, "EDGERT_SYNTHETIC_DIR": str(a.work / "synthetic")}
    common = ["--threads", str(a.threads), "--repeat", str(a.repeat)]
    run_bench(["--synthetic", a.shape, "--bits", str(a.bits), "--repeat", "1", "--gen-tokens", "2",
               "--prompt-tokens", "1"], env)                                      # builds (and caches) it, untimed
    results = {"real": [], "synthetic": []}
    for i in range(a.rounds):
        for kind in (("real", "synthetic") if i % 2 == 0 else ("synthetic", "real")):
            args = [str(real)] if kind == "real" else ["--synthetic", a.shape, "--bits", str(a.bits)]
            results[kind].append(run_bench(args + common, env))
            print(f"round {i + 1}/{a.rounds} {kind}: decode {results[kind][-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    medians = {kind: {f: statistics.median(r[f] for r in runs) for f in FIGURES} for kind, runs in results.items()}
    # the ratio within each round (adjacent processes), then the median: robust to the load drifting
    ratios = {f: statistics.median(s[f] / r[f] for s, r in zip(results["synthetic"], results["real"])) for f in FIGURES}
    print(f"{a.shape} int{a.bits}, {a.threads} threads, medians of {a.rounds} processes x {a.repeat} rounds "
          f"(cpu: {results['real'][0]['cpu']})")
    print(f"{'figure':<20} {'real export':>12} {'synthetic':>12} {'ratio':>7}  (median of the per-round ratios)")
    for f in FIGURES:
        flag = "" if abs(ratios[f] - 1) <= TOLERANCE else "  (> 10% apart)"
        print(f"{f:<20} {medians['real'][f]:>12.3f} {medians['synthetic'][f]:>12.3f} {ratios[f]:>7.3f}{flag}")
    if a.json:
        a.json.write_text(json.dumps({"shape": a.shape, "bits": a.bits, "threads": a.threads, "medians": medians,
                                      "ratios": ratios, "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
