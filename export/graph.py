"""ONNX building blocks for decoder-only LLMs, on ONNX Runtime's CPU contrib ops.

`Graph` collects nodes and streams every large initializer straight into the external data
file as it is made, so the exporter holds one tensor at a time. The block functions below are
the vocabulary the architecture modules speak: linear (MatMulNBits), RMS norms, grouped-query
attention with rotary and a shared KV buffer, SwiGLU, quantized embeddings.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import onnx_proto as proto
from .onnx_proto import TensorProto, helper, numpy_helper
from .quantize import DEFAULT_RECIPE, TABLE_BLOCK, Pending, Quantized, Quantizer, _pack4, auto_block, quantize

IR_VERSION = 10          # onnxruntime 1.22 (Termux) refuses anything newer
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
_ALIGN = 4096            # page-aligned tensors can be memory-mapped by the runtime
_INLINE_BYTES = 1024


class Graph:
    def __init__(self, data_path: Path):
        self.data_path = Path(data_path)
        self._data = open(self.data_path, "wb")
        self._offset = 0
        # (tags, item): an item belongs to every graph whose tags include its own (untagged: all).
        # A MoE export writes one graph per expert strategy ("qmoe", "plain"); int8 weights also
        # get a graph that reads them as nibbles ("nibbles", see `nibble_matmul`). The graphs
        # share everything else, the data file included.
        self.nodes: list[tuple[frozenset, proto.NodeProto]] = []
        self.initializers: list[tuple[frozenset, proto.TensorProto]] = []
        self.tags: frozenset = frozenset()    # what op()/const() add to while set (see `only`)
        self._branch_depth = 0
        self._where: dict[str, tuple[int, int]] = {}   # external initializer -> (offset, bytes)
        self.inputs: list[proto.ValueInfoProto] = []     # (an input or output added under `only`
        self.outputs: list[proto.ValueInfoProto] = []    # belongs to those graphs only: _io_tags)
        self._io_tags: dict[int, frozenset] = {}     # id(value info) -> tags
        self._names: set[str] = set()
        self.int8_in_branches = False   # int8 MatMulNBits inside If bodies: no nibble twin
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
            self.initializers.append((self.tags, numpy_helper.from_array(array, name)))
        else:
            pad = -self._offset % _ALIGN
            self._data.write(b"\0" * pad)
            self._offset += pad
            self._where[name] = (self._offset, array.nbytes)
            self.initializers.append((self.tags, self._external(name, array.dtype, array.shape, self._offset, array.nbytes)))
            self._data.write(memoryview(array).cast("B"))     # (tobytes() would copy it first)
            self._offset += array.nbytes
        return name

    def reserve(self, name: str, dtype, shape) -> str:
        """An external initializer whose bytes come later (`fill`): its place in the data file now."""
        name = self._unique(name)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        pad = -self._offset % _ALIGN
        self._offset += pad
        self._where[name] = (self._offset, nbytes)
        self.initializers.append((self.tags, self._external(name, dtype, shape, self._offset, nbytes)))
        self._offset += nbytes
        self._data.seek(self._offset)       # a hole until filled
        return name

    def fill(self, name: str, array: np.ndarray) -> None:
        offset, nbytes = self._where[name]
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        assert data.nbytes == nbytes, (name, data.nbytes, nbytes)
        self._data.flush()
        done = 0
        while done < nbytes:
            done += os.pwrite(self._data.fileno(), data[done:], offset + done)

    def _external(self, name, dtype, shape, offset, nbytes) -> proto.TensorProto:
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims=shape,
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
            self.initializers.append((self.tags, numpy_helper.from_array(array[index].reshape(shape), name)))
            return name
        offset, _ = self._where[stacked]
        per = array[index].nbytes
        self.initializers.append((self.tags, self._external(name, array.dtype, shape, offset + index * per, per)))
        return name

    def only(self, tag: str):
        """Context manager: what is added inside belongs only to the graphs tagged `tag`."""
        graph = self

        class _Only:
            def __enter__(self):
                self.saved, graph.tags = graph.tags, graph.tags | {tag}

            def __exit__(self, *exc):
                graph.tags = self.saved
        return _Only()

    def op(self, op_type: str, inputs, name: str, outputs: int = 1, domain: str = "", out: str | None = None,
           outs: list | None = None, **attrs):
        """Add a node; returns its output name (or a list of names when outputs > 1). `out`/`outs`
        name outputs exactly: graph variants give their alternative of a block the same output."""
        outs = outs or ([out] if out else [self._unique(f"{name}/out{i}" if outputs > 1 else name) for i in range(outputs)])
        self.nodes.append((self.tags, helper.make_node(op_type, list(inputs), outs, name=self._unique("n:" + name),
                                                          domain=domain or None, **attrs)))
        return outs[0] if outputs == 1 else outs

    def ms(self, op_type: str, inputs, name: str, outputs: int = 1, **attrs):
        return self.op(op_type, inputs, name, outputs, domain="com.microsoft", **attrs)

    def input(self, name: str, dtype, shape) -> str:
        self._names.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        self._io_tags[id(self.inputs[-1])] = self.tags
        return name

    def output(self, src: str, name: str, dtype, shape) -> None:
        if src != name:
            self.op("Identity", [src], name)
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
        self._io_tags[id(self.outputs[-1])] = self.tags

    def add_output(self, name: str) -> None:
        """Expose an existing float tensor as a graph output too (calibration probes)."""
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))

    def branch(self, build, name: str, types=None) -> proto.GraphProto:
        """A subgraph (for If) holding the nodes and initializers `build()` adds. Weights must live
        in the subgraph that uses them: read from two scopes up, MatMulNBits is not prepacked
        and takes a slower, numerically different path. types: its outputs' element types (float)."""
        saved_nodes, saved_inits = self.nodes, self.initializers
        self.nodes, self.initializers = [], []
        self._branch_depth += 1
        try:
            out = build()
            body, inits = [n for _, n in self.nodes], [t for _, t in self.initializers]
        finally:
            self.nodes, self.initializers = saved_nodes, saved_inits
            self._branch_depth -= 1
        outs = [out] if isinstance(out, str) else out        # build() may give several outputs
        types = types or [TensorProto.FLOAT] * len(outs)
        return helper.make_graph(body, name, [], [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, types)], inits)

    def variants(self) -> dict[str, frozenset]:
        """The graphs to write: name -> the tags it holds."""
        used = {t for tags, _ in self.nodes for t in tags}
        experts = sorted(used & {"qmoe", "plain"}) or [None]
        # the int8 KV cache as GroupQueryAttention's own (onnxruntime >= 1.27) beside the standard-op
        # graph ("kv8gqa" / "kv8ops", see decoder.attend): a twin of each expert graph
        twin = "kv8gqa" in used
        ops = {"kv8ops"} if twin else set()     # what every other graph holds
        fused = "fused" in used                  # a hybrid model's recurrent blocks, built both ways (`either`)
        graphs = {}

        def add(name: str, tags: set) -> None:     # a graph, and its twin on GroupQueryAttention's int8 cache
            graphs[name] = frozenset(tags | ops)
            if twin:    # onnxruntime >= 1.27 has the 8-bit MatMulNBits kernel everywhere: the twin has no nibble one
                graphs["kv8gqa" if name == "default" else f"{name}+kv8gqa"] = frozenset(tags | {"kv8gqa"})
        for e in experts:
            base = ({e, "scan"} if fused else {e}) - {None}
            add(e or "default", base | {"int8"})
            # QMoE needs onnxruntime >= 1.23, whose ARM builds have the int8 kernel: no nibble twin
            if "nibbles" in used and e != "qmoe" and not self.int8_in_branches:
                graphs[f"{e}+nibbles" if e else "nibbles"] = frozenset(base | {"nibbles"} | ops)
        if fused:       # the contrib ops need onnxruntime >= 1.25, which has QMoE and the int8 kernel everywhere
            e = "qmoe" if "qmoe" in experts else experts[0]         # (plain: an unquantized MoE has no QMoE graph)
            add("qmoe+fused" if e == "qmoe" else "fused", ({e} - {None}) | {"fused", "int8"})
        return graphs

    def save(self, path: Path, producer: str, tags: frozenset = frozenset(), metadata: dict | None = None) -> None:
        self._data.flush()
        mine = lambda vi: self._io_tags.get(id(vi), frozenset()) <= tags
        graph = helper.make_graph([n for t, n in self.nodes if t <= tags], "decoder",
                                  [i for i in self.inputs if mine(i)], [o for o in self.outputs if mine(o)],
                                  [i for t, i in self.initializers if t <= tags])
        model = helper.make_model(graph, opset_imports=OPSETS, producer_name=producer)
        model.ir_version = IR_VERSION
        if metadata:
            helper.set_model_props(model, {k: str(v) for k, v in metadata.items()})
        proto.save_model(model, str(path))   # weights are external already: this is small

    def close(self) -> None:
        self._data.close()


