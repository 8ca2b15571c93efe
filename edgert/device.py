"""What this device offers an artifact: which cores to run on, and whether the model fits in memory.

Everything is read from /sys and /proc (Linux and Android); `root` lets tests hand in a fake tree.
Where a file is missing (macOS, locked-down phones) the answers fall back to os.cpu_count() and
"no known limit".
"""
from __future__ import annotations

import ctypes
import math
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .artifact import ArtifactError

MB = 1 << 20
# big.LITTLE: cores within this share of the fastest core's capacity/frequency count as fast. A
# phone's prime + big cores (3.2 and 2.8 GHz) qualify, its LITTLE ones (2.0 GHz) do not; the few
# percent that Intel's favoured cores turbo higher do not split a uniform CPU.
FAST_SHARE = 0.8


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _number(path: Path) -> int | None:
    text = _read(path)
    return int(text) if text and text.lstrip("-").isdigit() else None


def _cpuinfo_cores(root: Path) -> dict[int, str]:
    """cpu -> physical core key from /proc/cpuinfo ("physical id" + "core id"), for kernels without sysfs topology."""
    cores, cpu, package = {}, None, "0"
    for line in (_read(root / "proc/cpuinfo") or "").splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "processor":
            cpu, package = int(value), "0"
        elif key == "physical id":
            package = value
        elif key == "core id" and cpu is not None:
            cores[cpu] = f"{package}:{value}"
    return cores


def cpu_topology(root: Path = Path("/"), allowed: set[int] | None = None) -> list[tuple[int, str, int]]:
    """(cpu, physical core key, speed) for every CPU this process may run on. SMT siblings share
    the key. Speed is cpu_capacity where it differs between cores (ARM's measure of per-core
    performance), else cpuinfo_max_freq, else 0."""
    if allowed is None:
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    sysfs = root / "sys/devices/system/cpu"
    fallback = _cpuinfo_cores(root)
    rows = []
    for cpu in sorted(allowed):
        d = sysfs / f"cpu{cpu}"
        core = (_read(d / "topology/thread_siblings_list") or _read(d / "topology/core_cpus_list")
                or fallback.get(cpu) or str(cpu))
        rows.append((cpu, core, _number(d / "cpu_capacity") or 0, _number(d / "cpufreq/cpuinfo_max_freq") or 0))
    use_capacity = len({r[2] for r in rows}) > 1
    return [(cpu, core, capacity if use_capacity else freq) for cpu, core, capacity, freq in rows]


def fast_cores(root: Path = Path("/"), allowed: set[int] | None = None) -> list[int]:
    """One CPU per fast physical core (the first of its SMT siblings)."""
    topo = cpu_topology(root, allowed)
    top = max((speed for _, _, speed in topo), default=0)
    chosen: dict[str, int] = {}
    for cpu, core, speed in topo:
        if speed >= FAST_SHARE * top:
            chosen.setdefault(core, cpu)
    return sorted(chosen.values())


def _own_cgroup_dirs(root: Path, controller: str) -> list[Path]:
    """This process's cgroup folder for a controller (v2, then v1), then the mount's root (containers)."""
    dirs = []
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            dirs.append(root / "sys/fs/cgroup" / path.lstrip("/"))
        elif controller in controllers.split(","):
            dirs.append(root / "sys/fs/cgroup" / controller / path.lstrip("/"))
    return [d for d in dirs if d.is_dir()] + [root / "sys/fs/cgroup", root / "sys/fs/cgroup" / controller]


def cpu_quota(root: Path = Path("/")) -> float | None:
    """CPUs' worth of time the cgroup allows (cpu.max or cfs_quota_us / cfs_period_us), None when unlimited."""
    for d in _own_cgroup_dirs(root, "cpu"):
        v2 = (_read(d / "cpu.max") or "").split()
        if len(v2) == 2 and v2[0].isdigit():
            return int(v2[0]) / int(v2[1])
        quota, period = _number(d / "cpu.cfs_quota_us"), _number(d / "cpu.cfs_period_us")
        if quota and quota > 0 and period:
            return quota / period
    return None


