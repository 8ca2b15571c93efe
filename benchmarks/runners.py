"""Every runner the suite measures, and the worker that measures one in its own process.

    python benchmarks/runners.py '{"kind": "edgert", "path": "ART", "name": "edgert int4",
                                   "prompt": [...], "n_decode": 64, "threads": 2}'

prints one JSON line: peers.timing() + load_s + peak_rss_mb, or {"error": "one line"}.
A fresh process per measurement keeps memory, thread pools and allocator state of one runtime
away from the next, and makes the peak RSS that runner's own. Imports here are stdlib-only at
module level: the optimum worker runs this file from its own venv.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

WARMUP_DECODE = 8   # untimed first pass: page-in, weight prepacking, thread-pool start


class EdgertRunner(peers.Runner):
    def __init__(self, artifact: Path, name: str, strategy: str | None = None, info: dict | None = None):
        self.artifact, self.name, self.strategy, self.info = artifact, name, strategy, info or {}
        self.model = None

    def measure(self, prompt_ids, n_decode, threads=2):
        import numpy as np
        from edgert.model import Model
        need = max(1024, len(prompt_ids) + n_decode + 1)
        if self.model is None or self.model.context < need:
            self.model = None
            self.model = Model(self.artifact, context=need, threads=threads, strategy=self.strategy)
        m = self.model
        m.reset()
        t0 = time.perf_counter()
        token = int(np.argmax(m.forward(prompt_ids)[-1]))
        t1 = time.perf_counter()
        for _ in range(n_decode):
            token = int(np.argmax(m.forward([token])[-1]))
        t2 = time.perf_counter()
        return peers.timing(len(prompt_ids), n_decode, t0, t1, t2)

    def close(self):
        self.model = None


def make_runner(kind: str, path: Path, name: str, options: dict) -> peers.Runner:
    if kind == "edgert":
        return EdgertRunner(path, name, options.get("strategy"))
    if kind == "genai":
        return peers.GenaiRunner(path, name, {})
    if kind == "llamacpp":
        return peers.LlamaCppRunner(path, name, {"kv": options.get("kv")})
    if kind in ("transformers", "optimum"):
        import hf_peers
        cls = hf_peers.TransformersRunner if kind == "transformers" else hf_peers.OptimumRunner
        return cls(path, name)
    raise ValueError(f"unknown runner kind {kind!r}")


def peak_rss_mb() -> float:
    """This process's own peak RSS. Not ru_maxrss: Linux carries that over exec from the parent that
    forked us (the suite, after an export, would put its own peak on every runner)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_once(spec: dict) -> dict:
    """Load, warm up, then one timed prefill + decode."""
    t0 = time.perf_counter()
    runner = make_runner(spec["kind"], Path(spec["path"]), spec["name"], spec.get("options", {}))
    runner.measure(spec["prompt"], WARMUP_DECODE, spec["threads"])
    load_s = time.perf_counter() - t0
    m = runner.measure(spec["prompt"], spec["n_decode"], spec["threads"])
    m["load_s"] = load_s
    m["peak_rss_mb"] = peak_rss_mb()
    runner.close()
    return m


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        out = measure_once(json.loads(argv[0]))
    except Exception as e:  # one line for the suite's table, never a traceback
        out = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:400]}
    print(json.dumps(out), flush=True)
    return 0 if "error" not in out else 1


if __name__ == "__main__":
    sys.exit(main())
