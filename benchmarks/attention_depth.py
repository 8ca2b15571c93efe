"""One decode step of one attention layer at depth, several ways, on this onnxruntime (issue 11):
what GroupQueryAttention costs against the K/V bytes it reads, and what graphs of standard ops
reading the same cache cost.

    python benchmarks/attention_depth.py [--positions 512,4096] [--heads 14 --kv-heads 2 --head-dim 64] [--only VARIANTS]

Variants (one query token, the cache bound once as an OrtValue, as the runtime binds it):
  gqa-fp16 / gqa-fp32   GroupQueryAttention on the cache in place (what artifacts run today)
  kq-fp32               Slice the past from the full-context buffer, MatMul(K, q^T) (K read in
                        place, the small q packed), Softmax over positions, MatMul(P^T, V)
  kq-fp16               the same on an fp16 cache: Slice + Cast to fp32 first
  gqa32-fp16/-int8      GroupQueryAttention computing in fp32 over an fp16 cache, or an int8 cache
                        with per-channel scales (onnxruntime >= 1.23's T_CACHE; gqa32-int8 is the
                        int8 default's kv8gqa graph)
  fold-fp16 / fold-fp32 GroupQueryAttention with each KV head's query heads folded into its sequence
                        (export/graph.py Fold: what float caches run at decode since 2026-12-05): one
                        query head per KV head over heads/kv rows, the padding rows masked by a bias
  fold-int8             the same on the int8 cache with per-channel scales (the int8 default does not
                        fold: this measures what it would gain)
--only a,b times just those variants.
Prints the median ms per layer over interleaved rounds and the bytes of K/V each reads.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper


def gqa_graph(heads, kv, hd, ctx, elem, cache_elem=None, fold=False):
    """cache_elem: the cache's type when it differs from the compute type (fp16 or int8 with
    per-channel scales: onnxruntime >= 1.23's T_CACHE). fold: heads / kv rows of one head each."""
    cache_elem = cache_elem or elem
    rows = heads // kv if fold else 1
    q_heads = kv if fold else heads
    ins = [helper.make_tensor_value_info("q", elem, [1, rows, q_heads * hd]),
           helper.make_tensor_value_info("k", elem, [1, rows, kv * hd]),
           helper.make_tensor_value_info("v", elem, [1, rows, kv * hd]),
           helper.make_tensor_value_info("past_k", cache_elem, [1, kv, ctx, hd]),
           helper.make_tensor_value_info("past_v", cache_elem, [1, kv, ctx, hd]),
           helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
           helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    outs = [helper.make_tensor_value_info("out", elem, [1, rows, q_heads * hd]),
            helper.make_tensor_value_info("present_k", cache_elem, [1, kv, ctx, hd]),
            helper.make_tensor_value_info("present_v", cache_elem, [1, kv, ctx, hd])]
    names = ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total"]
    attrs, inits = {}, []
    if fold:
        ins.append(helper.make_tensor_value_info("bias", elem, [1, 1, rows, "T"]))
        names += ["", "", "", "bias"]
    if cache_elem == TensorProto.INT8:
        names += [""] * (12 - len(names)) + ["k_scale", "v_scale"]     # after head_sink (index 11)
        inits = [helper.make_tensor(n, TensorProto.FLOAT, [1, kv, 1, hd], [0.02] * (kv * hd)) for n in ("k_scale", "v_scale")]
        attrs = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
    node = helper.make_node("GroupQueryAttention", names, ["out", "present_k", "present_v"], domain="com.microsoft",
                            num_heads=q_heads, kv_num_heads=kv, scale=hd ** -0.5, **attrs)
    return helper.make_model(helper.make_graph([node], "gqa", ins, outs, inits),
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def kq_graph(heads, kv, hd, ctx, elem):
    """Scores as K @ q^T: K [kv, T, hd] is MatMul's A (read in place), the grouped queries its B."""
    g = heads // kv
    c = lambda name, arr: helper.make_tensor(name, TensorProto.INT64, [len(arr)], arr)
    nodes = [
        helper.make_node("Reshape", ["q", "qshape"], ["qg"]),                       # [1, kv, g, hd]
        helper.make_node("Transpose", ["qg"], ["qt"], perm=[0, 1, 3, 2]),           # [1, kv, hd, g]
        helper.make_node("Unsqueeze", ["past_len", "zero"], ["end1"]),
        helper.make_node("Slice", ["past_k", "start", "end1", "axis2"], ["ks"]),
        helper.make_node("Slice", ["past_v", "start", "end1", "axis2"], ["vs"]),
    ]
    k, v = "ks", "vs"
    if elem == TensorProto.FLOAT16:
        nodes += [helper.make_node("Cast", ["ks"], ["kf"], to=TensorProto.FLOAT),
                  helper.make_node("Cast", ["vs"], ["vf"], to=TensorProto.FLOAT)]
        k, v = "kf", "vf"
    nodes += [
        helper.make_node("MatMul", [k, "qt"], ["s"]),                               # [1, kv, T, g]
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Softmax", ["ss"], ["p"], axis=2),
        helper.make_node("Transpose", ["p"], ["pt"], perm=[0, 1, 3, 2]),           # [1, kv, g, T]
        helper.make_node("MatMul", ["pt", v], ["o"]),                               # [1, kv, g, hd]
        helper.make_node("Reshape", ["o", "oshape"], ["out"]),
    ]
    inits = [c("qshape", [1, kv, g, hd]), c("oshape", [1, 1, heads * hd]), c("start", [0]), c("axis2", [2]),
             c("zero", [0]), helper.make_tensor("scale", TensorProto.FLOAT, [], [hd ** -0.5])]
    ins = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 1, heads * hd]),
           helper.make_tensor_value_info("past_k", elem, [1, kv, ctx, hd]),
           helper.make_tensor_value_info("past_v", elem, [1, kv, ctx, hd]),
           helper.make_tensor_value_info("past_len", TensorProto.INT64, [])]
    outs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, heads * hd])]
    return helper.make_model(helper.make_graph(nodes, "kq", ins, outs, inits),
                             opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def session(model, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # every variant's session stays alive through the interleaved rounds: idle pools must not spin
    # (with spinning on, the others' threads took the cores from the one being timed)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


CACHE = {"fp16": (np.float16, TensorProto.FLOAT16), "fp32": (np.float32, TensorProto.FLOAT),
         "int8": (np.int8, TensorProto.INT8)}


def runner(kind, heads, kv, hd, ctx, pos, threads):
    cache_dtype, cache_elem = CACHE[kind.split("-")[-1]]
    mixed = kind.startswith("gqa32")             # fp32 compute over a narrower cache
    dtype = np.float32 if mixed or cache_dtype != np.float16 else np.float16      # int8 computes in fp32
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    rng = np.random.default_rng(0)
    cache = [(rng.standard_normal((1, kv, ctx, hd)) * (20 if cache_dtype == np.int8 else 1)).astype(cache_dtype)
             for _ in range(2)]
    views = [ort.OrtValue.ortvalue_from_numpy(c) for c in cache]
    if kind.startswith(("gqa", "fold")):
        fold = kind.startswith("fold")
        rows = heads // kv if fold else 1
        sess = session(gqa_graph(heads, kv, hd, ctx, elem, cache_elem, fold), threads)
        io = sess.io_binding()
        io.bind_cpu_input("q", rng.standard_normal((1, rows, (kv if fold else heads) * hd)).astype(dtype))
        io.bind_cpu_input("k", rng.standard_normal((1, rows, kv * hd)).astype(dtype))
        io.bind_cpu_input("v", rng.standard_normal((1, rows, kv * hd)).astype(dtype))
        if fold:        # row i sees the cache and the first new key, not the padding keys after it
            bias = np.zeros((1, 1, rows, pos + rows), dtype)
            bias[..., pos + 1:] = -np.inf
            io.bind_cpu_input("bias", bias)
        io.bind_ortvalue_input("past_k", views[0])
        io.bind_ortvalue_input("past_v", views[1])
        io.bind_ortvalue_output("present_k", views[0])
        io.bind_ortvalue_output("present_v", views[1])
        io.bind_cpu_input("seqlens_k", np.array([pos + rows - 1], np.int32))
        io.bind_cpu_input("total", np.array(pos + rows, np.int32))
    else:
        sess = session(kq_graph(heads, kv, hd, ctx, elem), threads)
        io = sess.io_binding()
        io.bind_cpu_input("q", rng.standard_normal((1, 1, heads * hd)).astype(np.float32))
        io.bind_ortvalue_input("past_k", views[0])
        io.bind_ortvalue_input("past_v", views[1])
        io.bind_cpu_input("past_len", np.array(pos + 1, np.int64))
    io.bind_output("out")

    def step():
        sess.run_with_iobinding(io)
    step()
    return step, views


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", default="512,4096")
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=0, help="the cache buffer's length [default: the position + 1]")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--only", default="", help="comma-separated variants to time [default: all]")
    args = ap.parse_args()
    kinds = ["gqa-fp16", "gqa-fp32", "gqa32-fp16", "gqa32-int8", "fold-fp16", "fold-fp32", "fold-int8", "kq-fp16", "kq-fp32"]
    if args.only:
        kinds = [k for k in kinds if k in args.only.split(",")]
    print(f"onnxruntime {ort.__version__}, {args.heads} heads / {args.kv_heads} KV heads x {args.head_dim}, "
          f"{args.threads} threads; ms per layer per decode step (median of {args.rounds} rounds)")
    for pos in map(int, args.positions.split(",")):
        ctx = max(args.context, pos + args.heads // args.kv_heads)      # the folded rows' padding too
        runs = {k: runner(k, args.heads, args.kv_heads, args.head_dim, ctx, pos, args.threads) for k in kinds}
        times = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for k in kinds:
                step = runs[k][0]
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    step()
                times[k].append((time.perf_counter() - t0) / args.calls * 1e3)
        kv_bytes = {k: 2 * args.kv_heads * (pos + 1) * args.head_dim * np.dtype(CACHE[k.split("-")[-1]][0]).itemsize
                    for k in kinds}
        for k in kinds:
            ms = statistics.median(times[k])
            print(f"  {pos:>6} positions  {k:<9} {ms:7.3f} ms   K/V {kv_bytes[k] / 1e6:5.2f} MB  "
                  f"{kv_bytes[k] / ms / 1e6:6.1f} GB/s effective")


if __name__ == "__main__":
    main()
