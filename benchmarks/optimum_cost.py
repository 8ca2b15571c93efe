"""What the optimum route costs against the native path, on one model both can build.

    python benchmarks/optimum_cost.py [MODEL] [--optimum-python PY] [--work DIR] [--threads 2]
        [--prompts 128,1024]

MODEL defaults to the bundled reasoning-qwen2 fixture (a trained Qwen2). Exports it natively
(int4, the default GPTQ with self-calibration, and round-to-nearest) and through optimum-onnx
(`--via optimum`, int4 round-to-nearest by onnxruntime's quantizer) with PY, a Python that has
the [optimum] extra; then, interleaved: export seconds, artifact MB, decode tok/s after each
prompt length and prefill tok/s of the longest (`edgert bench`). For a reasoning fixture also
its task accuracy on the 200 held-out problems (greedy; benchmarks/reasoning_accuracy.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "fixtures")]


def cli(python: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", "from edgert.cli import main; main()", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, default=ROOT / "export" / "data" / "reasoning-qwen2")
    ap.add_argument("--optimum-python", default=os.environ.get("EDGERT_OPTIMUM_PYTHON"))
    ap.add_argument("--work", type=Path, default=Path("optimum-cost"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", default="128,1024", help="prompt lengths for the decode columns")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if not a.optimum_python:
        ap.error("give --optimum-python (a Python with pip install 'edgert[optimum]') or set EDGERT_OPTIMUM_PYTHON")
    variants = {"native int4 (gptq, self-calibrated)": (sys.executable, []),
                "native int4 (rtn)": (sys.executable, ["--recipe", "rtn"]),
                "optimum int4 (onnxruntime rtn)": (a.optimum_python, ["--via", "optimum"])}
    prompts = [int(p) for p in a.prompts.split(",")]
    rows = {}
    for name, (python, extra) in variants.items():
        out = a.work / name.split(" (")[0].replace(" ", "-") / (extra[-1] if extra else "gptq")
        t0 = time.perf_counter()
        r = cli(python, "export", a.model, "-o", out, "--force", *extra)
        if r.returncode:
            print(f"{name}: export failed: {r.stderr.strip().splitlines()[-1]}")
            continue
        size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model."))
        rows[name] = {"artifact": str(out), "export_s": round(time.perf_counter() - t0, 1), "mb": round(size / 1e6, 2),
                      "decode": {p: [] for p in prompts}, "prefill": []}
    for _ in range(a.rounds):
        for name, row in rows.items():
            for p in prompts:
                r = cli(sys.executable, "bench", row["artifact"], "--prompt-tokens", p, "--gen-tokens", 32, "--threads",
                        a.threads, "--json")
                if r.returncode:
                    raise SystemExit(f"{name}: bench failed: {r.stderr.strip()[-300:]}")
                d = json.loads(r.stdout)
                row["decode"][p].append(d["decode_tok_s"])
                if p == prompts[-1]:
                    row["prefill"].append(d["prefill_tok_s"])
    fixture = (a.model / "fixture.json").is_file()
    if fixture:
        import reasoning_accuracy as ra
        problems = ra.task.held_out_problems()
        ref = ra.reference_texts(a.model, problems)
    for name, row in rows.items():
        row["decode"] = {p: round(statistics.median(v), 1) for p, v in row["decode"].items()}
        row["prefill"] = round(statistics.median(row["prefill"]), 1)
        if fixture:
            texts, _ = ra.edgert_texts(Path(row["artifact"]), problems, 96, a.threads)
            row["accuracy"] = ra.score(texts, problems, ref)["accuracy"]
    print("| export | seconds | MB | " + " | ".join(f"decode tok/s @{p}" for p in prompts) +
          f" | prefill tok/s @{prompts[-1]} |" + (" accuracy |" if fixture else ""))
    print("|---" * (4 + len(prompts) + fixture) + "|")
    for name, row in rows.items():
        print(f"| {name} | {row['export_s']} | {row['mb']} | " + " | ".join(str(row["decode"][p]) for p in prompts) +
              f" | {row['prefill']} |" + (f" {100 * row['accuracy']:.1f}% |" if fixture else ""))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
