"""Device fit: thread defaults from fake /sys and /proc trees of a phone, an SMT x86 box and a Pi,
and the memory check that refuses before loading, saying what would fit."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import BUNDLED_STORIES
from test_cli import assert_one_line_error, edgert

from edgert.artifact import ArtifactError
from edgert.device import (MB, available_memory, check_fit, cpu_quota, default_threads, fast_cores, kv_bytes,
                           memory_need, parse_size)


def fake_cpus(root, cpus: dict[int, dict[str, str]]):
    """cpus: cpu -> {relative sysfs path: content}; writes them under root/sys/devices/system/cpu/cpuN/."""
    for cpu, files in cpus.items():
        for rel, text in files.items():
            f = root / "sys/devices/system/cpu" / f"cpu{cpu}" / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text + "\n")
    return set(cpus)


def write(root, rel: str, text: str):
    f = root / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)


def phone(root):
    """A 4+4 big.LITTLE phone: LITTLE cores 0-3 at 1.8 GHz, big cores 4-7 at 2.4 GHz, no SMT; the
    kernel numbers core_id per cluster, so (package, core_id) would collide: siblings must not."""
    return fake_cpus(root, {c: {"cpufreq/cpuinfo_max_freq": "2400000" if c >= 4 else "1800000",
                                "topology/thread_siblings_list": str(c), "topology/core_id": str(c % 4),
                                "topology/physical_package_id": "0"} for c in range(8)})


def test_big_little_phone_uses_the_big_cores(tmp_path):
    allowed = phone(tmp_path)
    assert fast_cores(tmp_path, allowed) == [4, 5, 6, 7]
    assert default_threads(tmp_path, allowed) == 4
    assert fast_cores(tmp_path, {0, 1, 2, 5}) == [5]        # affinity: only what the process may use


def test_prime_big_little_counts_prime_and_big(tmp_path):
    """1 prime (3.2 GHz) + 3 big (2.8 GHz) + 4 LITTLE (2.0 GHz): prime and big are both fast."""
    freq = {0: 2000000, 1: 2000000, 2: 2000000, 3: 2000000, 4: 2800000, 5: 2800000, 6: 2800000, 7: 3200000}
    allowed = fake_cpus(tmp_path, {c: {"cpufreq/cpuinfo_max_freq": str(f), "topology/thread_siblings_list": str(c)}
                                   for c, f in freq.items()})
    assert fast_cores(tmp_path, allowed) == [4, 5, 6, 7]


def test_capacity_ranks_cores_when_frequencies_mislead(tmp_path):
    """ARM's cpu_capacity: an A55 at 2.0 GHz is slower than an A76 at 2.0 GHz."""
    allowed = fake_cpus(tmp_path, {c: {"cpufreq/cpuinfo_max_freq": "2000000", "cpu_capacity": "1024" if c >= 2 else "400",
                                       "topology/thread_siblings_list": str(c)} for c in range(4)})
    assert fast_cores(tmp_path, allowed) == [2, 3]


def test_smt_x86_counts_physical_cores(tmp_path):
    """4 cores x 2 threads, siblings numbered n and n+4 as Linux does; uniform frequency."""
    allowed = fake_cpus(tmp_path, {c: {"cpufreq/cpuinfo_max_freq": "4200000", "cpu_capacity": "1024",
                                       "topology/thread_siblings_list": f"{c % 4},{c % 4 + 4}"} for c in range(8)})
    assert fast_cores(tmp_path, allowed) == [0, 1, 2, 3]
    assert default_threads(tmp_path, allowed) == 4
    assert default_threads(tmp_path, {0, 4, 1}) == 2           # cpu0 and its sibling are one core


def test_pi_without_sysfs_topology_reads_cpuinfo(tmp_path):
    """A Pi 4: four equal cores; here only /proc/cpuinfo describes them (no topology, no cpufreq)."""
    write(tmp_path, "proc/cpuinfo", "".join(f"processor\t: {c}\nBogoMIPS\t: 108.00\nCPU part\t: 0xd08\n\n"
                                            for c in range(4)))
    assert fast_cores(tmp_path, {0, 1, 2, 3}) == [0, 1, 2, 3]
    write(tmp_path, "proc/cpuinfo", "".join(f"processor\t: {c}\nphysical id\t: 0\ncore id\t: {c % 2}\n\n" for c in range(4)))
    assert default_threads(tmp_path, {0, 1, 2, 3}) == 2         # x86 cpuinfo: SMT siblings share a core id


