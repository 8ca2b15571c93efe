"""Block-wise weight quantization in the layout of ONNX Runtime's MatMulNBits / QMoE.

A weight W [N, K] (out, in) is cut along K into blocks of `block_size`; each block keeps one
float scale and, for int4, one zero point (asymmetric, like llama.cpp's q4_1: small models
lose far less than with symmetric q4_0). int8 is symmetric: its grid is fine enough.
K that is not a multiple of the block is zero-padded, exactly as the kernel expects.

How int4 codes are chosen (the recipe, `Quantizer`):
  rtn     round to nearest on each block's min/max range;
  search  per block, the best of a few shrunken ranges, each with its least-squares scale;
  gptq    (default) needs the input statistics of each linear from a calibration text
          (E[x x^T], `Stats`): GPTQ quantizes the columns in order and spreads each column's
          rounding error over the columns still to come, weighted by how the inputs correlate,
          so the layer's *output* error is minimised rather than the weight error; each block's
          range is searched on the activation-weighted error first.
Without statistics (experts' down projections, embeddings) gptq falls back to `search`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_ROWS_PER_CHUNK = 2048  # bounds the temporaries to a few MB per chunk
RECIPES = ("gptq", "search", "rtn")
DEFAULT_RECIPE = "gptq"


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


SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8)


def _grid(blk: np.ndarray, bits: int, symmetric: bool, f: float):
    """(scale, zero point) per block for its range shrunk by f."""
    if symmetric:
        qmax = (1 << (bits - 1)) - 1                      # int8: [-127, 127] + 128
        return np.abs(blk).max(-1) * f / qmax, np.full(blk.shape[:-1], 1 << (bits - 1), np.float32)
    qmax = (1 << bits) - 1
    lo = np.minimum(blk.min(-1), 0) * f                   # the grid must hold an exact 0
    hi = np.maximum(blk.max(-1), 0) * f
    s = (hi - lo) / qmax
    return s, np.clip(np.rint(-lo / np.where(s == 0, 1, s)), 0, qmax)


def _codes(blk: np.ndarray, s: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    s_safe = np.where(s == 0, 1, s)
    return np.clip(np.rint(blk / s_safe[..., None]) + zp[..., None], 0, (1 << bits) - 1)


def _search(blk: np.ndarray, bits: int, symmetric: bool, shrink=SHRINK, weight: np.ndarray | None = None):
    """Per block, the best of the ranges shrunk by each factor in `shrink`, each with its
    least-squares scale, by squared error (weighted per input column by `weight`, the mean square
    of that input, when given). Clipping a rare outlier often buys a finer grid for the other
    weights (stories260K int4 KL 0.097 -> 0.083). int8 and a single factor: plain rounding."""
    if bits == 8 or len(shrink) == 1:
        s, zp = _grid(blk, bits, symmetric, shrink[0])
        return _codes(blk, s, zp, bits), s.astype(np.float32), zp
    wt = 1.0 if weight is None else weight
    best = None
    for f in shrink:
        s, zp = _grid(blk, bits, symmetric, f)
        q = _codes(blk, s, zp, bits)
        c = q - zp[..., None]
        den = (wt * c * c).sum(-1)
        s = np.where(den > 0, (wt * blk * c).sum(-1) / np.where(den > 0, den, 1), s).astype(np.float32)
        err = (wt * (c * s[..., None] - blk) ** 2).sum(-1)
        if best is None:
            best = [q, s, zp, err]
        else:
            better = err < best[3]
            best[0] = np.where(better[..., None], q, best[0])
            for j, v in ((1, s), (2, zp), (3, err)):
                best[j] = np.where(better, v, best[j])
    return best[0], best[1], best[2]


@dataclass
class Stats:
    """What a calibration text says about one linear's input x [tokens, K]."""
    gram: np.ndarray          # float32 [K, K]: mean of x x^T over the calibration tokens


