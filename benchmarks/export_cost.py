"""Export time and peak memory for a real-shape checkpoint (goal for R1-Distill-Qwen-1.5B int4 with the
defaults on a 2-core box: <= 120 s, <= 1.5 GB peak RSS; measured: benchmarks/export_cost.json).

    python benchmarks/export_cost.py [--shape r1-distill-qwen-1.5b] [--bits 4] [--recipe NAME] [--work DIR] [--json OUT]

The export runs as `edgert export` in a child process; its peak RSS comes from the kernel's
accounting of that child (getrusage), not from sampling.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoints  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="r1-distill-qwen-1.5b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--recipe", help="int4 recipe (edgert export --recipe) [default: the exporter's]")
    ap.add_argument("--work", type=Path, default=Path("bench-out"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    src = args.work / "ckpt" / args.shape
    if not (src / "config.json").is_file():
        checkpoints.make_checkpoint(args.shape, src)
    out = args.work / f"export-{args.shape}-int{args.bits}"
    t0 = time.time()
    recipe = ["--recipe", args.recipe] if args.recipe else []
    r = subprocess.run([sys.executable, "-m", "edgert.cli", "export", str(src), "-o", str(out), "--bits", str(args.bits),
                        "--force", *recipe], capture_output=True, text=True)
    seconds = time.time() - t0
    if r.returncode:
        sys.exit(f"export failed: {r.stderr.strip().splitlines()[-1]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_mb, cpu_s = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
    manifest = json.loads((out / "edgert.json").read_text())
    size = sum(f["bytes"] for f in manifest["files"].values())
    params = manifest["model"]["parameters"]
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    result = {"shape": args.shape, "bits": args.bits, "recipe": manifest["quantization"].get("recipe"), "parameters": params,
              "seconds": round(seconds, 1), "cpu_seconds": round(cpu_s, 1),
              "peak_rss_mb": round(peak_mb), "artifact_mb": round(size / 1e6, 1), "checkpoint_mb": round(src_bytes / 1e6, 1),
              "bits_per_weight": round(8 * size / params, 2)}
    print(f"{'shape':<16} {args.shape} ({params / 1e6:.0f}M parameters, {src_bytes / 1e9:.2f} GB bf16)")
    print(f"{'export':<16} int{args.bits} {result['recipe']}: {seconds:.1f} s ({cpu_s:.0f} s CPU), peak RSS {peak_mb:.0f} MB")
    print(f"{'artifact':<16} {size / 1e6:.0f} MB, {8 * size / params:.2f} bits/weight")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
