"""ONNX building blocks for decoder-only LLMs, on ONNX Runtime's CPU contrib ops.

`Graph` collects nodes and streams every large initializer straight into the external data
file as it is made, so the exporter holds one tensor at a time. The block functions below are
the vocabulary the architecture modules speak: linear (MatMulNBits), RMS norms, grouped-query
attention with rotary and a shared KV buffer, SwiGLU, quantized embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .quantize import quantize

IR_VERSION = 10          # onnxruntime 1.22 (Termux) refuses anything newer
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
_ALIGN = 4096            # page-aligned tensors can be memory-mapped by the runtime
_INLINE_BYTES = 1024


class Graph:
    def __init__(self, data_path: Path):
        self.data_path = Path(data_path)
        self._data = open(self.data_path, "wb")
        self._offset = 0
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self.weight_bytes = 0          # bytes of weights written (for bits/weight)
        self.weight_params = 0

    def _unique(self, name: str) -> str:
        base, i = name, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def const(self, name: str, array: np.ndarray, params: int = 0) -> str:
        """An initializer; anything but tiny tensors goes to the external data file now."""
        name = self._unique(name)
        array = np.ascontiguousarray(array)
        if array.nbytes <= _INLINE_BYTES:
            self.initializers.append(numpy_helper.from_array(array, name))
        else:
            pad = -self._offset % _ALIGN
            self._data.write(b"\0" * pad)
            self._offset += pad
            t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                 dims=array.shape, data_location=TensorProto.EXTERNAL)
            for k, v in (("location", self.data_path.name), ("offset", str(self._offset)), ("length", str(array.nbytes))):
                t.external_data.add(key=k, value=v)
            self._data.write(array.tobytes())
            self._offset += array.nbytes
            self.initializers.append(t)
        if params:
            self.weight_bytes += array.nbytes
            self.weight_params += params
        return name

    def op(self, op_type: str, inputs, name: str, outputs: int = 1, domain: str = "", **attrs):
        """Add a node; returns its output name (or a list of names when outputs > 1)."""
        outs = [self._unique(f"{name}/out{i}" if outputs > 1 else name) for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._unique("n:" + name),
                                           domain=domain or None, **attrs))
        return outs[0] if outputs == 1 else outs

    def ms(self, op_type: str, inputs, name: str, outputs: int = 1, **attrs):
        return self.op(op_type, inputs, name, outputs, domain="com.microsoft", **attrs)

    def input(self, name: str, dtype, shape) -> str:
        self._names.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, src: str, name: str, dtype, shape) -> None:
        if src != name:
            self.op("Identity", [src], name)
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))

    def save(self, path: Path, producer: str) -> None:
        self._data.close()
        graph = helper.make_graph(self.nodes, "decoder", self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=OPSETS, producer_name=producer)
        model.ir_version = IR_VERSION
        onnx.save_model(model, str(path))   # weights are external already: this is small

    def abort(self) -> None:
        self._data.close()


# ---- quantization recipe ------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """Which precision each class of tensor gets. 32 means fp32 (unquantized)."""
    bits: int = 4            # attention and MLP / expert projections
    block_size: int = 32
    embed_bits: int = 8      # embeddings and lm_head: small models punish int4 here

    def bits_for(self, tensor_class: str) -> int:
        if tensor_class == "router":
            return 32        # routing decisions are fragile: keep them exact
        if tensor_class in ("embed", "lm_head"):
            return 32 if self.bits == 32 else self.embed_bits
        return self.bits


# ---- blocks ------------------------------------------------------------------------------

def linear(g: Graph, x: str, w: np.ndarray, name: str, bits: int, block_size: int,
           bias: np.ndarray | None = None) -> str:
    """y = x @ w.T + bias, w is [out, in]. int4/int8 run as MatMulNBits (accuracy_level 4:
    int8 activations, the fast path; level 0 is ~100x slower for int8 and fails on ORT 1.22)."""
    n, k = w.shape
    if bits == 32:
        y = g.op("MatMul", [x, g.const(f"{name}.weight_t", w.T, params=w.size)], name)
        return g.op("Add", [y, g.const(f"{name}.bias", bias)], name + ".bias") if bias is not None else y
    q = quantize(w, bits, block_size)
    ins = [x, g.const(f"{name}.qweight", q.packed, params=n * k), g.const(f"{name}.scales", q.scales.reshape(-1)),
           g.const(f"{name}.zero_points", q.zero_points.reshape(-1)) if q.zero_points is not None else ""]
    if bias is not None:
        ins += ["", g.const(f"{name}.bias", bias.astype(np.float32))]
    return g.ms("MatMulNBits", ins, name, K=k, N=n, bits=bits, block_size=block_size, accuracy_level=4)


def rms_norm(g: Graph, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    return g.op("SimplifiedLayerNormalization", [x, g.const(name + ".weight", weight)], name,
                axis=-1, epsilon=float(eps), stash_type=1)


def add_rms_norm(g: Graph, x: str, residual: str, weight: np.ndarray, eps: float, name: str) -> tuple[str, str]:
    """(rms_norm(x + residual), x + residual) in one fused node."""
    normed, _, _, total = g.ms("SkipSimplifiedLayerNormalization", [x, residual, g.const(name + ".weight", weight)],
                               name, outputs=4, epsilon=float(eps))
    return normed, total


def head_rms_norm(g: Graph, x: str, weight: np.ndarray, eps: float, head_dim: int, name: str) -> str:
    """RMSNorm over each head_dim slice of x [B, S, H*hd] (Qwen3's q_norm / k_norm)."""
    shape4 = g.const(name + ".shape4", np.array([0, 0, -1, head_dim], np.int64))
    shape3 = g.const(name + ".shape3", np.array([0, 0, -1], np.int64))
    y = g.op("Reshape", [x, shape4], name + ".split_heads")
    y = rms_norm(g, y, weight, eps, name)
    return g.op("Reshape", [y, shape3], name + ".merge_heads")


def silu_mul(g: Graph, gate: str, up: str, name: str) -> str:
    return g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], name + ".sigmoid")], name + ".silu"), up], name)


