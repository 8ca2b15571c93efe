"""Where an ONNX file says its weights live: a minimal protobuf scan, no `onnx` package needed.

Every TensorProto reachable from the model (graph initializers, sparse initializers, tensors in
node attributes, subgraphs of If/Loop/Scan at any depth, functions, training info) is visited;
for each one stored outside the file (data_location EXTERNAL or any external_data entry) the
scan returns its `location`, `offset` and `length` as written. Fields are skipped by their
length prefix, so raw weights inside the file cost nothing. Malformed input raises ScanError.
"""
from __future__ import annotations

import mmap
from pathlib import Path

MAX_DEPTH = 32                 # nested subgraphs (edgert's MoE graphs use 2)

# message -> {field number: message kind it holds}; everything else is skipped
_MODEL = {7: "graph", 20: "training", 25: "function"}
_FIELDS = {
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "function": {7: "node"},
    "training": {1: "graph", 2: "graph"},
}


class ScanError(Exception):
    pass


def _varint(buf, i: int, end: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= end or shift > 63:
            raise ScanError("truncated or malformed varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or (begin, end) of a length-delimited field)."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i, end)
            yield number, wire, value
        elif wire == 2:
            n, i = _varint(buf, i, end)
            if i + n > end:
                raise ScanError("a field runs past the end of its message")
            yield number, wire, (i, i + n)
            i += n
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ScanError(f"unsupported wire type {wire}")
        if i > end:
            raise ScanError("a field runs past the end of its message")


def _tensor(buf, start: int, end: int) -> dict | None:
    entries, external = {}, False
    for number, wire, value in _fields(buf, start, end):
        if number == 14 and wire == 0:
            external = external or value == 1
        elif number == 13 and wire == 2:
            external = True
            kv = {}
            for n2, w2, v2 in _fields(buf, *value):
                if w2 == 2 and n2 in (1, 2):
                    kv[n2] = bytes(buf[v2[0]:v2[1]]).decode("utf-8", "replace")
            entries[kv.get(1, "")] = kv.get(2, "")
        elif number == 8 and wire == 2:
            entries.setdefault("\0name", bytes(buf[value[0]:value[1]]).decode("utf-8", "replace"))
    if not external:
        return None
    return entries


def _walk(buf, kind: str, start: int, end: int, depth: int, out: list) -> None:
    if depth > MAX_DEPTH:
        raise ScanError(f"subgraphs nested deeper than {MAX_DEPTH}")
    fields = _MODEL if kind == "model" else _FIELDS[kind]
    for number, wire, value in _fields(buf, start, end):
        sub = fields.get(number)
        if sub is None or wire != 2:
            continue
        if sub == "tensor":
            t = _tensor(buf, *value)
            if t is not None:
                out.append(t)
        else:
            _walk(buf, sub, *value, depth + 1, out)


def external_data(path) -> list[dict]:
    """[{"location", "offset", "length", "\\0name"...}] of every externally stored tensor in an ONNX file."""
    with open(Path(path), "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise ScanError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            out: list = []
            _walk(mm, "model", 0, size, 0, out)
            return out