# ---- quantization recipe ------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """Which precision each class of tensor gets. 32 means fp32 (unquantized)."""
    bits: int = 4            # attention and MLP / expert projections
    block_size: int = 0      # 0: each linear's own (quantize.auto_block), the tables see table_block
    embed_bits: int = 8      # embeddings and lm_head: small models punish int4 here
    method: str = DEFAULT_RECIPE   # how int4 codes are chosen (quantize.RECIPES)
    kv_cache: str = "int8"   # keys and values in the cache: int8 (+ a scale per row and head), fp16 or fp32

    def table_block(self, width: int) -> int:
        """The block of the embedding and lm_head tables, rows `width` wide: --block-size if given,
        else an int8 table's (the default) is an int4 linear's (`auto_block`: 128 where a row holds
        two), since a large vocabulary's lm_head is read every decode step as an int4 plane of it
        (`candidate_logits`): at 128 that plane is 15% fewer bytes than at 32 and its kernel does less
        per weight (Qwen2.5-0.5B decode 6-10% faster, benchmarks/ab_decode.py). An int4 table keeps
        TABLE_BLOCK: there the block is the lookup's precision itself."""
        if self.block_size:
            return self.block_size
        return auto_block(width) if self.embed_bits == 8 else TABLE_BLOCK

    def block_for(self, *widths: int) -> int:
        """The block of a linear (or of a layer's experts) with these input widths."""
        return self.block_size or auto_block(*widths, bits=self.bits)

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
    # deferred only when none of its tensors is small enough to be inlined (their bytes come later)
    q = g.quantizer(w, bits, block_size, name, defer_above=_INLINE_BYTES)
    if isinstance(q, Pending):        # GPTQ in the pool's processes: the bytes are written when they come
        ins = [g.reserve(f"{name}.{part}", dtype, shape) for part, dtype, shape in
               zip(("qweight", "scales", "zero_points"), (np.uint8, np.float32, np.uint8), q.shapes)]

        def write(r: Quantized) -> None:
            for tensor, array in zip(ins, (r.packed, r.scales, r.zero_points)):
                g.fill(tensor, array)
        q.done = write
    else:
        ins = [g.const(f"{name}.qweight", q.packed), g.const(f"{name}.scales", q.scales),
               g.const(f"{name}.zero_points", q.zero_points.reshape(-1)) if q.zero_points is not None else ""]
    if bias is not None:
        ins += ["", g.const(f"{name}.bias", bias.astype(np.float32))]
    # a quantizer may give a sensitive tensor more precision than asked (mixed precision)
    return ("MatMulNBits", ins, dict(K=k, N=n, bits=q.bits, block_size=q.block_size, accuracy_level=4))


def apply_linear(g: Graph, x: str, op: str, operands: list, attrs: dict, name: str) -> str:
    if op == "MatMul":
        y = g.op("MatMul", [x, operands[0]], name)
        return g.op("Add", [y, operands[1]], name + ".bias") if operands[1] else y
    if attrs["bits"] != 8:
        return g.ms("MatMulNBits", [x, *operands], name, **attrs)
    if g._branch_depth:                 # a twin inside If bodies would need twin bodies: not worth it
        g.int8_in_branches = True
        return g.ms("MatMulNBits", [x, *operands], name, **attrs)
    with g.only("int8"):
        y = g.ms("MatMulNBits", [x, *operands], name, **attrs)
    with g.only("nibbles"):
        nibble_matmul(g, x, operands, attrs, name, out=y)
    return y


