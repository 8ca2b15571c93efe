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

from .quantize import DEFAULT_RECIPE, Quantizer

IR_VERSION = 10          # onnxruntime 1.22 (Termux) refuses anything newer
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
_ALIGN = 4096            # page-aligned tensors can be memory-mapped by the runtime
_INLINE_BYTES = 1024


class Graph:
    def __init__(self, data_path: Path):
        self.data_path = Path(data_path)
        self._data = open(self.data_path, "wb")
        self._offset = 0
        # (variant, item): variant None belongs to every graph; an MoE export also writes one
        # graph per expert strategy ("qmoe", "plain") that share everything else, data included.
        self.nodes: list[tuple[str | None, onnx.NodeProto]] = []
        self.initializers: list[tuple[str | None, onnx.TensorProto]] = []
        self.variant: str | None = None      # what op()/const() add to while set (see `only`)
        self._where: dict[str, tuple[int, int]] = {}   # external initializer -> (offset, bytes)
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self.quantizer = Quantizer()         # the recipe's method (+ calibration statistics)

    def _unique(self, name: str) -> str:
        base, i = name, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer; anything but tiny tensors goes to the external data file now."""
        name = self._unique(name)
        array = np.asarray(array)
        if not array.flags.c_contiguous:     # (np.ascontiguousarray would turn a scalar into [1])
            array = array.copy()
        if array.nbytes <= _INLINE_BYTES:
            self.initializers.append((self.variant, numpy_helper.from_array(array, name)))
        else:
            pad = -self._offset % _ALIGN
            self._data.write(b"\0" * pad)
            self._offset += pad
            self._where[name] = (self._offset, array.nbytes)
            self.initializers.append((self.variant, self._external(name, array.dtype, array.shape, self._offset, array.nbytes)))
            self._data.write(array.tobytes())
            self._offset += array.nbytes
        return name

    def _external(self, name, dtype, shape, offset, nbytes) -> onnx.TensorProto:
        t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims=shape,
                             data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(nbytes))):
            t.external_data.add(key=k, value=v)
        return t

    def slice_of(self, stacked: str, array: np.ndarray, index: int, name: str, shape=None) -> str:
        """Initializer for stacked[index] (array is the stacked data, already written), in `shape`:
        the same bytes of the data file, so two graphs read one copy in different layouts."""
        name = self._unique(name)
        shape = shape or array.shape[1:]
        if stacked not in self._where:      # small enough to have been inlined: inline the slice too
            self.initializers.append((self.variant, numpy_helper.from_array(array[index].reshape(shape), name)))
            return name
        offset, _ = self._where[stacked]
        per = array[index].nbytes
        self.initializers.append((self.variant, self._external(name, array.dtype, shape, offset + index * per, per)))
        return name

    def only(self, variant: str | None):
        """Context manager: what is added inside belongs to one graph variant only."""
        graph = self

        class _Only:
            def __enter__(self):
                self.saved, graph.variant = graph.variant, variant

            def __exit__(self, *exc):
                graph.variant = self.saved
        return _Only()

    def op(self, op_type: str, inputs, name: str, outputs: int = 1, domain: str = "", out: str | None = None,
           outs: list | None = None, **attrs):
        """Add a node; returns its output name (or a list of names when outputs > 1). `out`/`outs`
        name outputs exactly: graph variants give their alternative of a block the same output."""
        outs = outs or ([out] if out else [self._unique(f"{name}/out{i}" if outputs > 1 else name) for i in range(outputs)])
        self.nodes.append((self.variant, helper.make_node(op_type, list(inputs), outs, name=self._unique("n:" + name),
                                                          domain=domain or None, **attrs)))
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

    def add_output(self, name: str) -> None:
        """Expose an existing float tensor as a graph output too (calibration probes)."""
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))

    def branch(self, build, name: str) -> onnx.GraphProto:
        """A subgraph (for If) holding the nodes and initializers `build()` adds. Weights must live
        in the subgraph that uses them: read from two scopes up, MatMulNBits is not prepacked
        and takes a slower, numerically different path."""
        saved_nodes, saved_inits = self.nodes, self.initializers
        self.nodes, self.initializers = [], []
        try:
            out = build()
            body, inits = [n for _, n in self.nodes], [t for _, t in self.initializers]
        finally:
            self.nodes, self.initializers = saved_nodes, saved_inits
        return helper.make_graph(body, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)

    @property
    def variants(self) -> list[str | None]:
        return sorted({v for v, _ in self.nodes if v is not None}) or [None]

    def save(self, path: Path, producer: str, variant: str | None = None) -> None:
        self._data.flush()
        keep = (None, variant)
        graph = helper.make_graph([n for v, n in self.nodes if v in keep], "decoder", self.inputs, self.outputs,
                                  [t for v, t in self.initializers if v in keep])
        model = helper.make_model(graph, opset_imports=OPSETS, producer_name=producer)
        model.ir_version = IR_VERSION
        onnx.save_model(model, str(path))   # weights are external already: this is small

    def close(self) -> None:
        self._data.close()


# ---- quantization recipe ------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """Which precision each class of tensor gets. 32 means fp32 (unquantized)."""
    bits: int = 4            # attention and MLP / expert projections
    block_size: int = 32
    embed_bits: int = 8      # embeddings and lm_head: small models punish int4 here
    method: str = DEFAULT_RECIPE   # how int4 codes are chosen (quantize.RECIPES)

    def bits_for(self, tensor_class: str) -> int:
        if tensor_class == "router":
            return 32        # routing decisions are fragile: keep them exact
        if tensor_class in ("embed", "lm_head"):
            return 32 if self.bits == 32 else self.embed_bits   # 4 on request (speed over quality)
        return self.bits


# ---- blocks ------------------------------------------------------------------------------

def linear(g: Graph, x: str, w: np.ndarray, name: str, bits: int, block_size: int,
           bias: np.ndarray | None = None) -> str:
    """y = x @ w.T + bias, w is [out, in]. int4/int8 run as MatMulNBits (accuracy_level 4:
    int8 activations, the fast path; level 0 is ~100x slower for int8 and fails on ORT 1.22)."""
    return apply_linear(g, x, *linear_operands(g, w, name, bits, block_size, bias), name)


def linear_operands(g: Graph, w, name: str, bits: int, block_size: int, bias=None) -> tuple:
    """Write w's initializers now; apply_linear() adds the node (possibly inside an If branch)."""
    n, k = w.shape
    if bits == 32:
        return ("MatMul", [g.const(f"{name}.weight_t", np.ascontiguousarray(w.T)),
                           g.const(f"{name}.bias", bias) if bias is not None else ""], {})
    q = g.quantizer(w, bits, block_size, name)
    ins = [g.const(f"{name}.qweight", q.packed), g.const(f"{name}.scales", q.scales.reshape(-1)),
           g.const(f"{name}.zero_points", q.zero_points.reshape(-1)) if q.zero_points is not None else ""]
    if bias is not None:
        ins += ["", g.const(f"{name}.bias", bias.astype(np.float32))]
    # a quantizer may give a sensitive tensor more precision than asked (mixed precision)
    return ("MatMulNBits", ins, dict(K=k, N=n, bits=q.bits, block_size=q.block_size, accuracy_level=4))