def _gptq(rows: np.ndarray, gram: np.ndarray, bits: int, block_size: int, kb: int, shrink=SHRINK):
    """GPTQ (Frantar et al. 2022) on rows [R, kb * block_size] (zero-padded columns get an identity
    Hessian row so they stay exact zeros). Returns codes [R, kb, bs], scales, zero points [R, kb]."""
    k = gram.shape[0]
    kp = kb * block_size
    h = np.eye(kp, dtype=np.float64)
    h[:k, :k] = gram
    diag = np.diag(h).copy()
    dead = diag[:k] <= 0                          # an input that is always 0: its weights do not matter
    h[np.arange(k)[dead], np.arange(k)[dead]] = 1
    h[np.diag_indices(kp)] += 0.01 * diag[:k].mean() if k else 0   # damping: a well-conditioned inverse
    # upper Cholesky factor of H^-1: row j holds how column j's error spreads to later columns
    u = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)
    w = rows.astype(np.float32, copy=True)
    w[:, :k][:, dead] = 0
    imp = np.diag(h).astype(np.float32)           # per-column weight for the block's range search
    n = w.shape[0]
    codes = np.empty((n, kb, block_size), np.float32)
    scales = np.empty((n, kb), np.float32)
    zps = np.empty((n, kb), np.float32)
    for b in range(kb):
        lo, hi = b * block_size, (b + 1) * block_size
        q, s, zp = _search(w[:, lo:hi][:, None, :], bits, False, shrink, imp[lo:hi])
        s, zp = s[:, 0], zp[:, 0]
        scales[:, b], zps[:, b] = s, zp
        err = np.empty((n, block_size), np.float32)
        for j in range(lo, hi):
            c = _codes(w[:, j:j + 1], s, zp, bits)[:, 0]
            codes[:, b, j - lo] = c
            e = (w[:, j] - (c - zp) * s) / u[j, j]
            w[:, j + 1:hi] -= e[:, None] * u[j, j + 1:hi][None, :]
            err[:, j - lo] = e
        w[:, hi:] -= err @ u[lo:hi, hi:]
    return codes, scales, zps


class Quantizer:
    """How weights become int4/int8 codes: the recipe's method and, when calibrated, the
    statistics of each linear's input, looked up by the linear's name."""

    def __init__(self, method: str = "search", stats=None):
        if method not in RECIPES:
            raise ValueError(f"unknown recipe {method!r} (one of: {', '.join(RECIPES)})")
        self.method, self.stats = method, stats

    def __call__(self, w: np.ndarray, bits: int, block_size: int, name: str | None = None) -> Quantized:
        stats = self.stats.get(name) if self.stats is not None and name and bits == 4 else None
        if self.method == "rtn":
            return quantize(w, bits, block_size, shrink=(1.0,))
        if self.method == "gptq" and stats is not None:
            return quantize(w, bits, block_size, gram=stats.gram)
        return quantize(w, bits, block_size)


def quantize(w: np.ndarray, bits: int, block_size: int, symmetric: bool | None = None, shrink=SHRINK,
             gram: np.ndarray | None = None) -> Quantized:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two >= 16, not {block_size}")
    symmetric = (bits == 8) if symmetric is None else symmetric
    n, k = w.shape
    kb = -(-k // block_size)
    packed = np.empty((n, kb, block_size * bits // 8), np.uint8)
    scales = np.empty((n, kb), np.float32)
    zps = None if symmetric else np.empty((n, kb), np.uint8)
    for r in range(0, n, _ROWS_PER_CHUNK):
        blk = np.zeros((min(_ROWS_PER_CHUNK, n - r), kb * block_size), np.float32)
        blk[:, :k] = w[r : r + blk.shape[0]]
        if gram is not None:
            q, s, zp = _gptq(blk, gram, bits, block_size, kb, shrink)
        else:
            q, s, zp = _search(blk.reshape(blk.shape[0], kb, block_size), bits, symmetric, shrink)
        if not symmetric:
            zps[r : r + blk.shape[0]] = zp.astype(np.uint8)
        q = q.astype(np.uint8)
        packed[r : r + blk.shape[0]] = _pack4(q) if bits == 4 else q
        scales[r : r + blk.shape[0]] = s
    if zps is not None and bits == 4:
        if kb % 2:
            zps = np.concatenate([zps, np.zeros((n, 1), np.uint8)], axis=1)
        zps = _pack4(zps)
    return Quantized(packed, scales, zps, bits, block_size, k)