def nibble_matmul(g: Graph, x: str, operands: list, attrs: dict, name: str, out: str) -> str:
    """int8 MatMulNBits computed by the int4 kernel, for onnxruntime builds without an 8-bit one
    (1.22 on ARM, as Termux ships it). The same bytes read as int4 hold each code q = lo + 16*hi
    in two nibbles of one byte, i.e. K' = 2K weights in blocks of 64 with the same scales. With
    the int4 kernel's default zero point 8:
        s*(q - 128) = s*(lo - 8) + 16*s*(hi - 8) + 8*s
    so y = A_lo @ W4 + 16 * (A_hi @ W4) + 8 * (block sums of x) @ scales.T, where A_lo / A_hi put
    x in the even / odd positions (zeros elsewhere) and run as one two-row batch: the weights
    are read once, and decode costs the same as the int8 kernel (12.3 vs 12.1 ms for a
    151936 x 896 lm_head on x86). Prefill of int8 layers is ~3x slower, hence a twin graph only."""
    qweight, scales, zero_points = operands[:3]
    assert not zero_points, "the nibble form needs symmetric int8 (zero point 128)"
    k, n, bs = attrs["K"], attrs["N"], attrs["block_size"]
    kb = -(-k // bs)
    padded = kb * bs
    if padded != k:
        x = g.op("Pad", [x, g.const(name + ".nib_pad", np.array([0, 0, 0, 0, 0, padded - k], np.int64))], name + ".nib_padded")
    last = g.const(name + ".nib_last", np.array([-1], np.int64))
    col = g.op("Unsqueeze", [x, last], name + ".nib_col")                               # [B, S, K, 1]
    zeros = g.op("Mul", [col, g.const(name + ".nib_zero", np.array(0, np.float32))], name + ".nib_zeros")
    lo = g.op("Concat", [col, zeros], name + ".nib_lo", axis=-1)                          # x at even positions
    hi = g.op("Concat", [zeros, col], name + ".nib_hi", axis=-1)                          # x at odd positions
    a = g.op("Reshape", [g.op("Concat", [lo, hi], name + ".nib_rows", axis=0),
                         g.const(name + ".nib_a", np.array([0, 0, 2 * padded], np.int64))], name + ".nib_a2")
    y2 = g.ms("MatMulNBits", [a, qweight, scales], name + ".nib_mm", K=2 * padded, N=n, bits=4,
              block_size=2 * bs, accuracy_level=attrs["accuracy_level"])
    y_lo, y_hi = g.op("Split", [y2], name + ".nib_halves", outputs=2, axis=0)         # equal halves: [B, ...] each
    sums = g.op("ReduceSum", [g.op("Reshape", [x, g.const(name + ".nib_blocks", np.array([0, 0, kb, bs], np.int64))],
                                   name + ".nib_xb"), last], name + ".nib_sums", keepdims=0)     # [B, S, kb]
    corr = g.op("Gemm", [g.op("Reshape", [sums, g.const(name + ".nib_2d", np.array([-1, kb], np.int64))], name + ".nib_s2"),
                         scales], name + ".nib_gemm", transB=1, alpha=8.0)                      # [B*S, N]
    corr = g.op("Reshape", [corr, g.op("Shape", [y_lo], name + ".nib_shape")], name + ".nib_corr")
    y = g.op("Add", [g.op("Add", [y_lo, g.op("Mul", [y_hi, g.const(name + ".nib_16", np.array(16, np.float32))],
                                                  name + ".nib_hi16")], name + ".nib_sum"), corr],
             name + ".nib_y")
    if len(operands) >= 5 and operands[4]:                                                 # bias
        y = g.op("Add", [y, operands[4]], name + ".nib_bias")
    return g.op("Identity", [y], name + ".nib_out", out=out)


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


def silu_mul(g: Graph, gate: str, up: str, name: str, act: str = "silu") -> str:
    """act(gate) * up. silu: QuickGelu with alpha 1 is x * sigmoid(x) in one node; gelu_tanh:
    FastGelu is GELU's tanh approximation (Gemma)."""
    if act == "gelu_tanh":
        return g.op("Mul", [g.ms("FastGelu", [gate], name + ".gelu"), up], name)
    return g.op("Mul", [g.ms("QuickGelu", [gate], name + ".silu", alpha=1.0), up], name)


def swiglu(g: Graph, x: str, gate_up: tuple, down: tuple, ffn: int, name: str, act: str = "silu") -> str:
    """down(act(gate(x)) * up(x)) from prepared MatMulNBits/MatMul operands (see `linear_operands`)."""
    gu = apply_linear(g, x, *gate_up, name + ".gate_up")
    gate, up = g.op("Split", [gu, g.const(name + ".split", np.array([ffn, ffn], np.int64))], name + ".split",
                    outputs=2, axis=-1)
    return apply_linear(g, silu_mul(g, gate, up, name + ".act", act), *down, name + ".down")


def rope_cache(g: Graph, inv_freq: np.ndarray, positions: int, attention_factor=1.0, dtype=np.float32) -> tuple[str, str]:
    """cos/sin tables [positions, rotary_dim/2] for GroupQueryAttention's built-in rotary
    (attention_factor: yarn's scale, one number or one per frequency), in the cache's dtype."""
    angles = np.arange(positions, dtype=np.float64)[:, None] * inv_freq[None, :].astype(np.float64)
    return (g.const("rope.cos", (np.cos(angles) * attention_factor).astype(dtype)),
            g.const("rope.sin", (np.sin(angles) * attention_factor).astype(dtype)))


# A forward that feeds at most this many tokens per row (a decode step, a speculative verify)
# folds each KV head's query heads into GroupQueryAttention's sequence (`gqa`, `Fold`).
FOLD_MAX = 16


@dataclass
class Fold:
    """What every folded attention layer of a forward shares (`fold_inputs`). Folded, the G query
    heads of a KV head become G x S query rows of one head, row p = i S + s being query head i of
    token s, so the kernel reads each cached key and value once per KV head instead of once per
    query head (its CPU kernel converts an fp16 cache to fp32 per head, too). The rows' keys are the
    S new ones followed by (G - 1) S zero rows, which the cache takes past the sequence's end
    (`headroom`, overwritten by the next step and never attended: the bias hides them), rotated at
    each row's own position (position_ids), masked per row (bias). Forwards of more tokens, of
    several rows (batched decode) or on an empty cache take the kernel's own per-head path (an If on cond)."""
    group: int           # G: query heads per KV head
    head_dim: int        # D (padded)
    cond: str            # bool scalar: this forward folds (one row of S <= FOLD_MAX tokens after a past)
    seqlens_k: str       # int32 [B]: as AttentionIO's, over the G x S rows
    total_len: str       # int32 scalar: the same, plus one (batch max)
    positions: str       # int64 [B, G x S]: row p's position (its token's)
    pads: str            # int64 [6]: Pad's pads that append the (G - 1) S zero rows to k and v
    keys: str            # int64 [T]: the key positions
    masks: dict          # window (0: none) -> the additive bias [B, 1, G x S, T], made on first use

    @staticmethod
    def headroom(group: int) -> int:
        """Cache rows past a sequence's end that a folded forward writes (zeros, never attended)."""
        return (group - 1) * FOLD_MAX


def fold_inputs(g: Graph, ids: str, seqlens_k: str, total_len: str, group: int, head_dim: int, name: str = "fold") -> Fold:
    """The tensors a forward's folded layers share, from its input_ids [B, S], computed once per
    forward with S capped at FOLD_MAX (a longer forward does not fold, and reads none of them).
    Only one row after a past folds: the CPU kernel takes several tokens after a past in a batch of
    one only, and on an empty cache (a first prompt) it rotates by its own positions, not position_ids."""
    i64, i32 = TensorProto.INT64, TensorProto.INT32
    c = lambda label, value: g.const(f"{name}.{label}", np.array(value, np.int64))       # noqa: E731
    seq = g.op("Shape", [ids], name + ".seq", start=1, end=2)                                               # [1]: S
    one_row = g.op("Equal", [g.op("Shape", [ids], name + ".batch", start=0, end=1), c("rows", [1])], name + ".one_row")
    lens64 = g.op("Cast", [seqlens_k], name + ".lens64", to=i64)
    after = g.op("GreaterOrEqual", [g.op("ReduceMin", [lens64], name + ".lens_min", keepdims=1), seq], name + ".after_past")
    cond = g.op("Squeeze", [g.op("And", [g.op("And", [g.op("LessOrEqual", [seq, c("max", [FOLD_MAX])], name + ".short"),
                                                      one_row], name + ".short_row"), after], name + ".all")], name + ".cond")
    s = g.op("Min", [seq, c("max1", [FOLD_MAX])], name + ".s")                                             # [1]
    extra = g.op("Mul", [s, c("g1", [group - 1])], name + ".extra")                                        # [1]: (G - 1) S
    extra32 = g.op("Cast", [extra], name + ".extra32", to=i32)
    total = g.op("Add", [total_len, g.op("Squeeze", [extra32], name + ".extra0")], name + ".total")
    lens = g.op("Add", [seqlens_k, extra32], name + ".seqlens")
    past = g.op("Sub", [g.op("Add", [lens64, c("one", 1)], name + ".rows"),
                        g.op("Squeeze", [seq], name + ".seq0")], name + ".past")                            # [B]
    tokens = g.op("Add", [g.op("Unsqueeze", [past, c("ax1", [1])], name + ".past_col"),
                          g.op("Range", [c("zero", 0), g.op("Squeeze", [s], name + ".s1"), c("step", 1)], name + ".steps")],
                  name + ".tokens")                                                                         # [B, S]
    positions = g.op("Tile", [tokens, c("reps", [1, group])], name + ".positions")                          # [B, G S]
    pads = g.op("Concat", [c("pads0", [0, 0, 0, 0]), extra, c("pads1", [0])], name + ".pads", axis=0)
    keys = g.op("Range", [c("zero_k", 0), g.op("Cast", [total], name + ".total64", to=i64), c("step_k", 1)], name + ".keys")
    return Fold(group, head_dim, cond, lens, total, positions, pads, keys, {})


def fold_mask(g: Graph, fold: Fold, window: int, half: bool) -> str:
    """The folded rows' additive bias [B, 1, G x S, T]: row p sees the keys up to its token's
    position (within `window` of it, when given), none of the zero rows; made once per forward."""
    key = (window, half)
    if key not in fold.masks:
        name = f"fold.mask{window}{'h' if half else ''}"
        c = lambda label, value: g.const(f"{name}.{label}", np.array(value, np.int64))   # noqa: E731
        pos = g.op("Unsqueeze", [fold.positions, c("ax2", [2])], name + ".pos")                            # [B, G S, 1]
        seen = g.op("LessOrEqual", [fold.keys, pos], name + ".seen")                                       # [B, G S, T]
        if window:
            seen = g.op("And", [seen, g.op("Greater", [fold.keys, g.op("Sub", [pos, c("w", window)], name + ".edge")],
                                           name + ".inside")], name + ".seen_w")
        dt = np.float16 if half else np.float32
        mask = g.op("Where", [seen, g.const(name + ".open", np.array(0, dt)), g.const(name + ".shut", np.array(-np.inf, dt))],
                    name + ".mask3")
        fold.masks[key] = g.op("Unsqueeze", [mask, c("ax1", [1])], name)
    return fold.masks[key]


@dataclass
class AttentionIO:
    """The graph inputs every attention layer shares."""
    seqlens_k: str       # int32 [B]: tokens in the cache after this step, minus one
    total_len: str       # int32 scalar: the same, plus one (batch max)
    cos: str
    sin: str
    half: bool = False   # fp16 KV cache: GroupQueryAttention runs in fp16 (its inputs cast), output cast back
    fold: Fold | None = None     # a forward's folded attention (`gqa`): fp16/fp32 caches

    @property
    def dtype(self):
        """What the rotary tables are stored as: the cache's precision."""
        return np.float16 if self.half else np.float32

    def with_rope(self, cos: str, sin: str) -> "AttentionIO":
        return AttentionIO(self.seqlens_k, self.total_len, cos, sin, self.half, self.fold)


KV_TYPES = {"fp32": (TensorProto.FLOAT, np.float32), "fp16": (TensorProto.FLOAT16, np.float16),
            "int8": (TensorProto.INT8, np.int8)}


def _gqa_types(io: AttentionIO) -> list:
    """GroupQueryAttention's output types (attended, present key, present value) on a float cache."""
    t = TensorProto.FLOAT16 if io.half else TensorProto.FLOAT
    return [t, t, t]


def _folded(g: Graph, q: str, k: str, v: str, io: AttentionIO, kv_heads: int, mask: str, rotary: bool,
            attention, name: str) -> list[str]:
    """One layer's folded attention (see `Fold`): q [B, S, H D] -> rows [B, G S, kv D] (row i S + s:
    query head i of each KV head, token s), k and v padded with (G - 1) S zero rows, the kernel with
    one query head per KV head, and the rows back to [B, S, H D]."""
    fold, grp, d = io.fold, io.fold.group, io.fold.head_dim
    c = lambda label, value: g.const(f"{name}.fold.{label}", np.array(value, np.int64))   # noqa: E731
    rows = g.op("Transpose", [g.op("Reshape", [q, c("heads", [0, 0, kv_heads, grp, d])], name + ".fold.q5")],
                name + ".fold.qt", perm=[0, 3, 1, 2, 4])                                              # [B, G, S, kv, D]
    rows = g.op("Reshape", [rows, c("rows", [0, -1, kv_heads * d])], name + ".fold.q")
    k, v = (g.op("Pad", [t, fold.pads], f"{name}.fold.{n}") for t, n in ((k, "k"), (v, "v")))
    out, pk, pv = attention(rows, k, v, fold.seqlens_k, fold.total_len, kv_heads, fold.positions if rotary else "", mask)
    out = g.op("Transpose", [g.op("Reshape", [out, c("out5", [0, grp, -1, kv_heads, d])], name + ".fold.o5")],
               name + ".fold.ot", perm=[0, 2, 3, 1, 4])                                               # [B, S, kv, G, D]
    return [g.op("Reshape", [out, c("out", [0, 0, kv_heads * grp * d])], name + ".fold.out"), pk, pv]


def gqa(g: Graph, q: str, k: str, v: str, past_k: str, past_v: str, io: AttentionIO, heads: int, kv_heads: int,
        scale: float, name: str, rotary: bool = True, bias: str = "", sink: str = "", scales: tuple | None = None,
        out: str | None = None, window: int = 0) -> tuple[str, str, str]:
    """GroupQueryAttention with rotary inside and the KV cache as one preallocated buffer that
    the runtime binds as both past and present (no copy of the cache per step).
    rotary=False: a layer without position encoding (SmolLM3's NoPE layers); bias: an additive
    attention mask [B, 1, S, T] (`window_bias`); sink: one logit per head [H] that joins every
    softmax and is dropped after it (gpt-oss; the head_sink input exists from onnxruntime 1.23).
    An fp16 cache makes the op fp16 (its T binds q, k, v, cache, rotary tables, bias and sinks
    alike): its float inputs are cast, its output cast back. scales: an int8 cache's (key, value)
    scales [1, kv_heads, 1, head_dim] (onnxruntime >= 1.27: the op quantizes the new rows as it
    writes them and reads the codes with those scales). out: the output's name. window: the sliding
    window that `bias` holds (the folded rows need their own). With io.fold (a float cache, several
    query heads per KV head, no sinks), a forward of at most FOLD_MAX tokens a row runs folded (`Fold`)."""
    if io.half:
        q, k, v, bias, sink = (g.op("Cast", [t], f"{name}.{label}16", to=TensorProto.FLOAT16) if t else t
                               for t, label in ((q, "q"), (k, "k"), (v, "v"), (bias, "bias"), (sink, "sink")))
    rope = (io.cos, io.sin) if rotary else ("", "")

    def attention(q, k, v, seqlens_k, total, heads, positions, bias, outs=None):
        ins = [q, k, v, past_k, past_v, seqlens_k, total, *rope, positions, bias, sink, *(scales or ())]
        while not ins[-1]:
            ins.pop()
        quant = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8) if scales else {}
        return g.ms("GroupQueryAttention", ins, name, outputs=3, num_heads=heads, kv_num_heads=kv_heads,
                    do_rotary=int(rotary), rotary_interleaved=0, scale=float(scale), outs=outs, **quant)

    names = [out, f"{name}.present_k", f"{name}.present_v"] if out and not io.half else None
    fold, group = io.fold, heads // kv_heads
    if fold is None or fold.group != group or sink or scales:   # sinks are per query head: not foldable
        attended, pk, pv = attention(q, k, v, io.seqlens_k, io.total_len, heads, "", bias, names)
    else:
        mask = fold_mask(g, fold, window, io.half)      # shared by the layers: made outside their If
        attended, pk, pv = g.op("If", [fold.cond], name + ".fold", outputs=3, outs=names,
                                then_branch=g.branch(lambda: _folded(g, q, k, v, io, kv_heads, mask, rotary, attention, name),
                                                     name + ".folded", _gqa_types(io)),
                                else_branch=g.branch(lambda: attention(q, k, v, io.seqlens_k, io.total_len, heads, "", bias),
                                                     name + ".per_head", _gqa_types(io)))
    if io.half:
        attended = g.op("Cast", [attended], name + ".out32", to=TensorProto.FLOAT, out=out)
    return attended, pk, pv