@pytest.mark.parametrize("files, quota", [({"sys/fs/cgroup/cpu.max": "150000 100000\n"}, 1.5),
                                          ({"sys/fs/cgroup/cpu.max": "max 100000\n"}, None),
                                          ({"sys/fs/cgroup/cpu/cpu.cfs_quota_us": "200000\n",
                                            "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
                                          ({"sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n",
                                            "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}, None)])
def test_cgroup_cpu_quota_caps_threads(tmp_path, files, quota):
    allowed = phone(tmp_path)
    for rel, text in files.items():
        write(tmp_path, rel, text)
    assert cpu_quota(tmp_path) == quota
    assert default_threads(tmp_path, allowed) == (2 if quota else 4)


def test_available_memory_takes_the_lower_of_meminfo_and_cgroup(tmp_path):
    write(tmp_path, "proc/meminfo", "MemTotal:       8000000 kB\nMemFree:  100 kB\nMemAvailable:   6000000 kB\n")
    assert available_memory(tmp_path) == (6000000 * 1024, "available (MemAvailable)")
    write(tmp_path, "proc/self/cgroup", "0::/gateway.slice\n")
    write(tmp_path, "sys/fs/cgroup/gateway.slice/memory.max", f"{1024 * MB}\n")
    write(tmp_path, "sys/fs/cgroup/gateway.slice/memory.current", f"{400 * MB}\n")
    write(tmp_path, "sys/fs/cgroup/gateway.slice/memory.stat", f"anon 1\ninactive_file {100 * MB}\n")
    budget, where = available_memory(tmp_path)
    assert budget == 724 * MB and "cgroup limit of 1024 MB" in where
    write(tmp_path, "sys/fs/cgroup/gateway.slice/memory.max", "max\n")
    assert available_memory(tmp_path)[0] == 6000000 * 1024


@pytest.mark.parametrize("text, value", [("2G", 2 << 30), ("1500M", 1500 << 20), ("1.5GB", 3 << 29), ("512k", 512 << 10),
                                         ("1000", 1000), ("2GiB", 2 << 30)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def manifest(layers=24, kv_heads=2, head_dim=64, data=400 * MB, mlp=4, embed=8):
    return {"model": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim},
            "files": {"model.onnx": {"bytes": 100_000}, "model.onnx.data": {"bytes": data}},
            "quantization": {"mlp": mlp, "embed": embed}}


def test_kv_cache_bytes_follow_the_manifest():
    assert kv_bytes(manifest(), 4096) == 24 * 2 * 2 * 4096 * 64 * 4 == 96 * MB


def test_check_fit_names_the_largest_context_that_fits(tmp_path):
    m = manifest()
    need = memory_need(m, 32768)
    assert need.kv == 768 * MB and need.weights >= 400 * MB
    check_fit(tmp_path, m, 32768, need.total)                   # exactly enough passes
    with pytest.raises(ArtifactError) as e:
        check_fit(tmp_path, m, 32768, "1G")
    fits = (1024 * MB - need.weights - need.runtime) // kv_bytes(m, 1) // 256 * 256
    assert f"--context {fits} fits" in str(e.value) and "1024 MB is allowed by --max-memory" in str(e.value)
    check_fit(tmp_path, m, fits, "1G")                          # and the suggestion does fit
    check_fit(tmp_path, m, 32768, "off")


def test_check_fit_asks_for_fewer_bits_when_weights_alone_overflow(tmp_path):
    with pytest.raises(ArtifactError, match=r"fewer bits \(--bits 4 --embed-bits 4\)"):
        check_fit(tmp_path, manifest(data=900 * MB, mlp=8), 4096, "1G")
    with pytest.raises(ArtifactError, match="even at 4 bits: use a smaller model"):
        check_fit(tmp_path, manifest(data=900 * MB, embed=4), 4096, "1G")


def test_check_fit_against_available_memory(tmp_path):
    write(tmp_path, "proc/meminfo", "MemAvailable:   512000 kB\n")
    with pytest.raises(ArtifactError, match=r"is available \(MemAvailable\); --context \d+ fits"):
        check_fit(tmp_path, manifest(data=100 * MB), 32768, root=tmp_path)
    check_fit(tmp_path, manifest(data=100 * MB), 1024, root=tmp_path)


@pytest.fixture(scope="module")
def artifact(exported):
    return exported(BUNDLED_STORIES, 8)


def test_cli_refuses_a_tiny_memory_budget_in_one_line(artifact):
    for cmd in (("run", artifact, "Once", "--raw"), ("bench", artifact, "--gen-tokens", "2")):
        text = assert_one_line_error(edgert(*cmd, "--max-memory", "20M"), "needs about", "20 MB is allowed by --max-memory",
                                     "--max-memory off skips this check")
        assert "runtime" in text and "KV cache" in text
    assert_one_line_error(edgert("run", artifact, "Once", "--max-memory", "lots"), "--max-memory: 'lots' is not a size")


def test_cli_runs_within_a_budget_and_reports_threads(artifact, tmp_path):
    r = edgert("run", artifact, "Once upon a time", "--raw", "--max-tokens", "5", "--temperature", "0", "--json",
               "--max-memory", "1G")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"].startswith(", there was")
    out = tmp_path / "b.json"
    r = edgert("bench", artifact, "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "1", "--json", out)
    assert r.returncode == 0, r.stderr
    threads = json.loads(out.read_text())["threads"]
    assert 1 <= threads <= len(os.sched_getaffinity(0))         # at most the CPUs this process may use
    r = edgert("bench", artifact, "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "1", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["threads"] == 1                 # --threads reaches the session and the report


def test_run_stops_at_the_context_with_a_stated_reason(artifact):
    """A full KV cache ends generation cleanly: exit 0, stop_reason "context", one line saying why."""
    args = ("run", artifact, "Once upon a time", "--raw", "--ignore-eos", "--max-tokens", "500", "--context", "24")
    r = edgert(*args)
    assert r.returncode == 0, r.stderr
    assert "stop: context" in r.stderr and "the 24-token context is full" in r.stderr and "raise --context" in r.stderr
    out = json.loads(edgert(*args, "--json").stdout)
    assert out["stop_reason"] == "context" and out["prompt_tokens"] + len(out["tokens"]) == 24 + 1  # the last is not fed


def test_mapped_dirty_pages_are_counted_and_dontneed_keeps_clean_ones(tmp_path):
    """The calibration probe unmaps looked-up weight pages (MADV_DONTNEED) only where the process
    never wrote to them: a copy-on-write page would be lost. Clean pages come back from the file."""
    from edgert.device import MADV_DONTNEED, mapped_dirty_kb, page_out_weights
    data = tmp_path / "w.onnx.data"
    np.arange(1 << 18, dtype=np.float32).tofile(data)          # 1 MB
    m = np.memmap(data, np.float32, mode="c")                   # private, writable: as onnxruntime maps it
    assert float(m[1000]) == 1000.0 and mapped_dirty_kb(tmp_path) == 0
    page_out_weights(tmp_path, MADV_DONTNEED)
    assert float(m[1000]) == 1000.0                            # a clean page: read back from the file
    m[5] = -1.0                                                 # now one page is this process's own
    assert mapped_dirty_kb(tmp_path) >= 4
    del m


def _resident(arr) -> float:
    """The share of an array's pages in the page cache (mincore)."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    pages = -(-arr.nbytes // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(arr.ctypes.data, arr.nbytes, vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / pages


def test_row_tables_stay_in_the_page_cache_when_the_weights_are_paged_out(tmp_path, artifact):
    """Decode looks rows up in the embedding and lm_head tables: those leave the RSS but stay in the
    page cache (read ahead), while every other mapped tensor is paged out (read again from disk only
    if used, which onnxruntime's repacked weights never are)."""
    import ctypes
    import mmap
    from edgert.device import MADV_PAGEOUT, page_out_weights, row_tables
    data = tmp_path / "w.onnx.data"
    np.arange(1 << 19, dtype=np.float32).tofile(data)                  # 2 MB: two 1 MB "tensors"
    with open(data, "rb+") as f:             # as a weight file is: on disk, its pages cached as they are read
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    table, other = (np.memmap(data, np.float32, mode="c", offset=o, shape=(1 << 18,)) for o in (0, 1 << 20))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    probe = np.memmap(data, np.float32, mode="c", offset=1 << 20, shape=(1024,))
    if libc.madvise(probe.ctypes.data, mmap.PAGESIZE, MADV_PAGEOUT) != 0:
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux < 5.4)")
    del probe
    assert float(table.sum()) > 0 and float(other.sum()) > 0        # every page read: cached
    assert _resident(table) == _resident(other) == 1.0
    tables = {"w.onnx.data": [(0, 1 << 20)]}
    for _ in range(50):
        page_out_weights(tmp_path, tables=tables)
        assert _resident(table) == 1.0          # (never dropped, so the read-ahead finds it cached)
        if _resident(other) < 0.5:
            break
        time.sleep(0.02)
    else:
        pytest.skip("this kernel kept the paged-out pages cached")
    assert float(table.sum()) > 0                                       # mapped again, then
    page_out_weights(tmp_path)                                          # no tables: all of it goes
    assert _resident(table) < 0.5
    page_out_weights(tmp_path, tables=tables)                           # read ahead again (asynchronously)
    deadline = time.time() + 10
    while _resident(table) < 1.0 and time.time() < deadline:
        time.sleep(0.01)
    assert _resident(table) == 1.0 and _resident(other) < 0.5
    assert float(table[1000]) == 1000.0 and float(other[1000]) == (1 << 18) + 1000.0   # both still read right
    # an artifact's tables: its embedding (and a split lm_head's planes), by the exporter's names
    tables = row_tables(Path(artifact), "model.onnx")
    assert list(tables) == ["model.onnx.data"] and len(tables["model.onnx.data"]) >= 2
    assert row_tables(Path(artifact), "missing.onnx") == {}


def test_a_loaded_model_keeps_its_row_tables_cached_and_pages_out_the_rest(artifact):
    """Through onnxruntime's own mappings: after loading, the embedding's pages are in the page
    cache (read ahead) and the repacked weights' originals are not."""
    import ctypes
    import mmap
    from edgert.device import _data_mappings, row_tables
    from edgert.model import Model
    folder = Path(artifact)
    with open(folder / "model.onnx.data", "rb+") as f:                  # a cold cache, as after a reboot
        os.fsync(f.fileno())       # a just-exported file's pages are dirty: neither dropped nor paged out until written
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    model = Model(folder, context=32, threads=1)
    tables = row_tables(folder, "model.onnx")["model.onnx.data"]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]

    def resident(start, size):
        vec = (ctypes.c_ubyte * (-(-size // mmap.PAGESIZE)))()
        assert libc.mincore(start, size, vec) == 0
        return sum(v & 1 for v in vec) / len(vec)
    deadline, kinds = time.time() + 10, {}
    while time.time() < deadline:
        kinds = {True: [], False: []}
        for start, size, name, offset in _data_mappings(folder):
            kinds[any(lo < offset + size and offset < hi for lo, hi in tables)].append(resident(start, size))
        if kinds[True] and min(kinds[True]) == 1.0:
            break
        time.sleep(0.02)
    assert kinds[True] and min(kinds[True]) == 1.0, kinds                # the tables: read ahead
    assert kinds[False] and sum(kinds[False]) / len(kinds[False]) < 0.5 or sys_keeps_pages(), kinds
    del model


def sys_keeps_pages() -> bool:
    """Whether this kernel ignores MADV_PAGEOUT (Linux < 5.4): then nothing leaves the page cache."""
    import platform
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    return (major, minor) < (5, 4)
