"""Export time and peak memory for a real-shape checkpoint (goal for R1-Distill-Qwen-1.5B int4 with the
defaults on a 2-core box: <= 120 s, <= 1.5 GB peak RSS; measured: benchmarks/export_cost.json).

    python benchmarks/export_cost.py [--shape r1-distill-qwen-1.5b] [--bits 4] [--recipe NAME] [--block-size N] [--work DIR] [--json OUT]

The export runs as `edgert export` in a child process. Peak memory is the largest total, sampled
every 50 ms, over that child and its GPTQ processes (`EDGERT_EXPORT_WORKERS`, one per core by
default): each process's resident anonymous and file pages, plus shared memory (a row chunk the
exporter hands a GPTQ process) counted once, as the largest shared-memory residency of any one
of them (the exporter maps every block it hands out). Shared libraries count once per process,
so this errs high. It reads /proc/PID/status, a tenth of a millisecond; the proportional set size
it replaced (smaps_rollup) took 30-50 ms per sample of the running exporter on a gVisor sandbox
and slowed the export it measured by 18 s in 133. The exporter's own peak RSS comes from the
kernel's accounting (getrusage), which sampling cannot miss; the larger of the two is reported.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoints  # noqa: E402


def _resident(pid: int) -> tuple[int, int]:
    """(anonymous + file pages, shared memory pages) resident for pid, in bytes (0, 0 once it exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k.startswith("Rss")}
    except (OSError, ValueError):
        return 0, 0
    return (kb.get("RssAnon", 0) + kb.get("RssFile", 0)) << 10, kb.get("RssShmem", 0) << 10


def _sample_tree(child: subprocess.Popen, every_s: float = 0.05) -> int:
    """The largest total residency of `child` and its descendants until it exits (bytes, see the top)."""
    import psutil
    peak, root, pids, n = 0, psutil.Process(child.pid), [child.pid], 0
    while child.poll() is None:
        if n % 20 == 0:                   # the GPTQ processes start once: the list is refreshed every second
            try:
                pids = [child.pid, *(p.pid for p in root.children(recursive=True))]
            except psutil.NoSuchProcess:
                break
        n += 1
        own, shared = zip(*(_resident(pid) for pid in pids))
        peak = max(peak, sum(own) + max(shared))
        time.sleep(every_s)
    return peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="r1-distill-qwen-1.5b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--recipe", help="int4 recipe (edgert export --recipe) [default: the exporter's]")
    ap.add_argument("--block-size", type=int, help="edgert export --block-size [default: the exporter's]")
    ap.add_argument("--work", type=Path, default=Path("bench-out"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    src = args.work / "ckpt" / args.shape
    if not (src / "config.json").is_file():
        checkpoints.make_checkpoint(args.shape, src)
    out = args.work / f"export-{args.shape}-int{args.bits}"
    t0 = time.time()
    recipe = (["--recipe", args.recipe] if args.recipe else []) + (["--block-size", str(args.block_size)]
                                                                    if args.block_size else [])
    with tempfile.TemporaryFile("w+") as log:       # (a pipe nobody reads while sampling could fill)
        child = subprocess.Popen([sys.executable, "-m", "edgert.cli", "export", str(src), "-o", str(out), "--bits",
                                  str(args.bits), "--force", *recipe], stdout=subprocess.DEVNULL, stderr=log, text=True)
        tree_peak = _sample_tree(child)
        child.wait()
        seconds = time.time() - t0
        log.seek(0)
        if child.returncode:
            sys.exit(f"export failed: {(log.read().strip().splitlines() or ['?'])[-1]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    main_mb, cpu_s = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
    peak_mb = max(tree_peak / 2**20, main_mb)
    manifest = json.loads((out / "edgert.json").read_text())
    size = sum(f["bytes"] for f in manifest["files"].values())
    params = manifest["model"]["parameters"]
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    result = {"shape": args.shape, "bits": args.bits, "recipe": manifest["quantization"].get("recipe"), "parameters": params,
              "seconds": round(seconds, 1), "cpu_seconds": round(cpu_s, 1),
              "peak_rss_mb": round(peak_mb), "peak_rss_exporter_mb": round(main_mb), "artifact_mb": round(size / 1e6, 1), "checkpoint_mb": round(src_bytes / 1e6, 1),
              "bits_per_weight": round(8 * size / params, 2)}
    print(f"{'shape':<16} {args.shape} ({params / 1e6:.0f}M parameters, {src_bytes / 1e9:.2f} GB bf16)")
    print(f"{'export':<16} int{args.bits} {result['recipe']}: {seconds:.1f} s ({cpu_s:.0f} s CPU), peak {peak_mb:.0f} MB "
          f"(the larger of: all processes' resident pages; the exporter's own RSS, {main_mb:.0f} MB)")
    print(f"{'artifact':<16} {size / 1e6:.0f} MB, {8 * size / params:.2f} bits/weight")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