def int8_cache_index(g: Graph, q: str, io: AttentionIO, kv_heads: int, group: int, head_dim: int, name: str) -> dict:
    """What every layer of `int8_cache_attention` shares in one forward, made once per graph: the
    new tokens' positions [B, S] (row r's past length + s), T = the longest row's total, where each
    row's new keys and values go among the T cached ones (ScatterElements indices in the layouts of
    keys [B, kv, D, S], values [B, kv, S, D] and scales [B, kv, 1, S]), and the mask of what each
    query sees, [B, 1, S, 1, T] against the scores seen as [B, kv, S, G, T]: keys up to its own
    position, none of another row's. q: any layer's queries (for B and S)."""
    i64 = TensorProto.INT64
    c = lambda label, value: g.const(f"{name}.{label}", np.array(value, np.int64))
    seq = g.op("Shape", [q], name + ".seq", start=1, end=2)                                                  # [1]: S
    s0 = g.op("Squeeze", [seq], name + ".s0")
    total = g.op("Reshape", [g.op("Cast", [io.total_len], name + ".total64", to=i64), c("one_d", [1])], name + ".total")
    lengths = g.op("Sub", [g.op("Add", [g.op("Cast", [io.seqlens_k], name + ".lens64", to=i64), c("one", 1)],
                                name + ".row_total"), s0], name + ".lengths")                               # [B]: each row's past
    pos = g.op("Add", [g.op("Unsqueeze", [lengths, c("ax1", [1])], name + ".lcol"),
                       g.op("Range", [c("zero", 0), s0, c("step", 1)], name + ".steps")], name + ".positions")  # [B, S]
    batch = g.op("Shape", [q], name + ".batch", start=0, end=1)
    at = {"key": g.op("Expand", [g.op("Unsqueeze", [pos, c("ax12", [1, 2])], name + ".pos_k"),
                                 g.op("Concat", [batch, c("kvd", [kv_heads, head_dim]), seq], name + ".shape_k", axis=0)], name + ".at_key"),
          "value": g.op("Expand", [g.op("Unsqueeze", [pos, c("ax13", [1, 3])], name + ".pos_v"),
                                   g.op("Concat", [batch, g.const(name + ".kv", np.array([kv_heads], np.int64)), seq,
                                                   g.const(name + ".d", np.array([head_dim], np.int64))], name + ".shape_v", axis=0)],
                        name + ".at_value"),
          "scale": g.op("Expand", [g.op("Unsqueeze", [pos, c("ax12s", [1, 2])], name + ".pos_s"),
                                   g.op("Concat", [batch, c("kv1", [kv_heads, 1]), seq], name + ".shape_s", axis=0)], name + ".at_scale")}
    keys = g.op("Range", [c("zero0", 0), g.op("Squeeze", [total], name + ".t0"), c("step1", 1)], name + ".keys")  # [T]
    seen = g.op("LessOrEqual", [keys, g.op("Unsqueeze", [pos, c("ax2", [2])], name + ".pcol")], name + ".seen")  # [B, S, T]
    mask = g.op("Where", [seen, g.const(name + ".open", np.array(0, np.float32)), g.const(name + ".shut", np.array(-np.inf, np.float32))],
                name + ".mask3")
    mask = g.op("Unsqueeze", [mask, c("ax13m", [1, 3])], name + ".mask")                                   # [B, 1, S, 1, T]
    rows5 = g.op("Concat", [c("rows5", [0, 0, -1, group]), total], name + ".rows5", axis=0)                 # [B, kv, S, G, T]
    return {"seq": seq, "total": total, "positions": pos, "at": at, "mask": mask, "rows5": rows5,
            "rows4": g.op("Concat", [c("rows4", [0, 0, -1]), total], name + ".rows4", axis=0)}