def apply_linear(g: Graph, x: str, op: str, operands: list, attrs: dict, name: str) -> str:
    if op == "MatMul":
        y = g.op("MatMul", [x, operands[0]], name)
        return g.op("Add", [y, operands[1]], name + ".bias") if operands[1] else y
    return g.ms("MatMulNBits", [x, *operands], name, **attrs)


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
    """silu(gate) * up; QuickGelu with alpha 1 is x * sigmoid(x) in one node."""
    return g.op("Mul", [g.ms("QuickGelu", [gate], name + ".silu", alpha=1.0), up], name)


def swiglu(g: Graph, x: str, gate_up: tuple, down: tuple, ffn: int, name: str) -> str:
    """down(silu(gate(x)) * up(x)) from prepared MatMulNBits/MatMul operands (see `linear_operands`)."""
    gu = apply_linear(g, x, *gate_up, name + ".gate_up")
    gate, up = g.op("Split", [gu, g.const(name + ".split", np.array([ffn, ffn], np.int64))], name + ".split",
                    outputs=2, axis=-1)
    return apply_linear(g, silu_mul(g, gate, up, name + ".act"), *down, name + ".down")


def rope_cache(g: Graph, inv_freq: np.ndarray, positions: int, attention_factor=1.0) -> tuple[str, str]:
    """cos/sin tables [positions, rotary_dim/2] for GroupQueryAttention's built-in rotary
    (attention_factor: yarn's scale, one number or one per frequency)."""
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


