"""Where an edgert prefill and decode step go: onnxruntime's profiler, grouped per op type.

    python benchmarks/op_profile.py ART [--threads 2] [--prompt-len 128] [--decode 32] [--batch N] [--graph NAME] [--json out.json]

Prints, per op type, the milliseconds of one prefill and of one decode step (the mean over the
decode steps) and their share, plus the largest node groups (the layer index folded out, so the
24 q_proj of a model are one row). `ms outside nodes` is the run's wall time that no node
accounts for: binding, the session's own scheduling, Python.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort


def profiled_model(artifact: Path, threads: int, prefix: str, slots: int = 1, context: int = 1024, graph=None):
    """edgert's Model with profiling switched on: its session options come from ort.SessionOptions()."""
    from edgert.model import Model

    plain = ort.SessionOptions

    def with_profiling():
        o = plain()
        o.enable_profiling = True
        o.profile_file_prefix = prefix
        return o

    ort.SessionOptions = with_profiling
    try:
        return Model(artifact, context=context, threads=threads, slots=slots, strategy=graph)
    finally:
        ort.SessionOptions = plain


def group(events: list[dict], runs: list[dict]) -> list[dict]:
    """Per run: {op type: µs} and {node group: µs}, from Node events inside the run's time window."""
    out = [{"wall_us": r["dur"], "ops": defaultdict(float), "nodes": defaultdict(float)} for r in runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        for r, o in zip(runs, out):
            if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]:
                op = e.get("args", {}).get("op_name", "?")
                o["ops"][op] += e["dur"]
                name = re.sub(r"\.\d+\.", ".*.", e["name"][: -len("_kernel_time")])
                o["nodes"][f"{op} {name}"] += e["dur"]
                break
    return out


def table(title: str, ops: dict, wall_us: float, n: int, rows: int) -> list[str]:
    node_us = sum(ops.values())
    lines = [f"{title}: {wall_us / n / 1e3:.2f} ms per run, nodes {node_us / n / 1e3:.2f} ms, "
             f"outside nodes {(wall_us - node_us) / n / 1e3:.2f} ms"]
    for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:rows]:
        lines.append(f"  {k:<60} {v / n / 1e3:8.3f} ms  {100 * v / wall_us:5.1f}%")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--rows", type=int, default=12, help="node groups to list")
    ap.add_argument("--batch", type=int, default=1, help="decode steps of N sequences together (one forward)")
    ap.add_argument("--graph", help="which of the artifact's graphs (edgert.json 'graphs', as --moe-strategy) [default: the runtime's choice]")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if not (a.artifact / "edgert.json").is_file():
        ap.error(f"{a.artifact} is not an edgert artifact (no edgert.json)")
    with tempfile.TemporaryDirectory() as tmp:
        m = profiled_model(a.artifact, a.threads, str(Path(tmp) / "prof"), a.batch,
                           max(1024, a.prompt_len + 8 + 2 * a.decode), a.graph)
        rng = np.random.default_rng(0)
        prompt = np.array([rng.integers(0, 1000, a.prompt_len)], np.int64)
        n = a.batch

        def sequence(steps):
            """prefill slot 0 (the profiled prefill), the other slots too, then `steps` steps of all slots"""
            for r in range(n):
                tok = m.run(r, prompt, np.array([0]))[0, -1].argmax()
            toks = np.full((n, 1), tok, np.int64)
            for i in range(steps):
                logits = m.run(0, toks, np.full(n, a.prompt_len + i))
                toks = logits[:, -1].argmax(-1).reshape(n, 1).astype(np.int64)
        for _ in range(2):                      # warm-up: prepacking, page-in
            sequence(4)
        sequence(a.decode)
        events = json.loads(Path(m.session.end_profiling()).read_text())
    k = -(-a.prompt_len // (m.feed_limit or a.prompt_len))     # runs per prefill (Model.run cuts long feeds)
    runs = [e for e in events if e.get("name") == "model_run"][-(n * k + a.decode):]
    per = group(events, runs[:k] + runs[n * k:])  # slot 0's prefill, then the decode steps
    pre, dec = per[0], per[k:]
    for p in per[1:k]:
        pre["wall_us"] += p["wall_us"]
        for key in ("ops", "nodes"):
            for op, us in p[key].items():
                pre[key][op] += us
    dec_ops, dec_nodes = defaultdict(float), defaultdict(float)
    for d in dec:
        for k, v in d["ops"].items():
            dec_ops[k] += v
        for k, v in d["nodes"].items():
            dec_nodes[k] += v
    dec_wall = sum(d["wall_us"] for d in dec)
    out = table(f"prefill ({a.prompt_len} tokens) by op type", pre["ops"], pre["wall_us"], 1, 99)
    out += table("prefill, largest node groups", pre["nodes"], pre["wall_us"], 1, a.rows)
    out += table(f"decode (mean of {a.decode} steps of {n} sequence{'s' * (n > 1)}) by op type", dec_ops, dec_wall, a.decode, 99)
    out += table("decode, largest node groups", dec_nodes, dec_wall, a.decode, a.rows)
    print("\n".join(out))
    if a.json:
        a.json.write_text(json.dumps({"prefill": {"wall_us": pre["wall_us"], "ops": pre["ops"], "nodes": pre["nodes"]},
                                      "decode": {"wall_us": dec_wall / a.decode,
                                                 "ops": {k: v / a.decode for k, v in dec_ops.items()},
                                                 "nodes": {k: v / a.decode for k, v in dec_nodes.items()}}},
                                     indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