def int8_cache_attention(g: Graph, q: str, k: str, v: str, past: tuple, io: AttentionIO, index: dict, heads: int,
                         kv_heads: int, head_dim: int, scale: float, name: str, presents: list[str],
                         rotary: bool = True, bias: str = "", sink: str = "", out_name: str | None = None,
                         scales: tuple | None = None) -> str:
    """Attention over an int8 KV cache, from standard ops and RotaryEmbedding (onnxruntime 1.22 has
    them all). Without `scales` each cached key and value row has one fp32 scale per head
    (|x| max / 127), so the cache costs 1 + 4 / head_dim bytes per element against fp16's 2. Keys are
    cached transposed, [B, kv_heads, head_dim, context], so the scores are one integer MatMul of the
    grouped queries, quantized per row, against the codes as stored, and the key scales multiply the
    scores (one per key) instead of the keys; the value scales likewise multiply the probabilities
    (with `scales`, see below, the queries and the output instead). The new rows are quantized in the graph
    and scattered into a copy of the cached rows 0..T-1 at each row's own positions, so that every
    query attends to its keys in position order, as stored, from column 0, with only masked
    columns after them: a row's result is the same bit for bit whether it runs alone or beside
    longer rows, and whether its past came in one feed or several. The new rows are also outputs
    (present.*, only the S new rows), which the runtime writes into its cache at the same places.
    sink: one logit per head [H] that joins every softmax as one more column, dropped after it
    (gpt-oss; the same as GroupQueryAttention's head_sink, with no onnxruntime 1.23 needed).
    past: (key codes, key scales [B, kv, 1, T], value codes [B, kv, T, D], value scales [B, kv, 1, T]).
    index: `int8_cache_index` (shared by the layers). presents: the names of the four new-row
    outputs (key codes [B, kv, D, S], key scales [B, kv, 1, S], value codes [B, kv, S, D], value
    scales). Returns the attention output [B, S, heads * head_dim].
    scales: calibrated per-channel (key, value) scales [1, kv, 1, D] (`decoder.kv_scales`, the same
    as GroupQueryAttention's): the cache is then codes only, 1 byte per element, past = (key codes,
    value codes) and presents their two new rows; the key scales fold into the queries before they
    are quantized and the value scales multiply the output, so no per-key scale is read at all."""
    f32 = TensorProto.FLOAT
    group, d = heads // kv_heads, head_dim
    c = lambda label, value: g.const(f"{name}.{label}", np.array(value, np.int64))
    if rotary:   # RotaryEmbedding at positions length + s, the tables GroupQueryAttention would use
        q = g.ms("RotaryEmbedding", [q, index["positions"], io.cos, io.sin], name + ".q_rot", interleaved=0, num_heads=heads)
        k = g.ms("RotaryEmbedding", [k, index["positions"], io.cos, io.sin], name + ".k_rot", interleaved=0, num_heads=kv_heads)
    # queries grouped by the kv head they share: [B, kv, S * group, D] (row s * G + j)
    q5 = g.op("Reshape", [q, c("q5", [0, 0, kv_heads, group, d])], name + ".q5")                            # [B, S, kv, G, D]
    qg = g.op("Reshape", [g.op("Transpose", [q5], name + ".qt", perm=[0, 2, 1, 3, 4]), c("q4", [0, 0, -1, d])],
              name + ".qg")
    qg = g.op("Mul", [qg, g.const(name + ".scale", np.array(scale, np.float32))], name + ".qs")

    # the new keys and values as stored, quantized together: [B, S, 2 * kv * D] -> codes [B, 2 * kv, S, D]
    # int8 and scales [B, 2 * kv, S, 1] (|x| max / 127 per row and head), then split into the presents
    x = g.op("Transpose", [g.op("Reshape", [g.op("Concat", [k, v], name + ".kv", axis=-1), c("kv4", [0, 0, 2 * kv_heads, d])],
                                name + ".kv4")], name + ".kvt", perm=[0, 2, 1, 3])
    q127, tiny = g.const(name + ".q127", np.array(127, np.float32)), g.const(name + ".tiny", np.array(1e-30, np.float32))

    def per_row(x: str, tag: str) -> tuple[str, str]:
        """(scale |x| max / 127 per row [..., 1], x / scale rounded): a row's int8 codes before their Cast."""
        sc = g.op("Div", [g.op("ReduceMax", [g.op("Abs", [x], f"{name}.{tag}abs")], f"{name}.{tag}max", axes=[-1],
                                keepdims=1), q127], f"{name}.{tag}scale0")
        sc = g.op("Max", [sc, tiny], f"{name}.{tag}scale")
        return sc, g.op("Round", [g.op("Div", [x, sc], f"{name}.{tag}div")], f"{name}.{tag}round")

    if scales:   # codes = x / its channel's scale, rounded and saturated: [B, 2 * kv, S, D]
        both = g.op("Concat", list(scales), name + ".kv_channel_scales", axis=1)                          # [1, 2kv, 1, D]
        rounded = g.op("Clip", [g.op("Round", [g.op("Div", [x, both], name + ".kvdiv")], name + ".kvround"),
                                g.const(name + ".lo", np.array(-127, np.float32)), q127], name + ".kvclip")
    else:
        sc, rounded = per_row(x, "kv")
    codes = g.op("Cast", [rounded], name + ".kvcodes", to=TensorProto.INT8)
    vpresent = presents[1] if scales else presents[2]
    kc, vc = g.op("Split", [codes], name + ".codes_split", outputs=2, axis=1, outs=[name + ".kcodes", vpresent])
    kc = g.op("Transpose", [kc], name + ".k_present", perm=[0, 1, 3, 2], out=presents[0])                   # [B, kv, D, S]
    new_rows, kinds = [kc, vc], [("k", "key", 3), ("v", "value", 2)]
    if not scales:
        ks, vs = g.op("Split", [g.op("Reshape", [sc, c("row_scales", [0, 0, 1, -1])], name + ".kv_scales")],
                      name + ".scales_split", outputs=2, axis=1, outs=[presents[1], presents[3]])
        new_rows, kinds = [kc, ks, vc, vs], [("k", "key", 3), ("ks", "scale", 3), ("v", "value", 2), ("vs", "scale", 3)]
    # the cached rows 0..T-1 with each row's new ones written at its own positions
    zero, total, at = c("zero_d", [0]), index["total"], index["at"]
    rows = [g.op("ScatterElements", [g.op("Slice", [buf, zero, total, c(f"ax{axis}", [axis])], f"{name}.{label}_past"),
                                     at[kind], new], f"{name}.{label}_all", axis=axis)
            for buf, new, (label, kind, axis) in zip(past, new_rows, kinds)]
    if scales:   # q . k = (q * key scale) . key codes, channel by channel
        (keys, values), key_scales, value_scales = rows, None, None
        qg = g.op("Mul", [qg, scales[0]], name + ".q_keyscaled")
    else:
        keys, key_scales, values, value_scales = rows
    # the scores from the key codes as stored: each query row quantized to uint8 around 128 (|q| max / 127 per
    # row, as llama.cpp's q8_0 query against a q8_0 cache), one integer MatMul (exact: |sum| < 2^24), then the
    # query's and the key's scales. 2.5x faster than widening the keys to fp32 for a fp32 MatMul (4k keys:
    # 110 against 270 us per layer and kv pair on onnxruntime 1.22 and 1.32), and no fp32 copy of the keys.
    q_sc, q_rounded = per_row(qg, "q")                                                                     # [B, kv, S*G, 1]
    q_codes = g.op("Cast", [g.op("Add", [q_rounded, g.const(name + ".q128", np.array(128, np.float32))], name + ".qshift")],
                   name + ".qcodes", to=TensorProto.UINT8)
    dot = g.op("MatMulInteger", [q_codes, keys, g.const(name + ".zp128", np.array(128, np.uint8))], name + ".qk_int")
    scores = g.op("Mul", [g.op("Cast", [dot], name + ".qk", to=f32), q_sc], name + ".qk_q")
    if key_scales:
        scores = g.op("Mul", [scores, key_scales], name + ".qk_scaled")                                     # [B, kv, S*G, T]
    scores = g.op("Add", [g.op("Reshape", [scores, index["rows5"]], name + ".qk5"), index["mask"]], name + ".masked")
    if bias:     # [B, 1, S, T] -> [B, 1, S, 1, T] (once for all layers)
        if bias not in index:
            index[bias] = g.op("Unsqueeze", [bias, g.const(f"{bias}.kv8_axis", np.array([3], np.int64))], f"{bias}.kv8")
        scores = g.op("Add", [scores, index[bias]], name + ".biased")                                    # [B, kv, S, G, T]
    if sink:     # head h = kv * G + j's logit, first in each row: [1, kv, 1, G, 1] -> [B, kv, S, G, 1]
        if "sink_shape" not in index:
            index["sink_shape"] = g.op("Concat", [g.op("Shape", [q], "kv8_sink.batch", start=0, end=1),
                                                  g.const("kv8_sink.kv", np.array([kv_heads], np.int64)), index["seq"],
                                                  g.const("kv8_sink.group", np.array([group, 1], np.int64))],
                                       "kv8_sink.shape", axis=0)
        grid = g.op("Reshape", [sink, c("sink5", [1, kv_heads, 1, group, 1])], name + ".sink5")
        scores = g.op("Concat", [g.op("Expand", [grid, index["sink_shape"]], name + ".sink_col"), scores],
                      name + ".with_sink", axis=-1)
    probs = g.op("Softmax", [scores], name + ".probs", axis=-1)
    if sink:
        probs = g.op("Slice", [probs, c("one_col", [1]), c("end", [2**62]), c("ax4p", [4])], name + ".no_sink")
    probs = g.op("Reshape", [probs, index["rows4"]], name + ".probs4")
    if value_scales:
        probs = g.op("Mul", [probs, value_scales], name + ".pv_scaled")
    out = g.op("MatMul", [probs, g.op("Cast", [values], name + ".vf", to=f32)], name + ".pv")              # [B, kv, S*G, D]
    if scales:
        out = g.op("Mul", [out, scales[1]], name + ".pv_valscaled")
    out = g.op("Transpose", [g.op("Reshape", [out, c("o5", [0, 0, -1, group, d])], name + ".o5")], name + ".ot",
               perm=[0, 2, 1, 3, 4])                                                                         # [B, S, kv, G, D]
    return g.op("Reshape", [out, c("o3", [0, 0, heads * d])], name + ".out", out=out_name)


