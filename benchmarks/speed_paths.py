"""Where dense int4 time goes, and the lm_head read as int4 + int8 candidates, side by side.

    python benchmarks/speed_paths.py kernels [--batch 4] # MatMulNBits layouts vs int8 GEMM on Qwen2.5-0.5B's projections
    python benchmarks/speed_paths.py head --work DIR    # int8 lm_head: one int8 MatMulNBits vs split planes (+ embed 4)
Options: --threads 2 --repeat 5 --json OUT (head: --shape qwen2.5-0.5b|r1-distill-qwen-1.5b --prompt-len 128 --decode 64)

`kernels` times 24 layers of the four projections (qkv 896->1152, o 896->896, gate_up
896->9728, down 4864->896) at M=1 (decode), M=--batch (a decode step of that many sequences:
`--votes`, `serve`'s concurrent requests; its cost in M=1 steps is shown) and M=128 (prefill) for
each way ONNX Runtime can read them; with --threads 1 it reports CPU time, which the other processes of a shared machine disturb
least. GB/s counts the weight bytes a decode step reads.
Per-op-type time shares of a prefill and a decode step: benchmarks/op_profile.py ART.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402
import peers  # noqa: E402

HIDDEN, FFN, LAYERS = 896, 4864, 24
PROJECTIONS = [("qkv", HIDDEN, 1152), ("o", HIDDEN, HIDDEN), ("gate_up", HIDDEN, 2 * FFN), ("down", FFN, HIDDEN)]


# ---- kernels -------------------------------------------------------------------------------

def _nbits(rng, k, n, bits, block, accuracy, zero_points=True):
    """MatMulNBits operands (random codes: speed does not depend on them) and weight bytes."""
    from onnx import numpy_helper
    kb = -(-k // block)
    ins = [rng.integers(0, 256, (n, kb, block * bits // 8), dtype=np.uint8), rng.random(n * kb, dtype=np.float32) * 0.01]
    if zero_points:
        ins.append(rng.integers(0, 256, n * ((kb * bits + 7) // 8), dtype=np.uint8))
    attrs = dict(K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy)
    return "MatMulNBits", [numpy_helper.from_array(a) for a in ins], attrs, sum(a.nbytes for a in ins)


def _int8_gemm(rng, k, n):
    """DynamicQuantizeMatMul: int8 weights [K, N] with one scale per column (MLAS's int8 GEMM)."""
    from onnx import numpy_helper
    ins = [rng.integers(-127, 128, (k, n), dtype=np.int8), rng.random(n, dtype=np.float32) * 0.01, np.zeros(n, np.int8)]
    return "DynamicQuantizeMatMul", [numpy_helper.from_array(a) for a in ins], {}, sum(a.nbytes for a in ins)


def _fp32(rng, k, n):
    from onnx import numpy_helper
    w = rng.standard_normal((k, n), dtype=np.float32)
    return "MatMul", [numpy_helper.from_array(w)], {}, w.nbytes


KERNELS = {
    "int4 block 32": lambda r, k, n: _nbits(r, k, n, 4, 32, 4),
    "int4 block 32, symmetric": lambda r, k, n: _nbits(r, k, n, 4, 32, 4, False),
    "int4 block 64": lambda r, k, n: _nbits(r, k, n, 4, 64, 4),
    "int4 block 128 (default)": lambda r, k, n: _nbits(r, k, n, 4, 128, 4),
    "int4 block 32, accuracy 0 (fp32)": lambda r, k, n: _nbits(r, k, n, 4, 32, 0),
    "int4 block 128, accuracy 1 (fp32)": lambda r, k, n: _nbits(r, k, n, 4, 128, 1),
    "int4 block 128, accuracy 2 (fp16)": lambda r, k, n: _nbits(r, k, n, 4, 128, 2),
    "int8 block 32": lambda r, k, n: _nbits(r, k, n, 8, 32, 4, False),
    "int8 per column, int8 GEMM": _int8_gemm,
    "fp32 MatMul": _fp32,
}


def _stack(make, layers: int, seed: int = 0):
    """A model of `layers` x the four projections, each with its own weights (decode must stream them)."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(seed)
    nodes, inits, outs, nbytes = [], [], [], 0
    for layer in range(layers):
        for name, k, n in PROJECTIONS:
            op, tensors, attrs, size = make(rng, k, n)
            nbytes += size
            for j, t in enumerate(tensors):
                t.name = f"{name}{layer}.{j}"
            inits += tensors
            y = f"{name}{layer}"
            nodes.append(helper.make_node(op, ["x" if k == HIDDEN else "x_ffn", *(t.name for t in tensors)], [y],
                                          domain="com.microsoft" if op != "MatMul" else None, **attrs))
            outs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", k]) for x, k in (("x", HIDDEN), ("x_ffn", FFN))]
    model = helper.make_model(helper.make_graph(nodes, "stack", inputs, outs, inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString(), nbytes


def kernels(args) -> dict:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = args.threads, 1, 3
    sessions, sizes = {}, {}
    for name, make in KERNELS.items():
        model, sizes[name] = _stack(make, args.layers)
        sessions[name] = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    clock = time.process_time if args.threads == 1 else time.perf_counter   # 1 thread: CPU time, least noisy
    ops = 2 * args.layers * sum(k * n for _, k, n in PROJECTIONS)
    rng = np.random.default_rng(1)
    rows = {name: {} for name in sessions}
    for m in (1, args.batch, args.prompt_len):
        feed = {"x": rng.standard_normal((m, HIDDEN), dtype=np.float32), "x_ffn": rng.standard_normal((m, FFN), dtype=np.float32)}
        times = collections.defaultdict(list)
        for s in sessions.values():
            s.run(None, feed)
        for _ in range(args.repeat * (3 if m == 1 else 1)):
            for name, s in sessions.items():           # interleaved
                t = clock()
                s.run(None, feed)
                times[name].append(clock() - t)
        for name in sessions:
            t = statistics.median(times[name])
            rows[name][m] = {"ms": t * 1e3, "gop_s": ops * m / t / 1e9, "gb_s": sizes[name] / t / 1e9}
    print(f"\n{args.layers} layers of Qwen2.5-0.5B projections, {args.threads} thread(s) "
          f"({'CPU' if args.threads == 1 else 'wall'} time), medians; GB/s = weight bytes / time")
    b = args.batch
    print(f"{'':34} {'MB':>6} {'M=1 ms':>8} {'GB/s':>6} {f'M={b} ms':>8} {f'/ M=1':>6} {'M=' + str(args.prompt_len) + ' ms':>10} "
          f"{'GOP/s':>7} {'vs block 32':>11}")
    base = rows["int4 block 32"][args.prompt_len]["ms"]
    for name, r in rows.items():
        d, p = r[1], r[args.prompt_len]
        print(f"{name:34} {sizes[name] / 1e6:6.0f} {d['ms']:8.2f} {d['gb_s']:6.1f} {r[b]['ms']:8.2f} {r[b]['ms'] / d['ms']:6.2f} "
              f"{p['ms']:10.1f} {p['gop_s']:7.0f} {base / p['ms']:10.2f}x")
    return {"threads": args.threads, "layers": args.layers, "weight_bytes": sizes, "rows": rows}


# ---- head ----------------------------------------------------------------------------------

def head(args) -> dict:
    from edgert_export.decoder import Decoder
    src = compare.checkpoint(args.shape, args.work)
    runners, default = [], Decoder.lm_head_candidates
    for candidates, embed, label in ((0, 8, "int8 head"), (default, 8, f"int8 head split, {default} at int8"),
                                     (0, 4, "int4 head (--embed-bits 4)")):
        Decoder.lm_head_candidates = candidates
        art, _ = compare.export(src, args.work / f"edgert-{args.shape}-int4-e{embed}-c{candidates}", 4, embed)
        size = sum(f.stat().st_size for f in art.iterdir()) / 1e6
        runners.append(compare.EdgertRunner(art, label, info={"notes": f"{size:.0f} MB"}))
    Decoder.lm_head_candidates = default
    rows = compare.interleave(runners, peers.make_prompt(src, args.prompt_len), args.decode, args.repeat, args.threads)
    compare.print_table(rows, runners[0].name, f"{args.shape} shape, int4 body, {args.threads} threads, {args.prompt_len}-token "
                        f"prompt, {args.decode} decode tokens, median of {args.repeat} interleaved rounds")
    return {"shape": args.shape, "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=["kernels", "head"])
    ap.add_argument("--work", type=Path, default=Path("bench-out"))
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=["qwen2.5-0.5b", "r1-distill-qwen-1.5b"])
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="kernels: rows of a batched decode step")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"kernels": kernels, "head": head}[args.suite](args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
