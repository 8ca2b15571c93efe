"""Peak memory of a run against the artifact + its KV cache (goal: <= 1.2x), with and without
edgert handing the mapped weight file back to the kernel after onnxruntime repacks it.

    python benchmarks/memory.py --work DIR [--shapes qwen2.5-0.5b,r1-distill-qwen-1.5b,qwen3-moe-small]
        [--context 4096] [--prompt 512] [--decode 64] [--threads 2] [--repeat 2]
        [--old-python VENV/bin/python] [--json OUT]

Artifacts are real-shape random checkpoints (benchmarks/checkpoints.py) exported with defaults,
cached in WORK as <shape>-int4. Every run is its own child process (`memory.py --_child`): load
at --context, prefill --prompt tokens (in the runtime's 512-token chunks), decode --decode tokens.
Peak RSS is the kernel's figure for that child (wait4), the anonymous/file-backed split comes
from the child's /proc/self/status. Page-out on and off alternate within each round, so their
decode speeds are compared side by side. --old-python (default: $EDGERT_ORT_PYTHON) repeats
everything with another onnxruntime, e.g. 1.22.1 as Termux ships it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOAL = 1.2
SHAPES = ("qwen2.5-0.5b", "r1-distill-qwen-1.5b", "qwen3-moe-small")
MB = 1 << 20


def proc_status() -> dict:
    """This process's resident memory in MB: now, peak, and its anonymous / file-backed parts."""
    keys = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                out[keys[key]] = round(int(value.split()[0]) / 1024, 1)
    return out


def child(args) -> None:
    """One run in this process; prints a JSON line. Imports only the runtime (any onnxruntime)."""
    import contextlib

    import numpy as np
    import onnxruntime as ort

    import edgert.model as em
    from edgert.generate import Sampling, Stats, generate
    if not args.page_out:
        em.weights_held_once = lambda folder, **_: contextlib.nullcontext()
    start = proc_status()
    model = em.Model(args.artifact, context=args.context, threads=args.threads, max_memory="off")
    loaded = proc_status()
    ids = [int(i) for i in np.random.default_rng(0).integers(10, 1000, args.prompt)]
    stats = Stats()
    for _ in generate(model, ids, args.decode, Sampling(0.0), stats=stats):
        pass
    print(json.dumps({"onnxruntime": ort.__version__, "strategy": model.strategy, "start": start, "loaded": loaded,
                      "end": proc_status(), "prefill_tok_s": stats.prefill_tok_s, "decode_tok_s": stats.decode_tok_s}))


def run_child(python: str, artifact: Path, page_out: bool, args) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--_child", "--artifact", str(artifact), "--context", str(args.context),
           "--prompt", str(args.prompt), "--decode", str(args.decode), "--threads", str(args.threads)]
    cmd += ["--page-out"] if page_out else []
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)        # this child's own peak, not the max over all children
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"{artifact} on {python} failed: {(err.read().strip().splitlines() or ['?'])[-1]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    return result


def artifact_for(shape: str, work: Path) -> Path:
    import compare
    out, _ = compare.export(compare.checkpoint(shape, work), work / f"{shape}-int4")
    return out


def summarize(shape: str, artifact: Path, runs: list[dict], page_out: bool, context: int) -> dict:
    from edgert.artifact import read_manifest
    from edgert.device import kv_bytes, memory_need
    manifest = read_manifest(artifact)
    size = sum(f["bytes"] for f in manifest["files"].values())
    kv = kv_bytes(manifest, context)
    peak = max(r["peak_rss_mb"] for r in runs)
    return {"shape": shape, "onnxruntime": runs[0]["onnxruntime"], "strategy": runs[0]["strategy"], "page_out": page_out,
            "artifact_mb": round(size / MB, 1), "kv_cache_mb": round(kv / MB, 1), "peak_rss_mb": peak,
            "ratio": round(peak * MB / (size + kv), 3), "end_rss_mb": max(r["end"]["rss"] for r in runs),
            "end_anon_mb": max(r["end"]["anon"] for r in runs), "end_file_mb": max(r["end"]["file"] for r in runs),
            "before_load_mb": runs[0]["start"]["rss"], "fit_estimate_mb": round(memory_need(manifest, context).total / MB),
            "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in runs), 1), "runs": len(runs)}


def print_table(rows: list[dict], args) -> None:
    print(f"context {args.context}, prompt {args.prompt}, decode {args.decode}, {args.threads} threads; "
          f"peak RSS of the child (kernel), ratio = peak / (artifact + KV cache at the context), goal <= {GOAL}x")
    head = ("shape", "onnxruntime", "page-out", "artifact MB", "KV MB", "peak MB", "ratio", "end anon/file MB",
            "estimate MB", "decode tok/s")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join([r["shape"], f"{r['onnxruntime']} {r['strategy']}", "on" if r["page_out"] else "off",
                          f"{r['artifact_mb']:.0f}", f"{r['kv_cache_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                          f"{r['ratio']:.2f}" + (" ok" if r["ratio"] <= GOAL else " over"),
                          f"{r['end_anon_mb']:.0f}/{r['end_file_mb']:.0f}", f"{r['fit_estimate_mb']}",
                          f"{r['decode_tok_s']:.1f}"]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-out"))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--old-python", default=os.environ.get("EDGERT_ORT_PYTHON"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--page-out", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        return child(args)
    sys.path.insert(0, str(HERE))
    pythons = [sys.executable] + ([args.old_python] if args.old_python else [])
    rows = []
    for shape in args.shapes.split(","):
        artifact = artifact_for(shape, args.work)
        for python in pythons:
            runs = {True: [], False: []}
            for _ in range(args.repeat):
                for page_out in (True, False):
                    runs[page_out].append(run_child(python, artifact, page_out, args))
            rows += [summarize(shape, artifact, runs[p], p, args.context) for p in (True, False)]
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k in
                                                      ("context", "prompt", "decode", "threads", "repeat")},
                                         "goal": GOAL, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
