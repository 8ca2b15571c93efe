"""Block-wise weight quantization in the layout of ONNX Runtime's MatMulNBits / QMoE.

A weight W [N, K] (out, in) is cut along K into blocks of `block_size`; each block keeps one
float scale and, for int4, one zero point (asymmetric, like llama.cpp's q4_1: small models
lose far less than with symmetric q4_0). int8 is symmetric: its grid is fine enough.
K that is not a multiple of the block is zero-padded, exactly as the kernel expects.
Without --block-size each linear gets `auto_block` of its input width (128 on real models, whose
decode then reads 4.28 bits per weight instead of 5.13); the embedding and lm_head tables keep
blocks of TABLE_BLOCK. A model under 128 wide is exported under a byte budget instead
(`default_budget`, `plan_budget`).

How int4 codes are chosen (the recipe, `Quantizer`):
  rtn     round to nearest on each block's min/max range;
  search  per block, the best of a few shrunken ranges, each with its least-squares scale;
  gptq    (default) needs the input statistics of each linear from a calibration text
          (E[x x^T], `Stats`): GPTQ quantizes the columns in order and spreads each column's
          rounding error over the columns still to come, weighted by how the inputs correlate,
          so the layer's *output* error is minimised rather than the weight error; each block's
          range is searched on the activation-weighted error first.
Without statistics (experts' down projections, embeddings) gptq falls back to `search`.
Measured on stories260K, held-out perplexity over fp32 at block 32: rtn +9.5%, search +7.7%,
gptq +3.5% (benchmarks/quant_recipes.py, which also has the block-size and int8-down variants).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

_ROWS_PER_CHUNK = 256   # rows per block-search chunk: its temporaries stay in cache (1.4x faster than 2048)
RECIPES = ("gptq", "search", "rtn")
DEFAULT_RECIPE = "gptq"
TABLE_BLOCK = 32        # the embedding and lm_head tables (int8 by default) unless --block-size says otherwise


def auto_block(*widths: int, bits: int = 4) -> int:
    """The block size of an int4 linear (or of a layer's experts, one block for all their matrices)
    exported without --block-size: the largest of 128 and 64 that divides every input width and
    leaves every row at least two blocks, else 32. int8 keeps 32 (llama.cpp Q8_0's block): it is
    the near-lossless choice, and its scales are 11% of its bytes at 32 against 44% for int4.
    Wider blocks store fewer scales and zero points per weight: on anchor256 (benchmarks/quant_recipes.py) GPTQ at block 128 stores 4.28 bits per projection
    weight against 5.13 at block 32, for +0.12% perplexity against +0.03% (llama.cpp Q4_K_M:
    +0.39% at 4.80); decode reads 13% fewer bytes and MLAS's int4 kernels do less per weight.
    Narrow rows (the tiny trained models: stories260K's 64 wide) keep 32, where a wider block
    costs measurably (stories260K +3.96% at 32, +5.73% at 64)."""
    for block in (128, 64) if bits == 4 else ():
        if all(w % block == 0 and w >= 2 * block for w in widths):
            return block
    return 32


@dataclass
class Quantized:
    packed: np.ndarray        # uint8 [N, k_blocks, block_size * bits / 8]
    scales: np.ndarray        # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)] packed; None = symmetric
    bits: int
    block_size: int
    k: int

    def dequantize(self) -> np.ndarray:
        """W as the kernel sees it (tests and error reports)."""
        q = unpack(self.packed, self.bits).astype(np.float32)
        n, kb, bs = q.shape
        if self.zero_points is None:
            zp = np.float32(1 << (self.bits - 1))
        else:
            zp = unpack(self.zero_points[:, None, :], self.bits)[:, 0, :kb].astype(np.float32)[..., None]
        return ((q - zp) * self.scales[..., None]).reshape(n, kb * bs)[:, : self.k]

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    lo, hi = packed & 0x0F, packed >> 4
    return np.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _pack4(q: np.ndarray) -> np.ndarray:
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _pack_zero_points(zps: np.ndarray) -> np.ndarray:
    """int4 zero points [N, kb] -> [N, ceil(kb / 2)] bytes, two per byte (an odd count padded)."""
    if zps.shape[1] % 2:
        zps = np.concatenate([zps, np.zeros((len(zps), 1), np.uint8)], axis=1)
    return _pack4(zps)


SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8)
SPAN = 1024             # GPTQ compensates errors within spans of this many input columns
_GPTQ_CHUNK = 1 << 24   # weights per row chunk in GPTQ: fewer, longer column loops
_SUB = 8                # GPTQ's columns per sub-block (see _gptq)
_GROUP = 128            # GPTQ's columns per group: the span's later columns are updated once per group
DAMP = 0.01             # of the mean input power, added to the Hessian's diagonal (GPTQ's default)


def _grid(blk: np.ndarray, bits: int, symmetric: bool, f: float, axis: int = -1):
    """(scale, zero point) per block (along `axis`) for its range shrunk by f."""
    if symmetric:
        qmax, m = (1 << (bits - 1)) - 1, np.abs(blk).max(axis)    # int8: [-127, 127] + 128
        return m * f / qmax, np.full(m.shape, 1 << (bits - 1), np.float32)
    return _range_grid(np.minimum(blk.min(axis), 0), np.maximum(blk.max(axis), 0), bits, f)


def _range_grid(lo: np.ndarray, hi: np.ndarray, bits: int, f: float):
    """(scale, zero point) of an asymmetric grid over [lo, hi] (which hold 0) shrunk by f."""
    qmax = (1 << bits) - 1
    s = (hi * f - lo * f) / qmax                          # the grid must hold an exact 0
    return s, np.clip(np.rint(-(lo * f) / np.where(s == 0, 1, s)), 0, qmax)


def _codes(blk: np.ndarray, s: np.ndarray, zp: np.ndarray, bits: int, axis: int = -1) -> np.ndarray:
    c = blk / np.expand_dims(np.where(s == 0, 1, s), axis)     # one temporary, then in place
    np.rint(c, out=c)
    c += np.expand_dims(zp, axis)
    return np.clip(c, 0, (1 << bits) - 1, out=c)


def _search(blk: np.ndarray, bits: int, symmetric: bool, shrink=SHRINK, weight: np.ndarray | None = None,
            axis: int = -1, codes: bool = True):
    """Per block (the weights along `axis`), the best of the ranges shrunk by each factor in
    `shrink`, each with its least-squares scale, by squared error (weighted per input column by
    `weight`, the mean square of that input, when given). Clipping a rare outlier often buys a finer
    grid for the other weights (stories260K int4 KL 0.097 -> 0.083). int8 and a single factor:
    plain rounding. Returns codes (blk's shape; None unless `codes`), scales and zero points
    (blk's shape without axis)."""
    if bits == 8 or len(shrink) == 1:
        s, zp = _grid(blk, bits, symmetric, shrink[0], axis)
        return _codes(blk, s, zp, bits, axis), s.astype(np.float32), zp
    wt = np.float32(1) if weight is None else \
        weight.astype(np.float32).reshape([-1 if d == axis % blk.ndim else 1 for d in range(blk.ndim)])
    lo, hi = np.minimum(blk.min(axis), 0), np.maximum(blk.max(axis), 0)    # once for every factor
    best = None
    wc, tmp = np.empty(blk.shape, np.result_type(blk, wt)), np.empty(blk.shape, np.result_type(blk, wt))
    for f in shrink:          # (buffers reused across factors: a large temporary costs its page faults)
        grid, zp = _range_grid(lo, hi, bits, f)
        c = _codes(blk, grid, zp, bits, axis)
        c -= np.expand_dims(zp, axis)
        np.multiply(wt, c, out=wc)
        den, num = np.multiply(wc, c, out=tmp).sum(axis), np.multiply(wc, blk, out=tmp).sum(axis)
        s = np.where(den > 0, num / np.where(den > 0, den, 1), grid).astype(np.float32)
        err = s * s * den - 2 * s * num       # sum wt (c s - w)^2, less sum wt w^2 (the same for every f)
        if best is None:
            best = [grid, s, zp, err]
        else:
            better = err < best[3]
            for j, v in enumerate((grid, s, zp, err)):
                best[j] = np.where(better, v, best[j])
    grid, s, zp, _ = best
    return (_codes(blk, grid, zp, bits, axis) if codes else None), s, zp


class Stats:
    """What a calibration text says about one linear's input: x [tokens, K], given or read from a
    raw file when first needed (float32, or bfloat16 when its name ends in .bf16: the calibration
    probe's, half the bytes to write and read back). GPTQ needs H = E[x x^T] only in diagonal spans of SPAN
    columns (see `_gptq`), so no K x K matrix is ever formed; the factors are kept until
    release(), since MoE experts share one input."""

    def __init__(self, x: np.ndarray | None = None, file=None, width: int = 0):
        self._x, self.file, self.width, self._factors = x, file, width, {}

    @property
    def x(self) -> np.ndarray:
        if self._x is None:
            self._x = (_read_bf16(self.file) if str(self.file).endswith(".bf16")
                       else np.fromfile(self.file, np.float32)).reshape(-1, self.width)
        return self._x

    def release(self) -> None:
        self._factors = {}
        if self.file is not None:
            self._x = None

    def factor(self, lo: int, hi: int):
        """GPTQ's factor for input columns lo:hi (past K: zero padding up to a whole block), in act
        order: (U of the permuted H, H's damped diagonal and dead inputs in column order, the order)."""
        key = (lo, hi)
        if key not in self._factors:
            k = self.x.shape[1]
            x = np.ascontiguousarray(self.x[:, lo:min(hi, k)], np.float32)
            h = np.eye(hi - lo, dtype=np.float32)   # padded columns: identity, they stay exact zeros
            h[:x.shape[1], :x.shape[1]] = x.T @ x / len(x)
            self._factors[key] = _hessian_factor(h, x.shape[1])
        return self._factors[key]


def _read_bf16(path, chunk: int = 1 << 20) -> np.ndarray:
    """A raw bfloat16 file as float32 (a bfloat16 is the top half of a float32), widened a chunk
    at a time: the whole file is never held twice (the 1.5B shape's down projection inputs are
    73 MB as float32)."""
    import os
    out = np.empty(os.path.getsize(path) // 2, np.uint32)
    with open(path, "rb") as f:
        for at in range(0, len(out), chunk):
            part = np.fromfile(f, np.uint16, count=min(chunk, len(out) - at))
            np.left_shift(part, 16, out=out[at:at + len(part)], dtype=np.uint32)
    return out.view(np.float32)


def _hessian_factor(h: np.ndarray, real: int):
    """(upper Cholesky factor of the permuted H^-1, H's damped diagonal, dead inputs, order): the
    columns are taken in act order, the largest input power first (GPTQ's act-order: the columns
    that matter most are rounded while the most columns remain to absorb their error); row j of
    the factor says how the j-th column's rounding error is spread over the later ones. In H's
    precision: float32 from `Stats.factor`, as in GPTQ's reference (2.4x faster than float64 on a
    1024 span; the damping keeps it well conditioned)."""
    diag = np.diag(h).copy()
    dead = diag <= 0                              # an input that is always 0: its weights do not matter
    h[dead, dead] = 1
    h[np.diag_indices(len(h))] += DAMP * diag[:real].mean()   # damping: a well-conditioned inverse
    imp = np.diag(h).copy()
    order = np.argsort(-imp, kind="stable")
    h = h[order][:, order]
    # H^-1 = U^T U with U = J L^-1 J, where J reverses the order and J H J = L L^T: one Cholesky and
    # a triangular inverse, 2x faster than inverting H and factoring the inverse.
    u = _cholesky_inverse(np.ascontiguousarray(h[::-1, ::-1]))[::-1, ::-1]
    return np.ascontiguousarray(u, np.float32), imp.astype(np.float32), dead, order


def _cholesky_inverse(h: np.ndarray) -> np.ndarray:
    """L^-1 for H = L L^T, by halves: with L11 = chol(H11), L21 = H21 L11^-T and L22 = chol(H22 - L21 L21^T),
    L^-1 = [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]]: matrix products do the work (numpy has no
    triangular inverse, and its Cholesky of a 1024 matrix takes longer than this whole recursion)."""
    n = len(h)
    if n <= 128:
        return np.tril(np.linalg.inv(np.linalg.cholesky(h)))
    m = n // 2
    i11 = _cholesky_inverse(h[:m, :m])
    l21 = h[m:, :m] @ i11.T
    i22 = _cholesky_inverse(h[m:, m:] - l21 @ l21.T)
    out = np.zeros_like(h)
    out[:m, :m], out[m:, m:], out[m:, :m] = i11, i22, -(i22 @ (l21 @ i11))
    return out


def _gptq(wt: np.ndarray, stats: Stats, bits: int, block_size: int, shrink=SHRINK):
    """GPTQ (Frantar et al. 2022) on W^T [kb * block_size, R] (changed in place) with act order and
    static grids: each block's grid is chosen first (activation-weighted search on the weights as
    given), then the columns are rounded on those grids in act order (`_hessian_factor`), each
    column's rounding error compensated on the columns still to come of its span (a block of
    MatMulNBits is a run of adjacent columns, so grids chosen as act order reaches them could not
    be stored; fixed grids can). Spans of SPAN columns treat H as block-diagonal: the cost grows
    with K * SPAN instead of K^2 (a 8960-wide down projection would need a 8960^2 inverse
    otherwise). The work is on W transposed, so that a column is one contiguous vector (3x faster
    than strided columns), and in act order (a permuted copy of the span).
    Returns codes [R, kb, bs], scales, zero points."""
    kp, n = wt.shape
    qmax = (1 << bits) - 1
    codes = np.empty((kp, n), np.uint8)
    buf = np.empty(n, np.float32)
    scales = np.empty((kp // block_size, n), np.float32)
    zps = np.empty_like(scales)
    for lo0 in range(0, kp, SPAN):
        hi0 = min(lo0 + SPAN, kp)
        u, imp, dead, order = stats.factor(lo0, hi0)
        span = wt[lo0:hi0]
        span[dead] = 0
        for lo in range(0, hi0 - lo0, block_size):  # the grids, from the weights as given
            b = (lo0 + lo) // block_size
            _, scales[b], zps[b] = _search(span[lo:lo + block_size], bits, False, shrink, imp[lo:lo + block_size],
                                           axis=0, codes=False)
        first, last = lo0 // block_size, hi0 // block_size
        inv = 1 / np.where(scales[first:last] == 0, 1, scales[first:last])
        block_of = (lo0 + order) // block_size
        work = span[order]                         # the span in act order (a copy)
        m = hi0 - lo0
        for g0 in range(0, m, _GROUP):             # errors reach the rest of the span once per group
            g1 = min(g0 + _GROUP, m)
            err = np.empty((g1 - g0, n), np.float32)
            for sub in range(g0, g1, _SUB):        # errors spread column by column within a sub-block,
                end = min(sub + _SUB, g1)          # then onto the rest of the group in one product
                for j in range(sub, end):
                    b = block_of[j]
                    s, zp = scales[b], zps[b]
                    c = np.multiply(work[j], inv[b - first], out=buf)
                    np.clip(np.rint(c, out=c) + zp, 0, qmax, out=c)
                    codes[lo0 + order[j]] = c
                    c -= zp
                    c *= s
                    e = err[j - g0]
                    np.subtract(work[j], c, out=e)
                    e /= u[j, j]
                    if j + 1 < end:
                        work[j + 1:end] -= u[j, j + 1:end, None] * e
                if end < g1:
                    work[end:g1] -= u[sub:end, end:g1].T @ err[sub - g0:end - g0]
            if g1 < m:
                work[g1:] -= u[g0:g1, g1:].T @ err
    return _transpose(codes, np.empty((n, kp), np.uint8)).reshape(n, -1, block_size), scales.T, zps.T


# ---- GPTQ on every core ------------------------------------------------------------------------
# Rows are independent in GPTQ (each row's error is spread over that row's later columns; the
# input statistics are shared), so a linear's row chunks can be quantized anywhere in any order:
# the same bytes. Threads gain nothing (the column loop is many small numpy calls holding the GIL),
# and forked workers can inherit a lock held by a BLAS or onnxruntime thread; so `GptqPool` runs
# them in spawned processes, one BLAS thread each, while the graph goes on being built.
_POOL_MIN = 1 << 18          # weights of a linear below which it is quantized here (a tiny model never spawns)
_PARALLEL_MIN = 1 << 20      # weights below which the block search runs on one thread


def workers() -> int:
    """GPTQ processes: EDGERT_EXPORT_WORKERS, else one per core this process may use (at most 4:
    each holds a row chunk, its transpose and its input statistics)."""
    import os
    env = os.environ.get("EDGERT_EXPORT_WORKERS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 4))


def _row_chunks(n: int, kp: int) -> list[tuple[int, int]]:
    """A linear's GPTQ row chunks: about _GPTQ_CHUNK weights each, in whole 64-row BLAS panels."""
    step = max(64, _GPTQ_CHUNK // kp // 64 * 64)
    return [(r, min(r + step, n)) for r in range(0, n, step)]


def _gptq_rows(w: np.ndarray, stats, k: int, kb: int, block_size: int, bits: int, shrink):
    """GPTQ of rows w [R, k] -> (packed codes [R, kb, bs * bits / 8], scales [R, kb], zero points
    [R, kb] uint8, not yet packed)."""
    wt = np.zeros((kb * block_size, len(w)), np.float32)     # W^T, K zero-padded to whole blocks
    _transpose(np.asarray(w, np.float32), wt[:k])
    codes, s, zp = _gptq(wt, stats, bits, block_size, shrink)
    return _pack4(codes), s, zp.astype(np.uint8)


_WORKER_STATS: dict = {}


def _pool_job(rows, file: str, width: int, k: int, kb: int, block_size: int, bits: int, shrink):
    """In a GptqPool process: rows is the array, or (shared memory name, shape) holding it. The
    statistics of the last input file read are kept (a linear's chunks, and the linears reading
    one input, come one after another)."""
    stats = _WORKER_STATS.get(file)
    if stats is None:
        _WORKER_STATS.clear()
        stats = _WORKER_STATS[file] = Stats(file=file, width=width)
    if isinstance(rows, np.ndarray):
        return _gptq_rows(rows, stats, k, kb, block_size, bits, shrink)
    from multiprocessing import shared_memory
    shm = shared_memory.SharedMemory(name=rows[0])
    try:
        return _gptq_rows(np.ndarray(rows[1], np.float32, buffer=shm.buf), stats, k, kb, block_size, bits, shrink)
    finally:
        shm.close()


def _shared(rows: np.ndarray, free: list):
    """(a shared memory block holding a copy of rows, what _pool_job is given for it), or (None,
    rows) where Python has no shared memory (Android): then the rows are pickled through a pipe,
    which costs the exporter ~5x the CPU of one copy (12 s of a 1.5B export). The block is the
    smallest one in `free` (blocks whose jobs are done) that holds rows, else a new one: a block
    is mapped and its pages touched once, not once per chunk (the first touch of a page is a
    fault the kernel zero-fills; this copy cost the exporter 6.2 s at the 1.5B shape before)."""
    fits = [b for b in free if b.size >= rows.nbytes]
    if fits:
        shm = min(fits, key=lambda b: b.size)
        free.remove(shm)
    else:
        if free:                          # a free block too small for these rows: replaced, not kept
            _release(free.pop(free.index(max(free, key=lambda b: b.size))))
        try:
            from multiprocessing import shared_memory
            shm = shared_memory.SharedMemory(create=True, size=max(1, rows.nbytes))
        except (ImportError, OSError):
            return None, np.ascontiguousarray(rows, np.float32)
    np.ndarray(rows.shape, np.float32, buffer=shm.buf)[...] = rows
    return shm, (shm.name, rows.shape)


class Pending:
    """A GPTQ linear whose row chunks are being quantized by a GptqPool: its tensors' shapes now,
    its codes when `done` is called with the Quantized."""

    def __init__(self, n: int, k: int, bits: int, block_size: int, chunks: int):
        kb = -(-k // block_size)
        self.n, self.k, self.bits, self.block_size = n, k, bits, block_size
        self.shapes = ((n, kb, block_size * bits // 8), (n, kb), (n * (-(-kb // 2)),))
        self.nbytes = int(np.prod(self.shapes[0])) + 4 * n * kb + self.shapes[2][0]
        self.parts: list = [None] * chunks
        self.done = None        # callback(Quantized), set by whoever writes the tensors

    def finish(self) -> None:
        packed, scales, zps = (np.concatenate(p) for p in zip(*self.parts))
        self.parts = None
        self.done(Quantized(packed, scales, _pack_zero_points(zps), self.bits, self.block_size, self.k))


class GptqPool:
    """`workers` spawned processes quantizing GPTQ row chunks while the caller goes on; at most
    `workers` + 1 chunks are in flight, so memory stays near that many chunks. A new chunk goes in
    as soon as any one is done, not the oldest: chunks differ up to 6x in size (a layer's o_proj
    against its gate_up), and waiting for the oldest left a process idle behind a long one (the
    1.5B shape's processes were busy ~80% of the build, ~95% now). `drain()` waits for all;
    `close()` stops the processes (also on errors)."""

    def __init__(self, count: int):
        import multiprocessing
        import os
        import sys
        import types
        from collections import deque
        from concurrent.futures import ProcessPoolExecutor
        self.count, self.inflight, self.free = count, deque(), []
        saved = {v: os.environ.get(v) for v in _BLAS_THREADS}
        os.environ.update({v: "1" for v in _BLAS_THREADS})     # read by the children's numpy at import
        main = sys.modules["__main__"]
        # the children need only this module: a bare __main__ keeps them from re-running the
        # program that started the export (a script without a __name__ guard would export again)
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            self.pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init)
            for f in [self.pool.submit(int, 0) for _ in range(count)]:     # all start now, under this environment
                f.result()
        finally:
            sys.modules["__main__"] = main
            for v, old in saved.items():
                if old is None:
                    os.environ.pop(v, None)
                else:
                    os.environ[v] = old

    def submit(self, w, stats, bits: int, block_size: int, shrink) -> Pending:
        n, k = w.shape
        kb = -(-k // block_size)
        chunks = _row_chunks(n, kb * block_size)
        pending = Pending(n, k, bits, block_size, len(chunks))
        for i, (r0, r1) in enumerate(chunks):
            while len(self.inflight) > self.count:
                self._retire()
            shm, rows = _shared(w[r0:r1], self.free)
            self.inflight.append([None, pending, i, shm])
            with _alive(self.count):
                self.inflight[-1][0] = self.pool.submit(_pool_job, rows, str(stats.file), stats.width, k, kb,
                                                        block_size, bits, shrink)
        return pending

    def _retire(self) -> None:
        """Collect one chunk: whichever finishes first."""
        from concurrent.futures import FIRST_COMPLETED, wait
        with _alive(self.count):
            done, _ = wait([j[0] for j in self.inflight], return_when=FIRST_COMPLETED)
        at = next(n for n, j in enumerate(self.inflight) if j[0] in done)
        future, pending, i, shm = self.inflight[at]
        del self.inflight[at]
        try:
            with _alive(self.count):
                pending.parts[i] = future.result()
        finally:
            if shm is not None:
                self.free.append(shm)
        if all(p is not None for p in pending.parts):
            pending.finish()

    def drain(self) -> None:
        while self.inflight:
            self._retire()
        while self.free:                  # nothing more to copy: the blocks' memory goes back
            _release(self.free.pop())

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        while self.inflight:
            _release(self.inflight.popleft()[3])
        while self.free:
            _release(self.free.pop())


@contextmanager
def _alive(count: int):
    """A pool process that died (the kernel's OOM killer, say) becomes one MemoryError."""
    from concurrent.futures.process import BrokenProcessPool
    try:
        yield
    except BrokenProcessPool:
        raise MemoryError(f"a GPTQ process ended unexpectedly (out of memory?); EDGERT_EXPORT_WORKERS=1 "
                          f"quantizes in the exporter's own process (it used {count})") from None


def _release(shm) -> None:
    if shm is not None:
        shm.close()
        shm.unlink()


_BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _worker_init() -> None:
    """A pool process leaves Ctrl+C to the exporter (which stops the pool); no traceback of its own."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _transpose(a: np.ndarray, out: np.ndarray, tile: int = 256) -> np.ndarray:
    """out[...] = a.T in square tiles that stay in cache (4x faster than one strided copy)."""
    for r in range(0, a.shape[0], tile):
        for c in range(0, a.shape[1], tile):
            out[c:c + tile, r:r + tile] = a[r:r + tile, c:c + tile].T
    return out


def _each(fn, items, parallel: bool) -> None:
    """fn(item) for every item, on one thread per core when `parallel` (fn must only write its own rows)."""
    import os
    count = min(os.cpu_count() or 1, 8) if parallel else 1
    if count < 2:
        for item in items:
            fn(item)
        return
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(count) as pool:
        for _ in pool.map(fn, items):     # re-raises the first error
            pass


class Quantizer:
    """How weights become int4/int8 codes: the recipe's method and, when calibrated, the
    statistics of each linear's input, looked up by the linear's name. `plan` (name -> (bits,
    block size), from `plan_budget`) overrides the asked precision of the linears it names;
    `chosen` records what every named tensor got (the manifest's per-tensor table)."""

    def __init__(self, method: str = "search", stats=None, plan: dict | None = None, workers: int = 1):
        if method not in RECIPES:
            raise ValueError(f"unknown recipe {method!r} (one of: {', '.join(RECIPES)})")
        self.method, self.stats, self.plan = method, stats, plan or {}
        self.workers, self.pool = workers, None    # the GptqPool, started by the first large linear
        self.chosen: dict[str, dict] = {}
        self.weights: dict[str, int] = {}

    def __call__(self, w: np.ndarray, bits: int, block_size: int, name: str | None = None,
                 defer_above: int | None = None, record: str | None = None) -> Quantized | Pending:
        """block_size 0: `auto_block` of w's input width. defer_above: a large GPTQ linear whose
        every tensor holds more bytes than this may come back Pending (its codes computed by the
        pool, to be written where the caller reserves). name: the linear whose input statistics and
        plan apply; record: the per-tensor table's entry when it is another, summed over the calls
        that share it (a layer's experts: their gate/up read the router's input)."""
        asked = (bits, block_size or auto_block(w.shape[-1], bits=bits))
        # (a budget's plan never reaches experts: QMoE takes one layout for all of a layer's)
        bits, block_size = asked if record is not None else self.plan.get(name, asked)
        stats = self.stats.get(name) if self.stats is not None and name and bits == 4 else None
        if defer_above is not None and self._poolable(w, block_size, stats, defer_above):
            if self.pool is None:
                self.pool = GptqPool(self.workers)
            q = self.pool.submit(w, stats, bits, block_size, SHRINK)
            self._record(record or name, bits, block_size, q.nbytes, q.n * q.k, record is not None)
            return q
        if self.method == "rtn":
            q = quantize(w, bits, block_size, shrink=(1.0,))
        elif self.method == "gptq" and stats is not None:
            q = quantize(w, bits, block_size, stats=stats)
        else:
            q = quantize(w, bits, block_size)
        if record or name:
            self._record(record or name, q.bits, q.block_size, q.nbytes, q.packed.shape[0] * q.k, record is not None)
        return q

    def mlp(self, gate_up: str, down: str, act: str) -> None:
        """A gated MLP's two linears, named before they are quantized (the budget's `Survey` measures
        gate_up's error at the MLP's output); nothing to do here."""

    def _record(self, name: str, bits: int, block_size: int, nbytes: int, weights: int, summed: bool) -> None:
        if summed and name in self.chosen:
            self.chosen[name]["bytes"] += nbytes
            self.weights[name] += weights
        else:
            self.chosen[name] = {"bits": bits, "block_size": block_size, "bytes": nbytes}
            self.weights[name] = weights

    def _poolable(self, w, block_size: int, stats, defer_above: int) -> bool:
        """A GPTQ linear worth a pool process, whose smallest tensor (its zero points) is over defer_above bytes."""
        if self.workers < 2 or self.method != "gptq" or stats is None or stats.file is None or len(w.shape) != 2:
            return False
        n, k = w.shape
        return n * k >= _POOL_MIN and n * -(-(-(-k // block_size)) // 2) > defer_above

    def finish(self) -> None:
        """Wait for the pool's linears (their bytes are written when each completes)."""
        if self.pool is not None:
            self.pool.drain()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


# ---- mixed precision under a byte budget ------------------------------------------------------

# The layouts a linear may get under --bits-per-weight, cheapest first per bit width:
# int4 asymmetric (4 bits + a 32-bit scale and a 4-bit zero point per block) and int8 symmetric.
LAYOUTS = ((4, 128), (4, 64), (4, 32), (4, 16), (8, 64))
_SURVEY_ROWS = 128       # rows per linear whose error is measured (the rest scale with it)
SKIP = ("embed_tokens", "lm_head")   # tables: at --embed-bits, outside the budget


NARROW_HIDDEN = 128           # a model narrower than this gets NARROW_BITS_PER_WEIGHT by default
NARROW_BITS_PER_WEIGHT = 6.0


def default_budget(hidden: int) -> float | None:
    """The byte budget of an int4 GPTQ export given neither --bits-per-weight nor --block-size: none
    (uniform int4 in `auto_block`'s blocks) unless the model's hidden size is under NARROW_HIDDEN.
    Rows that narrow take blocks of 32, whose scales and zero points are a fifth of int4's bytes, and
    lose the most to int4: stories260K (64 wide) +3.9% perplexity, where the 128- and 256-wide
    fixtures lose under 1 point of accuracy and +0.1% (benchmarks/quant_recipes.py). llama.cpp
    spends more there too: its k-quants need rows of 256 and fall back to 5- and 8-bit types, and
    F16 where a row is not a multiple of 32 (Q4_K_M on stories260K: 8.16 bits per matrix weight, +1.9%). A budget of 6 bits gives
    stories260K +1.5% to +2.5% over three sampling seeds (5.5: +3.0% to +3.2%), spent mostly on
    holding gate/up at int8; uniform int4 there is `--block-size 32`."""
    return NARROW_BITS_PER_WEIGHT if hidden < NARROW_HIDDEN else None


def layout_bytes(n: int, k: int, bits: int, block_size: int) -> int:
    """Every stored byte of W [n, k] in this layout: codes (K padded to whole blocks), fp32 scales,
    and for int4 the zero points (two per byte, a row's count rounded up to whole bytes)."""
    kb = -(-k // block_size)
    return n * kb * block_size * bits // 8 + 4 * n * kb + (n * -(-kb // 2) if bits == 4 else 0)


class Survey:
    """A quantizer for the calibration probe that also keeps, for every named linear, a sample of
    its rows (evenly spaced), so that `plan_budget` can measure each layout's error once the
    probe has recorded the linear's inputs."""

    def __init__(self, inner):
        self.inner, self.linears = inner, {}
        self.mlps: dict[str, tuple[str, str]] = {}       # gate_up -> (down, act)
        self.downs: dict[str, np.ndarray] = {}           # down -> its columns at the gate_up's sampled units

    def mlp(self, gate_up: str, down: str, act: str) -> None:
        self.mlps[gate_up] = (down, act)

    def __call__(self, w, bits, block_size, name=None, defer_above=None, record=None):
        if name and not record and name not in SKIP and not hasattr(w, "quantized") and name not in self.linears:
            n, k = w.shape
            if name in self.mlps:      # unit j's gate row j and up row n/2 + j, for the same units
                units = _units(n // 2)
                rows = np.concatenate([w[units], w[n // 2 + units]])
            else:
                rows = w[np.linspace(0, n - 1, min(n, _SURVEY_ROWS)).astype(int)]
            self.linears[name] = (n, k, np.array(rows, np.float32))
            if any(down == name for down, _ in self.mlps.values()):
                self.downs[name] = np.array(w[:, _units(k)], np.float32)
        return self.inner(w, bits, block_size, name, **({"record": record} if record else {}))


def _units(width: int) -> np.ndarray:
    """The MLP units whose gate and up rows a survey samples (evenly spaced, _SURVEY_ROWS rows in all)."""
    return np.linspace(0, width - 1, min(width, _SURVEY_ROWS // 2)).astype(int)


ACTIVATIONS = {"silu": lambda a: a / (1 + np.exp(-a)),
               "gelu_tanh": lambda a: 0.5 * a * (1 + np.tanh(0.7978845608 * (a + 0.044715 * a ** 3)))}


def _output_power(stats: Stats, rows: np.ndarray, n: int) -> float:
    """E||x W^T||^2 of a linear with n rows, from its row sample."""
    y = stats.x @ rows.T
    return float((y * y).sum()) / len(stats.x) * n / len(rows) or 1.0


def layout_errors(rows: np.ndarray, n: int, stats: Stats | None, mlp: tuple | None = None) -> list[float]:
    """The error each layout leaves in the linear's output, relative to that output: its row sample
    quantized as the export will (GPTQ for int4 when calibrated, round to nearest for int8), then
    E||x (Q - W)^T||^2 / E||x W^T||^2 over the calibration tokens. Relative, because the next
    norm rescales what a layer adds: on anchor256 the absolute error spent the budget on a layer
    with large outputs and landed on the uniform-block curve (KL 0.0031 at 4.5 bits), the relative
    one below it (0.0025 at 4.5, 0.0018 at 5.0 against 0.0024 for block 32 at 5.13).
    mlp: for a gated MLP's gate_up, (act, down's columns at the sampled units, down's row sample,
    down's row count, down's input Stats): its error is measured where down's is, at the MLP's
    output and relative to it, carried there by the activation and down. Measured at its own
    output, gate_up ranked below down on stories260K, where one gate_up at int8 takes 0.2-0.9
    points off the perplexity increase and one down 0-0.2, and budgets spent on down did worse
    than the uniform layout."""
    if stats is None:
        return [float(((quantize(rows, b, bs).dequantize() - rows) ** 2).sum()) * n / len(rows) for b, bs in LAYOUTS]
    x, out = stats.x, []
    if mlp:
        act, columns, down_rows, down_n, down_stats = mlp
        signal, units, f = _output_power(down_stats, down_rows, down_n), len(rows) // 2, ACTIVATIONS[act]
        y = x @ rows.T
        hidden = f(y[:, :units]) * y[:, units:]
    else:
        signal = _output_power(stats, rows, n)
    for bits, bs in LAYOUTS:
        q = quantize(rows, bits, bs, stats=stats if bits == 4 else None).dequantize()
        if mlp:      # the MLP output's error from the sampled units, scaled to all n / 2 of them
            y = x @ q.T
            d = (f(y[:, :units]) * y[:, units:] - hidden) @ columns.T
            out.append(float((d * d).sum()) / len(x) * (n // 2) / units / signal)
        else:
            d = x @ (q - rows).T
            out.append(float((d * d).sum()) / len(x) * n / len(rows) / signal)
    return out


def _mlp(survey: Survey, stats, name: str) -> tuple | None:
    """layout_errors' `mlp` for a surveyed gate_up whose down was surveyed too, else None."""
    down, act = survey.mlps.get(name, (None, None))
    if down not in survey.downs or act not in ACTIVATIONS or stats.get(down) is None:
        return None
    n, _, rows = survey.linears[down]
    return act, survey.downs[down], rows, n, stats.get(down)


def plan_budget(survey: Survey, stats, bits_per_weight: float) -> dict:
    """name -> (bits, block size) for every surveyed linear such that their bytes (`layout_bytes`)
    stay within bits_per_weight / 8 per weight, spending on the largest error drop per byte first.
    stats: name -> Stats of the linear's input (`.get`; None: unweighted). Raises ValueError when
    even the cheapest layout does not fit."""
    names = sorted(survey.linears)
    weights = sum(survey.linears[t][0] * survey.linears[t][1] for t in names)
    budget = int(bits_per_weight * weights // 8)
    cost = {t: [layout_bytes(*survey.linears[t][:2], b, bs) for b, bs in LAYOUTS] for t in names}
    pick = {t: min(range(len(LAYOUTS)), key=lambda i: cost[t][i]) for t in names}
    spent = sum(cost[t][pick[t]] for t in names)
    if spent > budget:
        raise ValueError(f"--bits-per-weight {bits_per_weight:g} is below the smallest layout of these linears "
                         f"({8 * spent / weights:.3f})")
    err = {}
    for t in names:
        own, mlp = stats.get(t), _mlp(survey, stats, t)
        err[t] = layout_errors(survey.linears[t][2], survey.linears[t][0], own, mlp)
        if mlp and hasattr(own, "release"):     # (_mlp made down the input the stats release next, not gate_up)
            own.release()
    while True:
        best = None
        for t in names:
            c0, e0 = cost[t][pick[t]], err[t][pick[t]]
            for i, (c, e) in enumerate(zip(cost[t], err[t])):
                if c > c0 and e < e0 and spent + c - c0 <= budget:
                    gain = (e0 - e) / (c - c0)
                    if best is None or gain > best[0]:
                        best = (gain, t, i)
        if best is None:
            break
        _, t, i = best
        spent += cost[t][i] - cost[t][pick[t]]
        pick[t] = i
    return {t: LAYOUTS[pick[t]] for t in names}


def quantize(w: np.ndarray, bits: int, block_size: int, symmetric: bool | None = None, shrink=SHRINK,
             stats: Stats | None = None) -> Quantized:
    """W [N, K] -> codes; with `stats` (int4 asymmetric only) by GPTQ, else by the block search."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two >= 16, not {block_size}")
    symmetric = (bits == 8) if symmetric is None else symmetric
    if hasattr(w, "quantized"):     # a shape-only weight of a synthetic model (export/synthetic.py): random codes
        return w.quantized(bits, block_size, symmetric)
    n, k = w.shape
    kb = -(-k // block_size)
    packed = np.empty((n, kb, block_size * bits // 8), np.uint8)
    scales = np.empty((n, kb), np.float32)
    zps = None if symmetric else np.empty((n, kb), np.uint8)
    if stats is not None and (bits != 4 or symmetric):
        raise ValueError("GPTQ here is for asymmetric int4")

    def store(r, q, s, zp):
        rows = slice(r, r + q.shape[0])
        if not symmetric:
            zps[rows] = zp.astype(np.uint8)
        q = q.astype(np.uint8)
        packed[rows] = _pack4(q) if bits == 4 else q
        scales[rows] = s

    if stats is None:       # the block search: large numpy operations, which release the GIL
        def search(r):
            blk = np.zeros((min(_ROWS_PER_CHUNK, n - r), kb * block_size), np.float32)
            blk[:, :k] = w[r : r + blk.shape[0]]
            store(r, *_search(blk.reshape(blk.shape[0], kb, block_size), bits, symmetric, shrink))
        _each(search, range(0, n, _ROWS_PER_CHUNK), n * k >= _PARALLEL_MIN)
    else:
        for r0, r1 in _row_chunks(n, kb * block_size):
            packed[r0:r1], scales[r0:r1], zps[r0:r1] = _gptq_rows(w[r0:r1], stats, k, kb, block_size, bits, shrink)
    if zps is not None and bits == 4:
        zps = _pack_zero_points(zps)
    return Quantized(packed, scales, zps, bits, block_size, k)