def default_threads(root: Path = Path("/"), allowed: set[int] | None = None) -> int:
    """Fast physical cores this process may use, capped by a cgroup CPU quota: LITTLE cores and
    SMT siblings slow a memory-bound decode step down, because every thread waits for the slowest."""
    n = len(fast_cores(root, allowed)) or 1
    quota = cpu_quota(root)
    return max(1, min(n, math.ceil(quota))) if quota else n


def parse_size(text: str | int) -> int:
    """'2G', '1500M', '1.5GB', '800000k' or plain bytes -> bytes (binary units, as `free -h` shows)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-memory: {text!r} is not a size (examples: 2G, 1500M, off)")
    return int(float(m[1]) * 1024 ** "bkmgt".index(m[2].lower() or "b"))


def available_memory(root: Path = Path("/")) -> tuple[int, str] | None:
    """(bytes, where from): MemAvailable, or the cgroup's headroom when that is lower (limit minus
    usage, counting reclaimable page cache as free, as the kernel does before it OOM-kills)."""
    found = []
    meminfo = dict(line.split(":", 1) for line in (_read(root / "proc/meminfo") or "").splitlines() if ":" in line)
    if "MemAvailable" in meminfo:
        found.append((int(meminfo["MemAvailable"].split()[0]) * 1024, "available (MemAvailable)"))
    for d in _own_cgroup_dirs(root, "memory"):
        limit = _read(d / "memory.max") or _read(d / "memory.limit_in_bytes")
        usage = _number(d / "memory.current") or _number(d / "memory.usage_in_bytes")
        if not limit or not limit.isdigit() or int(limit) >= 1 << 60 or usage is None:
            continue
        stat = dict(line.split() for line in (_read(d / "memory.stat") or "").splitlines() if len(line.split()) == 2)
        cache = int(stat.get("inactive_file", stat.get("total_inactive_file", 0)))
        found.append((max(0, int(limit) - usage + cache), f"free under the cgroup limit of {int(limit) // MB} MB"))
        break
    return min(found) if found else None


# --- how much an artifact needs --------------------------------------------------------------------------
# Measured with onnxruntime 1.22/1.32 (benchmarks/memory.py): after loading, weights take
# 1.06-1.16x the data file in private memory (MatMulNBits repacks its weights with a sum per
# block; a tied int8 embedding stays for the lookup and is packed again for lm_head), and
# prefill in 512-token chunks grows the arena by ~10% of the weights more.
WEIGHT_FACTOR = 1.25
RUNTIME_BYTES = 150 * MB      # Python, numpy and onnxruntime themselves (~50 MB) + arena and heap
CONTEXT_STEP = 256            # suggested contexts are rounded down to this


def weight_bytes(manifest: dict) -> int:
    return sum(info["bytes"] for name, info in manifest.get("files", {}).items() if name.endswith(".data"))


def kv_bytes(manifest: dict, context: int, graph: str | None = None) -> int:
    m = manifest["model"]
    layers = len(m["attention_layers"]) if "attention_layers" in m else m["layers"]    # hybrid models: attention layers only
    return int(layers * 2 * m["kv_heads"] * context * m["head_dim"] * kv_element_bytes(manifest, graph))


def kv_element_bytes(manifest: dict, graph: str | None = None) -> float:
    """Bytes per cached key or value element: 2 for an fp16 cache, 4 for fp32 (older artifacts);
    int8: 1 with calibrated per-channel scales (constants of the graph: GroupQueryAttention's own cache,
    the graphs named `...kv8gqa`, and since the manifest's kv_scales every graph of the artifact), else
    1 + 4 / head_dim (a code, and an fp32 scale per row and head)."""
    q = manifest.get("quantization", {})
    kind = q.get("kv_cache")
    if kind == "int8" and (graph and graph.endswith("kv8gqa") or q.get("kv_scales") == "per-channel"):
        return 1
    return {"fp16": 2, "int8": 1 + 4 / manifest["model"]["head_dim"]}.get(kind, 4)


# Hybrid models hold their recurrent state per sequence: the live copy, the buffer a step writes,
# and up to engine.SNAPSHOTS_PER_SLOT snapshots kept at turn boundaries.
STATE_COPIES = 2 + 4


def state_bytes(manifest: dict) -> int:
    """Bytes of recurrent state one sequence carries (0 for KV-only models)."""
    return sum(4 * math.prod(s["shape"]) for s in manifest["model"].get("state", []))


@dataclass
class Need:
    weights: int
    kv: int
    runtime: int
    state: int = 0            # recurrent state of hybrid models (all sequences, all copies)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.runtime + self.state

    def __str__(self) -> str:
        state = f" + recurrent state {self.state / MB:.0f}" if self.state else ""
        return (f"{self.total / MB:.0f} MB (weights {self.weights / MB:.0f} + KV cache {self.kv / MB:.0f}{state} "
                f"+ runtime {self.runtime / MB:.0f})")


def kv_headroom(manifest: dict) -> int:
    """Cache rows each sequence holds past the context: a float cache's folded decode writes zero
    rows there (export/graph.py Fold; the exporter records none for an int8 cache)."""
    return manifest["model"].get("kv_headroom", 0)


def memory_need(manifest: dict, context: int, sequences: int = 1, graph: str | None = None) -> Need:
    """context: the cache rows of all sequences together (each sequence's headroom is added)."""
    kv = kv_bytes(manifest, context + kv_headroom(manifest) * sequences, graph)
    return Need(int(weight_bytes(manifest) * WEIGHT_FACTOR), kv, RUNTIME_BYTES, state_bytes(manifest) * STATE_COPIES * sequences)


def check_fit(path: Path, manifest: dict, context: int, max_memory: int | str | None = None,
              root: Path = Path("/"), sequences: int = 1, graph: str | None = None) -> Need:
    """Refuse, before anything is loaded, an artifact + KV cache that the memory budget cannot hold.
    max_memory: bytes or a size such as "2G" (a fixed budget), "off" (no check), None (what is available).
    graph: the graph variant that will run (its KV cache layout)."""
    need = memory_need(manifest, context, sequences, graph)
    if isinstance(max_memory, str) and max_memory.strip().lower() == "off":
        return need
    if max_memory is not None:
        budget, where = parse_size(max_memory), "allowed by --max-memory"
    else:
        found = available_memory(root)
        if found is None:
            return need               # nothing to check against (no /proc/meminfo)
        budget, where = found
    if need.total <= budget:
        return need
    per_token = kv_bytes(manifest, 1, graph)
    fits = (budget - need.weights - need.runtime - need.state) // per_token // CONTEXT_STEP * CONTEXT_STEP
    if fits >= CONTEXT_STEP:
        advice = f"--context {fits} fits"
    else:
        q = manifest.get("quantization", {})
        fewer = [flag for flag, key in (("--bits 4", "mlp"), ("--embed-bits 4", "embed")) if (q.get(key) or 4) > 4]
        advice = ("the weights alone do not fit: re-export with fewer bits (" + " ".join(fewer) + ") or use a smaller model"
                  if fewer else "the weights alone do not fit even at 4 bits: use a smaller model")
    raise ArtifactError(f"{path} at --context {context} needs about {need} but {budget / MB:.0f} MB is {where}; "
                        f"{advice} (--max-memory off skips this check)")


# --- one copy of the weights ------------------------------------------------------------------------------
MADV_PAGEOUT = 21             # Linux >= 5.4; older kernels answer EINVAL and nothing changes
MADV_DONTNEED = 4             # a file mapping's pages leave this process's RSS, not the page cache
MADV_WILLNEED = 3             # read a file range into the page cache ahead of use
ROW_TABLES = ("embed_tokens.", "lm_head.")     # the exporter's tables that decode looks rows up in (Gather)


def _data_mappings(folder: Path):
    """(address, size, data file name, file offset) of each mapping of the folder's data files
    (onnxruntime maps each external tensor on its own)."""
    prefix = str(folder.resolve())
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith(prefix) and parts[5].rstrip().endswith(".data"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                yield lo, hi - lo, Path(parts[5].rstrip()).name, int(parts[2], 16)


def row_tables(folder: Path, graph: str) -> dict[str, list[tuple[int, int]]]:
    """Data file name -> the (start, end) file ranges of the tensors that decode reads rows of again:
    the embedding table and the lm_head's planes (their candidate rows); {} when the graph cannot be read."""
    from .onnx_scan import ScanError, external_data
    try:
        tensors = external_data(folder / graph)
    except (ScanError, OSError, ValueError):
        return {}
    out: dict[str, list[tuple[int, int]]] = {}
    for t in tensors:
        if str(t.get("\0name", "")).startswith(ROW_TABLES) and str(t.get("offset", "0")).isdigit() \
                and str(t.get("length", "")).isdigit():
            start = int(t.get("offset", "0"))
            out.setdefault(str(t.get("location")), []).append((start, start + int(t["length"])))
    return out


def mapped_dirty_kb(folder: Path) -> int:
    """kB of the folder's mapped data files that this process has written (their copy-on-write
    pages are anonymous memory, which MADV_DONTNEED would throw away; a file page merely not yet
    written back is not); 0 for onnxruntime's initializers, which it only reads."""
    prefix, dirty, inside = str(folder.resolve()), 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                parts = line.split()
                if parts and "-" in parts[0] and not parts[0].endswith(":"):
                    inside = len(parts) == 6 and parts[5].startswith(prefix) and parts[5].endswith(".data")
                elif inside and parts[0] == "Anonymous:":
                    dirty += int(parts[1])
    except OSError:
        return -1                 # unknown: callers must not assume clean pages
    return dirty


def page_out_weights(folder: Path, advice: int = MADV_PAGEOUT, tables: dict | None = None) -> None:
    """onnxruntime maps the external data file and repacks MatMulNBits weights into its own
    buffers; the mapped originals stay resident (clean file pages) although only embedding
    rows are read again. Hand them back to the kernel: what is used faults back in from the file.
    advice=MADV_DONTNEED unmaps them only: they stay cached, and the next lookup is a minor fault
    (each fault maps the 64 KB of cached pages around it, so scattered embedding lookups soon map a
    whole table, which counts in RSS although the kernel may drop it at any time).
    tables (`row_tables`): those leave the RSS with MADV_DONTNEED only and are read ahead into the page
    cache (MADV_WILLNEED; as llama.cpp reads its mapped file ahead): paged out, a token whose row had
    not been read since went to the disk (Qwen2.5-0.5B's tied int4 plane, which onnxruntime reads to
    repack it, was paged out: 34-48% of its tables cached after loading, now all; benchmarks/row_tables.py)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for start, size, name, offset in _data_mappings(folder):
            if any(lo < offset + size and offset < hi for lo, hi in (tables or {}).get(name, ())):
                libc.madvise(start, size, MADV_DONTNEED)
                libc.madvise(start, size, MADV_WILLNEED)
            else:
                libc.madvise(start, size, advice)
    except (OSError, AttributeError):
        pass                      # not Linux: nothing to do


def release_freed_memory() -> None:
    """Give memory the process has freed back to the kernel (glibc keeps freed heap pages, in
    every thread's arena, as part of RSS: after a threaded quantization pass or a closed
    onnxruntime session that is hundreds of MB that no later allocation of this thread reuses)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass                      # not glibc: its allocator decides


@contextmanager
def weights_held_once(folder: Path, every_s: float = 0.05, graph: str | None = None):
    """Page out the mapped weight file while onnxruntime loads, so the load peak holds one copy
    too. This needs onnxruntime to release the GIL while it builds the session (1.32 does; 1.22
    does not, and there only the page-out after loading runs). graph: the ONNX file being loaded,
    whose row tables stay in the page cache (`page_out_weights`)."""
    if not Path("/proc/self/maps").exists():
        yield
        return
    tables = row_tables(folder, graph) if graph else {}
    stop = threading.Event()

    def loop():
        while not stop.wait(every_s):
            page_out_weights(folder, tables=tables)
    t = threading.Thread(target=loop, daemon=True, name="edgert-pageout")
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        page_out_weights(folder, tables=tables)
