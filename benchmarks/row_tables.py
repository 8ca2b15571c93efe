"""Whether the row tables decode reads (the embedding, a split lm_head's planes) are in the page cache
after loading, and the first decode steps' speed, with them kept and read ahead (`--variant new`, the
runtime's way) or paged out with the rest of the weights (`old`, before 2026-12-05). Alternated
processes, random token ids (each step looks up rows not read yet):

    python benchmarks/row_tables.py ART [--pairs 5] [--steps 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def child(art: Path, variant: str, steps: int, threads: int) -> dict:
    import numpy as np

    import edgert.device as dev
    tables_of = dev.row_tables
    if variant == "old":
        dev.row_tables = lambda *a, **k: {}
    from edgert.model import Model
    m = Model(art, context=256, threads=threads, max_memory="off")
    tables = tables_of(art, m.manifest.get("graphs", {"default": "model.onnx"})[m.strategy])
    time.sleep(1)                                        # (the read-ahead lands)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    cached = pages = 0
    for start, size, name, offset in dev._data_mappings(art):
        if any(lo < offset + size and offset < hi for lo, hi in tables.get(name, ())):
            vec = (ctypes.c_ubyte * (-(-size // mmap.PAGESIZE)))()
            libc.mincore(start, size, vec)
            cached, pages = cached + sum(v & 1 for v in vec), pages + len(vec)
    rng = np.random.default_rng(0)
    m.forward(list(rng.integers(0, m.vocab, 8)))
    t0 = time.perf_counter()
    for i in rng.integers(0, m.vocab, steps):
        m.forward([int(i)])
    return {"variant": variant, "tables_mb": pages * mmap.PAGESIZE / 2**20, "cached": cached / max(pages, 1),
            "ms_per_step": (time.perf_counter() - t0) / steps * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(child(args.artifact, args.variant, args.steps, args.threads)))
        return
    for _ in range(args.pairs):
        for variant in ("old", "new"):
            out = subprocess.run([sys.executable, __file__, str(args.artifact), "--variant", variant, "--steps",
                                  str(args.steps), "--threads", str(args.threads)], capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{variant}: row tables {r['cached']:.0%} of {r['tables_mb']:.0f} MB cached, first {args.steps} "
                  f"steps {r['ms_per_step']:.1f} ms a step", flush=True)


if __name__ == "__main__":
    main()
