"""Read a Hugging Face checkpoint folder one tensor at a time.

safetensors is parsed directly (8-byte header length, JSON header, raw data) and each tensor
(or a range of its rows) is read with pread into its own buffer, so reading a tensor costs only
that tensor: a 7B model exports on a device with a few GB of RAM. (A memory map would do the
same I/O but leave every touched page of the checkpoint counted in the process's RSS.)
bf16 is widened to fp32 by a 16-bit shift, so no torch is needed.
"""
from __future__ import annotations

import json
import os
import stat
import struct
import threading
from pathlib import Path

import numpy as np

_OPEN = threading.Lock()


class CheckpointError(Exception):
    """A checkpoint folder that cannot be read; the message is one line for the user."""


MAX_HEADER_BYTES = 100 << 20          # the safetensors format's own limit
MAX_JSON_BYTES = 64 << 20             # config.json, generation_config.json, the shard index
# Trained weights are O(1) (fp16 checkpoints cannot even hold more than 65504); a value past 2^50
# (~1.1e15) is damage, not training: squared in a norm or summed over a matmul it overflows fp32
# (3.4e38) and the artifact computes NaN. (bf16 checks this on the exponent bits: >= 2^50.)
MAX_MAGNITUDE = 2.0 ** 50


def _regular(path: Path) -> None:
    """Refuse a FIFO, device or folder before open(): reading one blocks forever or never ends."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, device or folder); refused")


def _read_json(path: Path):
    _regular(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MB")
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:100]})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None


_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "U8": np.uint8, "I8": np.int8, "BOOL": np.bool_}


class _SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        _regular(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path.name}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n <= 0 or 8 + n > size or n > MAX_HEADER_BYTES:
                    raise CheckpointError(f"{path.name}: corrupt safetensors header (length {n}, file {size} bytes)")
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise CheckpointError(f"{path.name}: corrupt safetensors header (not JSON)") from None
        except OSError as e:
            raise CheckpointError(f"{path.name}: cannot read ({e.strerror})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path.name}: corrupt safetensors header (not an object)")
        header.pop("__metadata__", None)
        self.start = 8 + n
        self.tensors = header
        spans = []
        for name, t in header.items():
            if not isinstance(t, dict) or t.get("dtype") not in _DTYPES:
                raise CheckpointError(f"{path.name}: tensor {name[:80]} has an unsupported dtype "
                                      f"{str(t.get('dtype') if isinstance(t, dict) else t)[:40]!r}")
            shape, offsets = t.get("shape"), t.get("data_offsets")
            if (not isinstance(shape, list) or len(shape) > 8
                    or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
                raise CheckpointError(f"{path.name}: tensor {name[:80]} has a malformed shape {str(shape)[:60]}")
            if (not isinstance(offsets, list) or len(offsets) != 2
                    or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                    or not 0 <= offsets[0] <= offsets[1]):
                raise CheckpointError(f"{path.name}: tensor {name[:80]} has malformed data_offsets {str(offsets)[:60]}")
            b, e = offsets
            want = np.dtype(_DTYPES[t["dtype"]]).itemsize
            for d in shape:
                want *= d
            if e - b != want:
                raise CheckpointError(f"{path.name}: tensor {name[:80]} has {e - b} bytes, its shape needs {want}")
            if self.start + e > size:
                raise CheckpointError(f"{path.name}: truncated (tensor {name[:80]} ends past the end of the file)")
            spans.append((b, e, name))
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0 and e1 > b1:
                raise CheckpointError(f"{path.name}: tensors {n0[:60]} and {n1[:60]} overlap in the file (corrupt header)")
        self._fd = None

    def read(self, name: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> tuple[np.ndarray, str]:
        """Rows start:stop (along the first axis) of a tensor, in its stored dtype (into `out`'s
        memory when given: a 1-D uint8 array of at least that many bytes)."""
        if self._fd is None:
            with _OPEN:                       # quantize reads rows from several threads
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        t = self.tensors[name]
        shape, dtype = list(t["shape"]) or [1], np.dtype(_DTYPES[t["dtype"]])
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        stop = shape[0] if stop is None else min(stop, shape[0])
        want = (stop - start, *shape[1:])
        if out is None:
            out = np.empty(want, dtype)
        else:
            out = out.view(np.uint8)[:int(np.prod(want)) * dtype.itemsize].view(dtype).reshape(want)
        view, offset, done = memoryview(out.reshape(-1).view(np.uint8)), self.start + t["data_offsets"][0] + start * row, 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.path.name}: truncated while reading {name}")
            done += n
        return out.reshape(t["shape"]) if not t["shape"] else out, t["dtype"]


def to_float32(arr: np.ndarray, dtype: str, name: str = "", out: np.ndarray | None = None) -> np.ndarray:
    """A tensor as read (its stored dtype) -> float32, into `out` when given (arr's shape). arr is
    scratch: a bfloat16 one is overwritten by the check for NaN."""
    if dtype == "BF16":  # bf16 is the top half of an fp32; all exponent bits set: inf or NaN
        out = np.left_shift(arr, 16, dtype=np.uint32, out=None if out is None else out.view(np.uint32)).view(np.float32)
        top = np.bitwise_and(arr, 0x7F80, out=arr).max() if arr.size else 0     # (checked on half the bytes)
        bad, huge = top == 0x7F80, top >= (127 + 50) << 7
    else:
        with np.errstate(over="ignore", invalid="ignore"):     # an F64 past fp32's range becomes inf: refused below
            if out is None:
                out = arr.astype(np.float32)
            else:
                out[...] = arr
        lo, hi = (float(out.min()), float(out.max())) if out.size else (0.0, 0.0)     # NaN propagates
        bad = not (np.isfinite(lo) and np.isfinite(hi))
        huge = not bad and max(hi, -lo) >= MAX_MAGNITUDE
    if bad:
        raise CheckpointError(f"tensor {name or '?'} holds NaN or infinite values; refused (a damaged checkpoint)")
    if huge:
        raise CheckpointError(f"tensor {name or '?'} holds values beyond {MAX_MAGNITUDE:.2g} in magnitude, absurd for "
                              f"trained weights; refused (a damaged checkpoint)")
    return out


class Checkpoint:
    """config.json + (sharded) safetensors of a Hugging Face model folder."""

    def __init__(self, model_dir):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: no such model folder")
        cfg = self.dir / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{self.dir}: no config.json (is this a Hugging Face model folder?)")
        self.config = _read_json(cfg)
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{cfg}: not a JSON object")
        gen = self.dir / "generation_config.json"
        self.generation_config = _read_json(gen) if gen.is_file() else {}
        if not isinstance(self.generation_config, dict):
            raise CheckpointError(f"{gen}: not a JSON object")
        self._where: dict[str, _SafetensorsFile] = {}
        self._buffers: dict = {}          # (see linear)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: corrupt index (no weight_map)")
            files = {}
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard or shard in (".", "..") or "\\" in shard:
                    raise CheckpointError(f"{index}: shard {shard[:80]!r} is not a plain file name in the model folder; refused")
                if not (self.dir / shard).exists():
                    raise CheckpointError(f"{self.dir}: shard {shard} named in the index is missing")
                files[shard] = _SafetensorsFile(self.dir / shard)
            for name, shard in weight_map.items():
                if name not in files[shard].tensors:
                    raise CheckpointError(f"{shard}: tensor {name} named in the index is missing")
                self._where[name] = files[shard]
        else:
            shards = sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{self.dir}: no *.safetensors weights (.bin/.pt checkpoints are not supported)")
            for p in shards:
                f = _SafetensorsFile(p)
                for name in f.tensors:
                    if name in self._where:     # which copy would win is arbitrary: refused, not guessed
                        raise CheckpointError(f"{self.dir}: tensor {name[:80]} is in both {self._where[name].path.name} "
                                              f"and {p.name}; refused (remove the stray shard)")
                    self._where[name] = f

    def __contains__(self, name: str) -> bool:
        return name in self._where

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].tensors[name]["shape"])

    def dtype(self, name: str) -> str:
        return self._where[name].tensors[name]["dtype"]

    def rows(self, name: str) -> "Rows":
        """A 2-D tensor that is widened to fp32 only slice by slice (embedding tables are the
        largest tensors: 151936 x 1536 is 0.9 GB in fp32)."""
        return Rows(self._file(name), name)

    def get(self, name: str) -> np.ndarray:
        """One tensor as a fresh float32 array (the only copy of it that export holds)."""
        arr, dtype = self._file(name).read(name)
        return to_float32(arr, dtype, name)

    def _file(self, name: str) -> _SafetensorsFile:
        if name not in self._where:
            raise CheckpointError(f"{self.dir.name}: tensor {name} is missing from the checkpoint")
        return self._where[name]

    def linear(self, *names: str) -> np.ndarray:
        """The named 2-D tensors' rows one after another (a fused projection: gate | up) as
        float32, in a buffer kept for the next call of the same shape: the caller is done with it
        (has quantized, copied or written it) before it asks again. A fresh array of a layer's size
        costs its page faults on every layer (on a gVisor sandbox more than the reading: 7 s of the
        1.5B shape's 23 s probe build went to joining gate and up); reused, once. `release()`
        gives the buffers back."""
        files = [self._file(n) for n in names]
        shapes = [self.shape(n) for n in names]
        if any(len(s) != 2 or s[1] != shapes[0][1] for s in shapes):
            raise CheckpointError(f"{self.dir.name}: {', '.join(names)} are not matrices of one width {shapes}")
        shape = (sum(s[0] for s in shapes), shapes[0][1])
        out = self._buffers.get(shape)
        if out is None:
            out = self._buffers[shape] = np.empty(shape, np.float32)
        raw = self._buffers.setdefault("raw", np.empty(0, np.uint8))
        at = 0
        for name, file, (rows, width) in zip(names, files, shapes):
            nbytes = rows * width * np.dtype(_DTYPES[self.dtype(name)]).itemsize
            if raw.nbytes < nbytes:
                raw = self._buffers["raw"] = np.empty(nbytes, np.uint8)
            arr, dtype = file.read(name, out=raw)
            to_float32(arr, dtype, name, out=out[at:at + rows])
            at += rows
        return out

    def release(self) -> None:
        """Free the buffers `linear` keeps."""
        self._buffers.clear()


class Rows:
    def __init__(self, file: _SafetensorsFile, name: str):
        self._file, self._name = file, name
        self.shape = tuple(file.tensors[name]["shape"])

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(self.shape[0])
        assert step == 1, "rows are read as one contiguous range"
        return to_float32(*self._file.read(self._name, start, stop), self._name)