def window_bias(g: Graph, q: str, io: AttentionIO, window: int, name: str) -> str:
    """A sliding window as GroupQueryAttention's attention_bias [B, 1, S, T]: 0 where key t is one
    of the `window` latest positions up to query s (itself included, transformers' sliding_window),
    -inf before, per row from its own length (rows of a batch differ). (The kernel's own
    local_window_size keeps window+1 keys on onnxruntime 1.22 and window keys on 1.32; the mask
    means the same on both. The QK product spans all T keys either way.)"""
    i64 = TensorProto.INT64
    total = g.op("Cast", [io.total_len], name + ".total", to=i64)
    rows = g.op("Add", [g.op("Cast", [io.seqlens_k], name + ".lens", to=i64),
                        g.const(name + ".one1", np.array(1, np.int64))], name + ".row_total")                   # [B]
    seq = g.op("Squeeze", [g.op("Shape", [q], name + ".s", start=1, end=2)], name + ".seq")
    one, zero = g.const(name + ".one", np.array(1, np.int64)), g.const(name + ".zero", np.array(0, np.int64))
    col = g.const(name + ".col", np.array([1], np.int64))
    first = g.op("Unsqueeze", [g.op("Sub", [rows, seq], name + ".first"), col], name + ".first_col")         # [B, 1]
    queries = g.op("Add", [first, g.op("Range", [zero, seq, one], name + ".steps")], name + ".queries")      # [B, S]
    keys = g.op("Range", [zero, total, one], name + ".keys")                                                  # [T]
    oldest = g.op("Unsqueeze", [g.op("Sub", [queries, g.const(name + ".w", np.array(window, np.int64))], name + ".edge"),
                                g.const(name + ".ax", np.array([2], np.int64))], name + ".edge_col")         # [B, S, 1]
    inside = g.op("Greater", [keys, oldest], name + ".inside")                                               # [B, S, T]
    mask = g.op("Where", [inside, g.const(name + ".open", np.array(0, np.float32)),
                          g.const(name + ".shut", np.array(-np.inf, np.float32))], name + ".mask")
    return g.op("Unsqueeze", [mask, col], name)                                                               # [B, 1, S, T]


def quantized_rows(g: Graph, table, name: str, bits: int, block_size: int, planes: bool = False) -> tuple:
    """An embedding table in MatMulNBits' B layout (so a tied lm_head reads the same bytes):
    (qweight [V, k_blocks, blob], scales [V, k_blocks], zero points [V, ceil(k_blocks/2)] or "").
    planes (int8 only): the codes are stored as two int4 planes, (hi, scales, "", lo), with
    code = 16 * hi + lo - 8 and |code - 128| <= 119 (see `split_int8`): the hi plane alone is a
    round-to-nearest int4 reading of the table, half the bytes (`lm_head_candidates`)."""
    if planes:
        return split_int8(g, table, name, block_size)
    q = g.quantizer(table, bits, block_size, name)
    return (g.const(name + ".qweight", q.packed), g.const(name + ".scales", q.scales),
            g.const(name + ".zero_points", q.zero_points) if q.zero_points is not None else "")


PLANE_RANGE = 119        # int8 codes within 128 +- 119: round(code / 16) then fits a 4-bit hi nibble
_PLANE_CHUNK = 4096      # rows per step: bounds the fp32 temporaries


def split_int8(g: Graph, table, name: str, block_size: int) -> tuple[str, str, str, str]:
    """Symmetric int8 rows (max |w| of a block -> 119, not 127: 0.09 bit) stored as two int4
    planes, hi = round(code / 16) and the remainder lo: the same bytes as plain int8."""
    if hasattr(table, "planes"):    # a shape-only weight of a synthetic model (export/synthetic.py): random codes
        hi, scales, lo = table.planes(block_size)
    else:
        hi, scales, lo = _split_rows(table, block_size)
    return (g.const(name + ".qweight_hi", hi), g.const(name + ".scales", scales), "", g.const(name + ".qweight_lo", lo))


