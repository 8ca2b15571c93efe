"""What the suite records about the device: CPU, memory, and a memory read-bandwidth probe.

Decode of a small model is bound by reading its weights once per token, so tok/s <= bandwidth /
bytes per token; the probe gives the bandwidth side of that roofline. (edgert bench grows its
own probe on another branch; this one keeps the suite independent of it.)
"""
from __future__ import annotations

import os
import platform
import threading
import time

PROBE_BYTES = 1 << 30       # far past any last-level cache
PROBE_REPEATS = 7


def read_bandwidth(threads: int = 2) -> float:
    """Bytes/s that `threads` threads read from memory: the best of a few passes of a max-reduction over
    1 GiB split between the threads (numpy releases the GIL inside the reduction; max keeps the
    arithmetic far below the load rate, unlike a pairwise sum)."""
    import numpy as np

    a = np.ones(PROBE_BYTES // 4, np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    for _ in range(PROBE_REPEATS):
        workers = [threading.Thread(target=np.max, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, a.nbytes / (time.perf_counter() - t0))
    return best


def _cpuinfo() -> dict:
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                info.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return info


def describe() -> dict:
    ci = _cpuinfo()
    flags = set(ci.get("flags", "").split())
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(ln for ln in f if ln.startswith("MemTotal:")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    return {"cpu": ci.get("model name", platform.processor() or platform.machine()),
            "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "machine": platform.machine(),
            "kernel": platform.release(),
            "simd": " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")
                             if f in flags)}
