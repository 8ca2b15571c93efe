"""edgert's own variants against each other, interleaved in one process, medians and ratios.

The side-by-side comparison with every peer (each in its own process) is benchmarks/suite.py;
this script is for edgert's options: export presets, expert strategies and MoE baselines.

    python benchmarks/compare.py dense --work DIR            # Qwen2.5-0.5B shape: edgert int4/int8, genai int4, llama.cpp Q4_0/Q4_K_M
    python benchmarks/compare.py moe --work DIR              # small Qwen3-MoE (1.3B, 64 experts, top-4) against
                                                             # every-expert, dense-active, 8-expert, llama.cpp, genai
Options: --prompt-len 128 --decode 64 --repeat 5 --threads 2 --json OUT --skip-peers
Checkpoints are random-weight folders of real shapes (benchmarks/checkpoints.py), made in WORK.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
import suite  # noqa: E402
from runners import EdgertRunner  # noqa: E402


checkpoint = suite.checkpoint
export = suite.export_edgert


def with_top_k(src: Path, dst: Path, k: int) -> Path:
    """The same checkpoint routed to k experts (k = all: the every-expert baseline); weights are links."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "config.json" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_experts_per_tok"] = k
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def nodes_per_layer(artifact: Path, graph: str, layer: int = 0) -> tuple[int, int]:
    """(top-level nodes, nodes including If subgraphs) of one decoder layer."""
    import onnx
    g = onnx.load(str(artifact / graph), load_external_data=False).graph
    top = [n for n in g.node if n.name.startswith(f"n:layers.{layer}.")]

    def count(nodes):
        return sum(1 + sum(count(a.g.node) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH) for n in nodes)
    return len(top), count(top)


def interleave(runners, prompt, n_decode, repeat, threads) -> list[dict]:
    results = {r.name: [] for r in runners}
    for r in runners:                                   # warm-up: page-in, prepacking
        r.measure(prompt, min(n_decode, 8), threads)
    for i in range(repeat):
        order = runners if i % 2 == 0 else runners[::-1]
        for r in order:
            results[r.name].append(r.measure(prompt, n_decode, threads))
    rows = []
    for r in runners:
        rs = results[r.name]
        rows.append({"name": r.name, "prefill_tok_s": statistics.median(x["prefill_tok_s"] for x in rs),
                     "decode_tok_s": statistics.median(x["decode_tok_s"] for x in rs), **getattr(r, "info", {})})
    return rows


def print_table(rows, base: str, title: str):
    ref = next(r for r in rows if r["name"] == base)
    print(f"\n{title}")
    print(f"{'':32} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode vs ' + base:>24}  notes")
    for r in rows:
        ratio = r["decode_tok_s"] / ref["decode_tok_s"]
        notes = r.get("notes", "")
        print(f"{r['name']:32} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f} {ratio:23.2f}x  {notes}")


def dense(args) -> dict:
    src = checkpoint("qwen2.5-0.5b", args.work)
    runners = []
    for bits, embed, block, label in ((4, 8, 32, "edgert int4"), (4, 4, 32, "edgert int4, --embed-bits 4"),
                                      (4, 4, 64, "edgert int4, embed 4, block 64"), (8, 8, 32, "edgert int8")):
        art, secs = export(src, args.work / f"edgert-q05-int{bits}-e{embed}-b{block}", bits, embed, block)
        runners.append(EdgertRunner(art, label, info={"notes": f"export {secs:.0f} s, "
                                    f"{sum(f.stat().st_size for f in art.iterdir()) / 1e6:.0f} MB"}))
    runners += peer_runners(src, args, [("genai", "int4"), ("llamacpp", "Q4_0"), ("llamacpp", "Q4_K_M")])
    prompt = peers.make_prompt(src, args.prompt_len)
    rows = interleave(runners, prompt, args.decode, args.repeat, args.threads)
    print_table(rows, "edgert int4", f"Qwen2.5-0.5B shape, {args.threads} threads, {args.prompt_len}-token prompt, "
                f"{args.decode} decode tokens, median of {args.repeat} interleaved rounds")
    return {"shape": "qwen2.5-0.5b", "rows": rows}


def peer_runners(src, args, which) -> list:
    out = []
    if args.skip_peers:
        return out
    for peer, q in which:
        try:
            if peer == "genai":
                r = peers.prepare_genai(src, args.work / "peers" / src.name, precision=q)
            else:
                r = peers.prepare_llamacpp(src, args.work / "peers" / src.name, qtype=q)
            out.append(r)
        except RuntimeError as e:
            print(f"{peer} {q}: not measured: {e}", file=sys.stderr)
    return out


def moe(args) -> dict:
    src = checkpoint("qwen3-moe-small", args.work)
    cfg = json.loads((src / "config.json").read_text())
    experts = cfg["num_experts"]
    art, secs = export(src, args.work / "edgert-moe-int4")
    runners = []
    for strategy in ("qmoe", "plain"):
        top, total = nodes_per_layer(art, f"model.{strategy}.onnx")
        runners.append(EdgertRunner(art, f"edgert {strategy}", strategy,
                                    {"notes": f"{top} nodes/layer ({total} with branches)"}))
    art4, _ = export(src, args.work / "edgert-moe-int4-e4", embed_bits=4)
    runners.append(EdgertRunner(art4, "edgert qmoe, --embed-bits 4", "qmoe"))
    art64, _ = export(src, args.work / "edgert-moe-int4-e4-b64", embed_bits=4, block_size=64)
    runners.append(EdgertRunner(art64, "edgert qmoe, embed 4, block 64", "qmoe"))
    every = with_top_k(src, args.work / "ckpt" / "qwen3-moe-small-all", experts)
    art_all, _ = export(every, args.work / "edgert-moe-all-int4")
    runners.append(EdgertRunner(art_all, "(a) every expert computed", "qmoe", {"notes": f"top-{experts} of {experts}"}))
    dense_art, _ = export(checkpoint("qwen3-dense-active", args.work), args.work / "edgert-dense-active-int4")
    runners.append(EdgertRunner(dense_art, "(b) dense, same active params", None, {"notes": "FFN 2048"}))
    few_art, _ = export(checkpoint("qwen3-moe-small-8x", args.work), args.work / "edgert-moe8-int4")
    runners.append(EdgertRunner(few_art, "8 experts, same active params", "qmoe"))
    runners += peer_runners(src, args, [("llamacpp", "Q4_0"), ("llamacpp", "Q4_K_M"), ("genai", "int4")])
    prompt = peers.make_prompt(src, args.prompt_len)
    rows = interleave(runners, prompt, args.decode, args.repeat, args.threads)
    print_table(rows, "edgert qmoe", f"Qwen3-MoE small (1.34B, 64 experts x 512, top-4, 205M active), "
                f"{args.threads} threads, {args.prompt_len}-token prompt, median of {args.repeat} interleaved rounds")
    return {"shape": "qwen3-moe-small", "rows": rows, "export_seconds": secs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=["dense", "moe"])
    ap.add_argument("--work", type=Path, default=Path("bench-out"))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    result = dense(args) if args.suite == "dense" else moe(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