def rope_cache(g: Graph, inv_freq: np.ndarray, positions: int, attention_factor: float = 1.0) -> tuple[str, str]:
    """cos/sin tables [positions, rotary_dim/2] for GroupQueryAttention's built-in rotary."""
    angles = np.arange(positions, dtype=np.float64)[:, None] * inv_freq[None, :].astype(np.float64)
    return (g.const("rope.cos", (np.cos(angles) * attention_factor).astype(np.float32)),
            g.const("rope.sin", (np.sin(angles) * attention_factor).astype(np.float32)))


@dataclass
class AttentionIO:
    """The graph inputs every attention layer shares."""
    seqlens_k: str       # int32 [B]: tokens in the cache after this step, minus one
    total_len: str       # int32 scalar: the same, plus one (batch max)
    cos: str
    sin: str


def gqa(g: Graph, q: str, k: str, v: str, past_k: str, past_v: str, io: AttentionIO, heads: int, kv_heads: int,
        scale: float, name: str) -> tuple[str, str, str]:
    """GroupQueryAttention with rotary inside and the KV cache as one preallocated buffer that
    the runtime binds as both past and present (no copy of the cache per step)."""
    return g.ms("GroupQueryAttention", [q, k, v, past_k, past_v, io.seqlens_k, io.total_len, io.cos, io.sin],
                name, outputs=3, num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
                scale=float(scale))


def quantized_rows(g: Graph, table: np.ndarray, name: str, block_size: int) -> tuple[str, str]:
    """int8 rows in MatMulNBits' B layout (so lm_head can reuse them) + their scales."""
    q = quantize(table, 8, block_size)
    return g.const(name + ".qweight", q.packed, params=int(np.prod(table.shape))), g.const(name + ".scales", q.scales)


def gather_int8_rows(g: Graph, ids: str, qweight: str, scales: str, width: int, padded: int, name: str) -> str:
    """Embedding lookup from an int8 block-quantized table: only the looked-up rows are widened."""
    rows = g.op("Cast", [g.op("Gather", [qweight, ids], name + ".rows")], name + ".cast", to=TensorProto.FLOAT)
    rows = g.op("Sub", [rows, g.const(name + ".zero", np.array(128, np.float32))], name + ".center")
    s = g.op("Unsqueeze", [g.op("Gather", [scales, ids], name + ".row_scales"),
                           g.const(name + ".axis", np.array([-1], np.int64))], name + ".scales_b")
    x = g.op("Reshape", [g.op("Mul", [rows, s], name + ".dequant"),
                         g.const(name + ".shape", np.array([0, 0, padded], np.int64))], name + ".flat")
    if padded != width:
        x = g.op("Slice", [x, g.const(name + ".s0", np.array([0], np.int64)), g.const(name + ".s1", np.array([width], np.int64)),
                           g.const(name + ".s2", np.array([-1], np.int64))], name + ".unpad")
    return x