def _split_rows(table, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, k = table.shape
    kb = -(-k // block_size)
    hi = np.empty((n, kb, block_size // 2), np.uint8)
    lo = np.empty_like(hi)
    scales = np.empty((n, kb), np.float32)
    for r in range(0, n, _PLANE_CHUNK):
        blk = np.zeros((min(_PLANE_CHUNK, n - r), kb * block_size), np.float32)
        blk[:, :k] = table[r : r + blk.shape[0]]
        blk = blk.reshape(blk.shape[0], kb, block_size)
        s = np.abs(blk).max(-1) / PLANE_RANGE
        u = np.rint(blk / np.where(s == 0, 1, s)[..., None]).astype(np.int16) + 136   # code + 8, in [17, 255]
        hi[r : r + len(u)], lo[r : r + len(u)] = plane_nibbles(u)
        scales[r : r + len(u)] = s
    return hi, scales, lo


def plane_nibbles(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """code + 8 in [17, 255], [..., block] -> packed (hi, lo) int4 planes: code = 16 hi + lo - 8."""
    return _pack4(u >> 4), _pack4(u & 15)


def gather_quantized_rows(g: Graph, ids: str, qweight: str, scales: str, zero_points: str, bits: int, width: int,
                          padded: int, name: str, lo_plane: str = "") -> str:
    """Embedding lookup from a block-quantized table: only the looked-up rows are widened.
    lo_plane: the table is int8 split in two int4 planes (`split_int8`); qweight is the hi plane."""
    def codes(packed: str, label: str, nibbles: bool = bits == 4) -> str:
        """uint8 [..., n] -> float codes [..., n * 2] of int4 nibbles (low first), or [..., n] bytes."""
        x = g.op("Cast", [packed], label + ".cast", to=TensorProto.FLOAT)
        if not nibbles:
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

    if lo_plane:        # code = 16 hi + lo - 8, centred on 128
        hi, lo = (codes(g.op("Gather", [plane, ids], f"{name}.{part}_rows"), f"{name}.{part}", True)
                  for plane, part in ((qweight, "hi"), (lo_plane, "lo")))
        rows = g.op("Add", [g.op("Mul", [hi, g.const(name + ".x16", np.array(16, np.float32))], name + ".hi16"), lo],
                    name + ".plane_codes")
        zp = g.const(name + ".zero", np.array(136, np.float32))
        return _dequant_rows(g, rows, zp, scales, ids, width, padded, name)
    rows = codes(g.op("Gather", [qweight, ids], name + ".rows"), name + ".w")            # [1, S, kb, block]
    last = g.const(name + ".last", np.array([-1], np.int64))
    if zero_points:
        zp = codes(g.op("Gather", [zero_points, ids], name + ".zp_rows"), name + ".zp")   # [1, S, >= kb]
        zp = g.op("Unsqueeze", [g.op("Slice", [zp, g.const(name + ".z0", np.array([0], np.int64)), g.op(
            "Shape", [scales], name + ".kb", start=1, end=2), last], name + ".zp_kb"), last], name + ".zp_b")
    else:
        zp = g.const(name + ".zero", np.array(1 << (bits - 1), np.float32))
    return _dequant_rows(g, rows, zp, scales, ids, width, padded, name)


def _dequant_rows(g: Graph, rows: str, zp: str, scales: str, ids: str, width: int, padded: int, name: str) -> str:
    """(codes [1, S, kb, block] - zp) * scale of each looked-up row's blocks, as [1, S, width]."""
    last = g.const(name + ".last_axis", np.array([-1], np.int64))
    s = g.op("Unsqueeze", [g.op("Gather", [scales, ids], name + ".row_scales"), last], name + ".scales_b")
    x = g.op("Mul", [g.op("Sub", [rows, zp], name + ".center"), s], name + ".dequant")
    x = g.op("Reshape", [x, g.const(name + ".shape", np.array([0, 0, padded], np.int64))], name + ".flat")
    if padded != width:
        x = g.op("Slice", [x, g.const(name + ".s0", np.array([0], np.int64)), g.const(name + ".s1", np.array([width], np.int64)),
                           last], name + ".unpad")
    return x


def candidate_logits(g: Graph, h: str, table: tuple, vocab: int, hidden: int, block_size: int, candidates: int,
                     name: str) -> str:
    """lm_head over a `split_int8` table: all logits from the hi plane alone (MatMulNBits int4 over half
    of int8's bytes, error within half a 16-code step), then the `candidates` best of each position
    recomputed from both planes, i.e. at int8. Greedy picks and the head of the sampled
    distribution are int8's; decode reads 0.625 instead of 1.125 bytes per lm_head weight."""
    hi, scales, _, lo = table
    coarse = g.ms("MatMulNBits", [h, hi, scales], name + ".coarse", K=hidden, N=vocab, bits=4, block_size=block_size,
                  accuracy_level=4)    # no zero points: int4's default 8 centres hi, as 16 * (hi - 8) ~ code - 128
    coarse = g.op("Mul", [coarse, g.const(name + ".x16", np.array(16, np.float32))], name + ".coarse16")
    k = g.const(name + ".k", np.array([min(candidates, vocab)], np.int64))
    _, best = g.op("TopK", [coarse, k], name + ".best", outputs=2, axis=-1)                          # [1, n, k]
    flat = g.op("Reshape", [best, g.const(name + ".flat", np.array([1, -1], np.int64))], name + ".ids")
    padded = -(-hidden // block_size) * block_size
    rows = gather_quantized_rows(g, flat, hi, scales, "", 8, hidden, padded, name + ".rows", lo_plane=lo)  # [1, n k, hidden]
    rows = g.op("Reshape", [rows, g.op("Concat", [g.op("Shape", [best], name + ".best_shape"),
                                                   g.const(name + ".hidden", np.array([hidden], np.int64))],
                                        name + ".rows_shape", axis=0)], name + ".rows4")             # [1, n, k, hidden]
    last = g.const(name + ".last", np.array([-1], np.int64))
    exact = g.op("Squeeze", [g.op("MatMul", [rows, g.op("Unsqueeze", [h, last], name + ".h_col")], name + ".exact_col"), last],
                 name + ".exact")
    return g.op("ScatterElements", [coarse, best, exact], name, axis=-1)


# ---- recurrent blocks (hybrid models), standard ops only: any onnxruntime ----------------------

def causal_conv(g: Graph, x: str, state: str, weight: np.ndarray, bias: np.ndarray | None, name: str) -> tuple[str, str]:
    """Depthwise causal conv1d over the sequence, continuing from `state` (the previous K-1 inputs):
    x [B, S, C], state [B, K-1, C], weight [C, K] -> (y [B, S, C], new state [B, K-1, C]).
    Concat + one Mul/Add per tap + Slice: y[t] = sum_j w[:, j] * padded[t + j]."""
    k = weight.shape[1]
    axis = g.const(name + ".axis", np.array([1], np.int64))
    padded = g.op("Concat", [state, x], name + ".padded", axis=1)                       # [B, K-1+S, C]
    y = None
    for j in range(k):
        tap = g.op("Slice", [padded, g.const(f"{name}.s{j}", np.array([j], np.int64)),
                             g.const(f"{name}.e{j}", np.array([j - (k - 1) if j < k - 1 else 2**62], np.int64)), axis],
                   f"{name}.tap{j}")
        term = g.op("Mul", [tap, g.const(f"{name}.w{j}", np.ascontiguousarray(weight[:, j], np.float32))], f"{name}.term{j}")
        y = term if y is None else g.op("Add", [y, term], f"{name}.acc{j}")
    if bias is not None:
        y = g.op("Add", [y, g.const(name + ".bias", bias.astype(np.float32))], name + ".biased")
    new_state = g.op("Slice", [padded, g.const(name + ".last", np.array([-(k - 1)], np.int64)),
                               g.const(name + ".end", np.array([2**62], np.int64)), axis], name + ".state")
    return y, new_state


def l2_normalize(g: Graph, x: str, width: int, eps: float, name: str, scale: float = 1.0) -> str:
    """scale * x / sqrt(sum(x^2) + eps) over the last axis, `width` wide (the FLA l2norm Gated DeltaNet
    uses), as one RMSNorm node: x / sqrt(sum + eps) = x / sqrt(mean + eps / width) / sqrt(width), so
    the weight is scale / sqrt(width) and the epsilon eps / width (one node, not five and a Mul)."""
    return rms_norm(g, x, np.full(width, scale / np.sqrt(width), np.float32), eps / width, name)


DELTA_CHUNK = 64         # tokens per chunk of the chunked delta rule (prefill)


def gated_delta_rule(g: Graph, q: str, k: str, v: str, log_decay: str, beta: str, state: str, heads: int, dk: int,
                     dv: int, name: str) -> tuple[str, str]:
    """The gated delta rule over a feed: q, k [B, S, H, dk] (L2-normalised, q scaled), v [B, S, H, dv],
    log_decay = g <= 0 and beta [B, S, H], state [B, H, dk, dv]. Per token, per head:
        S <- exp(g) S;  S <- S + k (beta (v - k S))^T;  o = q S
    Returns (o [B, S, H, dv], the final state). One token (decode) steps it directly; longer feeds
    (prefill) take the chunked form. An If on the sequence length picks; both are standard ops."""
    seq = g.op("Gather", [g.op("Shape", [q], name + ".shape"), g.const(name + ".axis1", np.array(1, np.int64))], name + ".seq")
    one = g.op("Equal", [seq, g.const(name + ".one", np.array(1, np.int64))], name + ".is_step")
    decay = g.op("Exp", [log_decay], name + ".decay")
    step = g.branch(lambda: list(delta_rule_step(g, q, k, v, decay, beta, state, heads, dk, dv, name + ".step")),
                    name + ".step_branch")
    chunked = g.branch(lambda: list(delta_rule_chunked(g, q, k, v, log_decay, beta, state, heads, dk, dv, name + ".chunk")),
                       name + ".chunk_branch")
    out, final = g.op("If", [one], name + ".if", outputs=2, then_branch=step, else_branch=chunked)
    return out, final


def delta_rule_chunked(g: Graph, q: str, k: str, v: str, log_decay: str, beta: str, state: str, heads: int, dk: int,
                       dv: int, name: str, chunk: int = DELTA_CHUNK) -> tuple[str, str]:
    """The chunked gated delta rule (the form of the FLA kernels and of transformers' torch reference):
    the sequence is zero-padded to whole chunks of C tokens (padding has no key, so it leaves the
    state alone), everything within a chunk is computed for all chunks at once with [C, C] matrices,
    and a Scan over chunks carries the state. The unit lower-triangular solve is the product
    (I - A)(I + A^2)(I + A^4)... of the nilpotent strictly-lower A (log2 C matrix products)."""
    c = chunk
    i64 = lambda label, vals: g.const(f"{name}.{label}", np.array(vals, np.int64))          # noqa: E731
    # pad S to a multiple of C: pad = (C - S % C) % C
    seq = g.op("Gather", [g.op("Shape", [q], name + ".shape"), i64("ax1", 1)], name + ".seq")
    cc = i64("c", c)
    pad = g.op("Mod", [g.op("Sub", [cc, g.op("Mod", [seq, cc], name + ".rem")], name + ".short"), cc], name + ".pad")
    pad1 = g.op("Unsqueeze", [pad, i64("ax0", [0])], name + ".pad1")

    def padded(x, rank, label):            # zeros after the sequence (axis 1) of a rank-`rank` tensor
        zeros = i64(label + ".z", [0] * rank)
        pads = g.op("Concat", [zeros, i64(label + ".z1", [0]), pad1, i64(label + ".z2", [0] * (rank - 2))],
                    f"{name}.{label}.pads", axis=0)
        return g.op("Pad", [x, pads], f"{name}.{label}.padded")

    def chunks(x, tail, label):            # [B, S', H, ...] -> [B, N, H, C, ...]
        r = g.op("Reshape", [x, i64(label + ".rs", [0, -1, c, heads, *tail])], f"{name}.{label}.rs")
        perm = [0, 1, 3, 2] + ([4] if tail else [])
        return g.op("Transpose", [r], f"{name}.{label}.chunks", perm=perm)

    qc, kc = chunks(padded(q, 4, "q"), [dk], "q"), chunks(padded(k, 4, "k"), [dk], "k")
    vc = chunks(padded(v, 4, "v"), [dv], "v")
    gc, bc = chunks(padded(log_decay, 3, "g"), [], "g"), chunks(padded(beta, 3, "b"), [], "b")       # [B, N, H, C]
    last = i64("last", [-1])
    col = lambda x, label: g.op("Unsqueeze", [x, last], f"{name}.{label}.col")                     # noqa: E731
    cum = g.op("CumSum", [gc, g.const(name + ".cum_axis", np.array(3, np.int64))], name + ".cum")    # [B, N, H, C]
    diff = g.op("Sub", [col(cum, "cum_i"), g.op("Unsqueeze", [cum, i64("ax_m2", [-2])], name + ".cum_j")], name + ".diff")
    lower = np.tril(np.ones((c, c), bool))
    decay_ij = g.op("Exp", [g.op("Where", [g.const(name + ".lower", lower), diff, g.const(name + ".neg", np.array(-1e30, np.float32))],
                                 name + ".diff_masked")], name + ".decay_ij")                         # [.., C, C], 0 above
    strict = g.op("Mul", [decay_ij, g.const(name + ".strict", np.tril(np.ones((c, c), np.float32), -1))], name + ".decay_strict")
    kt = g.op("Transpose", [kc], name + ".kt", perm=[0, 1, 2, 4, 3])
    k_beta = g.op("Mul", [kc, col(bc, "beta")], name + ".k_beta")
    v_beta = g.op("Mul", [vc, col(bc, "beta2")], name + ".v_beta")
    minus_a = g.op("Neg", [g.op("Mul", [g.op("MatMul", [k_beta, kt], name + ".kbk"), strict], name + ".a")], name + ".minus_a")
    eye = g.const(name + ".eye", np.eye(c, dtype=np.float32))
    inv, power = g.op("Add", [eye, minus_a], name + ".inv0"), minus_a
    for j in range(1, int(np.log2(c))):
        power = g.op("MatMul", [power, power], f"{name}.pow{j}")
        inv = g.op("MatMul", [inv, g.op("Add", [eye, power], f"{name}.fac{j}")], f"{name}.inv{j}")
    exp_cum = g.op("Exp", [cum], name + ".exp_cum")
    new_values = g.op("MatMul", [inv, v_beta], name + ".new_values")                                # [B, N, H, C, dv]
    k_cumdecay = g.op("MatMul", [inv, g.op("Mul", [k_beta, col(exp_cum, "ec")], name + ".kb_decayed")], name + ".k_cumdecay")
    intra = g.op("Mul", [g.op("MatMul", [qc, kt], name + ".qk"), decay_ij], name + ".intra")       # [B, N, H, C, C]
    q_dec = g.op("Mul", [qc, col(exp_cum, "ec2")], name + ".q_decayed")
    cum_last = g.op("Slice", [cum, last, i64("end", [2**62]), i64("ax3", [3])], name + ".cum_last")   # [B, N, H, 1]
    k_dec = g.op("Mul", [kc, col(g.op("Exp", [g.op("Sub", [cum_last, cum], name + ".to_end")], name + ".exp_to_end"), "ete")],
                 name + ".k_decayed")
    chunk_decay = col(g.op("Exp", [cum_last], name + ".chunk_decay1"), "cd")                          # [B, N, H, 1, 1]

    n = name.replace(".", "_")
    s0, nv, kcd, qd, it, kd, cd = (f"{n}_{x}" for x in ("s0", "nv", "kcd", "qd", "it", "kd", "cd"))
    node = helper.make_node
    body = [node("MatMul", [kcd, s0], [f"{n}_kcd_s"]),
            node("Sub", [nv, f"{n}_kcd_s"], [f"{n}_vnew"]),                                         # [B, H, C, dv]
            node("MatMul", [qd, s0], [f"{n}_inter"]),
            node("MatMul", [it, f"{n}_vnew"], [f"{n}_local"]),
            node("Add", [f"{n}_inter", f"{n}_local"], [f"{n}_o"]),
            node("Mul", [s0, cd], [f"{n}_s_dec"]),
            node("Transpose", [kd], [f"{n}_kd_t"], perm=[0, 1, 3, 2]),
            node("MatMul", [f"{n}_kd_t", f"{n}_vnew"], [f"{n}_upd"]),
            node("Add", [f"{n}_s_dec", f"{n}_upd"], [f"{n}_s1"])]
    f = TensorProto.FLOAT
    graph = helper.make_graph(body, name + ".chunk_step", [helper.make_tensor_value_info(x, f, None) for x in
                                                           (s0, nv, kcd, qd, it, kd, cd)],
                              [helper.make_tensor_value_info(f"{n}_s1", f, None), helper.make_tensor_value_info(f"{n}_o", f, None)])
    final, out = g.op("Scan", [state, new_values, k_cumdecay, q_dec, intra, k_dec, chunk_decay], name + ".scan", outputs=2,
                      body=graph, num_scan_inputs=6, scan_input_axes=[1] * 6, scan_output_axes=[1])   # out [B, N, H, C, dv]
    out = g.op("Transpose", [out], name + ".out_t", perm=[0, 1, 3, 2, 4])                              # [B, N, C, H, dv]
    out = g.op("Reshape", [out, i64("out_rs", [0, -1, heads, dv])], name + ".out_seq")
    out = g.op("Slice", [out, i64("s0", [0]), g.op("Unsqueeze", [seq, i64("ax0b", [0])], name + ".seq1"), i64("ax1b", [1])],
               name + ".out")
    return out, final


def delta_rule_step(g: Graph, q: str, k: str, v: str, decay: str, beta: str, state: str, heads: int, dk: int, dv: int,
                    name: str) -> tuple[str, str]:
    """One token of the gated delta rule (decode), straight ops on [B, H, ., .] views: no loop."""
    def view(x, dims, label):       # [B, 1, H, ...] -> [B, H, *dims] (the same order of elements)
        return g.op("Reshape", [x, g.const(f"{name}.{label}_shape", np.array([0, heads, *dims], np.int64))], f"{name}.{label}")
    q_row, k_row, k_col = view(q, [1, dk], "q_row"), view(k, [1, dk], "k_row"), view(k, [dk, 1], "k_col")
    v_row, d, b = view(v, [1, dv], "v_row"), view(decay, [1, 1], "decay"), view(beta, [1, 1], "beta")
    s1 = g.op("Mul", [state, d], name + ".decayed")                                              # [B, H, dk, dv]
    delta = g.op("Mul", [g.op("Sub", [v_row, g.op("MatMul", [k_row, s1], name + ".mem")], name + ".err"), b], name + ".delta")
    s2 = g.op("Add", [s1, g.op("MatMul", [k_col, delta], name + ".outer")], name + ".state")
    o = g.op("MatMul", [q_row, s2], name + ".o")                                                 # [B, H, 1, dv]
    return g.op("Reshape", [o, g.const(name + ".o_shape", np.array([0, 1, heads, dv], np.int64))], name + ".out"), s2


# ---- the same recurrent blocks as onnxruntime contrib ops (>= 1.25), in graphs of their own ---------
# An artifact of a hybrid model holds both graph kinds over one data file: the standard-op graph
# (tag "scan"; any onnxruntime) and the fused one (tag "fused"), chosen at load (edgert/model.py).

FUSED_SINCE = "1.25"     # first onnxruntime with CPU CausalConvWithState and LinearAttention


def either(g: Graph, name: str, standard, fused) -> list[str]:
    """A block built twice, from standard ops in the "scan" graphs and from contrib ops in the "fused"
    ones, each pinned to the same output names (Identity, which onnxruntime folds away)."""
    outs = []
    for tag, build in (("scan", standard), ("fused", fused)):
        with g.only(tag):
            got = build()
            outs = [g.op("Identity", [t], f"{name}.{tag}{j}", out=f"{name}.out{j}") for j, t in enumerate(got)]
    return outs


def causal_conv_fused(g: Graph, x: str, state: str, weight: np.ndarray, bias: np.ndarray | None, name: str,
                      activation: str = "none") -> tuple[str, str]:
    """`causal_conv` as one CausalConvWithState, which works channel-first: x [B, S, C] in and y
    [B, S, C] out as there, but the state is held channel-first, [B, C, K-1] in and out (the fused
    graphs declare it so: `Decoder.conv_state`), so that a step transposes only its own feed.
    weight [C, 1, K]; activation "silu" folds a following SiLU in."""
    c, k = weight.shape
    ins = [g.op("Transpose", [x], name + ".x_cf", perm=[0, 2, 1]),
           g.const(name + ".w", np.ascontiguousarray(weight.reshape(c, 1, k), np.float32)),
           g.const(name + ".b", bias.astype(np.float32)) if bias is not None else "", state]
    y, new_state = g.ms("CausalConvWithState", ins, name + ".op", outputs=2, ndim=1, activation=activation)
    return g.op("Transpose", [y], name + ".y", perm=[0, 2, 1]), new_state


def gated_delta_rule_fused(g: Graph, q: str, k: str, v: str, log_decay: str, beta: str, state: str, heads: int,
                           dk: int, dv: int, name: str) -> tuple[str, str]:
    """`gated_delta_rule` (same arguments and results) as one LinearAttention, update_rule gated_delta,
    which takes heads packed in the last axis and the log-space decay; q comes scaled (scale 1)."""
    def packed(t, d, label):
        return g.op("Reshape", [t, g.const(f"{name}.{label}_packed", np.array([0, 0, heads * d], np.int64))], f"{name}.{label}3")
    out, final = g.ms("LinearAttention", [packed(q, dk, "q"), packed(k, dk, "k"), packed(v, dv, "v"), state, log_decay, beta],
                      name + ".op", outputs=2, q_num_heads=heads, kv_num_heads=heads, update_rule="gated_delta", scale=1.0)
    return g.op("Reshape", [out, g.const(name + ".heads", np.array([0, 0, heads, dv], np.int64))], name + ".out4"), final
