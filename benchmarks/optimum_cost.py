"""What the optimum route costs against the native path, on one model both can build.

    python benchmarks/optimum_cost.py [MODEL] [--optimum-python PY] [--work DIR] [--threads 2]

MODEL defaults to the bundled reasoning-qwen2 fixture (a trained Qwen2). Exports it natively
(int4, the default GPTQ with self-calibration, and round-to-nearest) and through optimum-onnx
(`--via optimum`, int4 round-to-nearest by onnxruntime's quantizer) with PY, a Python that has
the [optimum] extra; then, interleaved: export seconds, artifact MB, decode and prefill tok/s
(`edgert bench`, 128-token prompt and at 1,024), and perplexity on the bundled held-out stories
(`edgert eval`).
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
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if not a.optimum_python:
        ap.error("give --optimum-python (a Python with pip install 'edgert[optimum]') or set EDGERT_OPTIMUM_PYTHON")
    variants = {"native int4 (gptq, self-calibrated)": (sys.executable, []),
                "native int4 (rtn)": (sys.executable, ["--recipe", "rtn"]),
                "optimum int4 (onnxruntime rtn)": (a.optimum_python, ["--via", "optimum"])}
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
                      "decode_128": [], "decode_1024": [], "prefill_1024": []}
    for _ in range(a.rounds):
        for name, row in rows.items():
            for p, keys in ((128, ("decode_128",)), (1024, ("decode_1024", "prefill_1024"))):
                r = cli(sys.executable, "bench", row["artifact"], "--prompt-tokens", p, "--gen-tokens", 32, "--threads",
                        a.threads, "--json")
                d = json.loads(r.stdout)
                for k in keys:
                    row[k].append(d["decode_tok_s" if k.startswith("decode") else "prefill_tok_s"])
    for name, row in rows.items():
        for k in ("decode_128", "decode_1024", "prefill_1024"):
            row[k] = round(statistics.median(row[k]), 1)
        r = cli(sys.executable, "eval", row["artifact"], "--json")
        row["perplexity"] = round(json.loads(r.stdout)["ppl"], 4) if r.returncode == 0 else None
    print("| export | seconds | MB | decode tok/s @128 | @1024 | prefill tok/s @1024 | perplexity |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['export_s']} | {row['mb']} | {row['decode_128']} | {row['decode_1024']} | "
              f"{row['prefill_1024']} | {row['perplexity']} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