def quantized_rows(g: Graph, table, name: str, bits: int, block_size: int) -> tuple[str, str, str]:
    """An embedding table in MatMulNBits' B layout (so a tied lm_head reads the same bytes):
    (qweight [V, k_blocks, blob], scales [V, k_blocks], zero points [V, ceil(k_blocks/2)] or "")."""
    q = g.quantizer(table, bits, block_size, name)
    return (g.const(name + ".qweight", q.packed), g.const(name + ".scales", q.scales),
            g.const(name + ".zero_points", q.zero_points) if q.zero_points is not None else "")


def gather_quantized_rows(g: Graph, ids: str, qweight: str, scales: str, zero_points: str, bits: int, width: int,
                          padded: int, name: str) -> str:
    """Embedding lookup from a block-quantized table: only the looked-up rows are widened."""
    def codes(packed: str, label: str) -> str:
        """uint8 [..., n] -> float codes [..., n * 8 / bits] (int4: low nibble first)."""
        x = g.op("Cast", [packed], label + ".cast", to=TensorProto.FLOAT)
        if bits == 8:
            return x
        hi = g.op("Floor", [g.op("Div", [x, g.const(label + ".16", np.array(16, np.float32))], label + ".div")], label + ".hi")
        lo = g.op("Sub", [x, g.op("Mul", [hi, g.const(label + ".16b", np.array(16, np.float32))], label + ".hi16")], label + ".lo")
        axis = g.const(label + ".axis", np.array([-1], np.int64))
        pair = g.op("Concat", [g.op("Unsqueeze", [lo, axis], label + ".lo1"), g.op("Unsqueeze", [hi, axis], label + ".hi1")],
                    label + ".pair", axis=-1)
        flat = g.op("Shape", [x], label + ".shape")
        keep = g.op("Slice", [flat, g.const(label + ".k0", np.array([0], np.int64)), g.const(label + ".k1", np.array([-1], np.int64))],
                    label + ".lead")
        return g.op("Reshape", [pair, g.op("Concat", [keep, g.const(label + ".m1", np.array([-1], np.int64))], label + ".newshape",
                                             axis=0)], label + ".codes")

    rows = codes(g.op("Gather", [qweight, ids], name + ".rows"), name + ".w")            # [1, S, kb, block]
    last = g.const(name + ".last", np.array([-1], np.int64))
    if zero_points:
        zp = codes(g.op("Gather", [zero_points, ids], name + ".zp_rows"), name + ".zp")   # [1, S, >= kb]
        zp = g.op("Unsqueeze", [g.op("Slice", [zp, g.const(name + ".z0", np.array([0], np.int64)), g.op(
            "Shape", [scales], name + ".kb", start=1, end=2), last], name + ".zp_kb"), last], name + ".zp_b")
    else:
        zp = g.const(name + ".zero", np.array(1 << (bits - 1), np.float32))
    s = g.op("Unsqueeze", [g.op("Gather", [scales, ids], name + ".row_scales"), last], name + ".scales_b")
    x = g.op("Mul", [g.op("Sub", [rows, zp], name + ".center"), s], name + ".dequant")
    x = g.op("Reshape", [x, g.const(name + ".shape", np.array([0, 0, padded], np.int64))], name + ".flat")
    if padded != width:
        x = g.op("Slice", [x, g.const(name + ".s0", np.array([0], np.int64)), g.const(name + ".s1", np.array([width], np.int64)),
                           last], name + ".unpad")
    return x
