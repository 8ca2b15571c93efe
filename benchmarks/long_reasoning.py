"""The long-reasoning scenario: decode speed as the trace grows, every runner side by side.

    python benchmarks/long_reasoning.py --work bench-out [--shape qwen2.5-0.5b] [--threads 2]
        [--positions 128,512,1024,2048,4096,8192] [--mean-tokens 4096] [--repeat 1]
        [--skip llama.cpp] [--json benchmarks/long_reasoning.json] [--plot benchmarks/long_reasoning.png]
        [--results benchmarks/RESULTS.md]
    python benchmarks/long_reasoning.py --from-json benchmarks/long_reasoning.json --results benchmarks/RESULTS.md

Runners (prepared and cached by suite.py's machinery): edgert int4 (its default KV cache: int8
since 2026-12-02, fp16 before; on onnxruntime >= 1.27 in GroupQueryAttention, the kv8gqa graph),
the same artifact's standard-op int8 attention (onnxruntime 1.22's graph), edgert int4 with an fp16 cache and with an fp32 cache, onnxruntime-genai int4, llama.cpp Q4_0 with its default f16
cache and with a q8_0 cache (flash attention on). For each position P a fresh process per
runner prefills P prompt tokens and times 32 greedy decode steps (decode tok/s at ~P); then
each runner generates --mean-tokens tokens after a 128-token prompt (the mean over a long
trace). Rounds are interleaved runner by runner; peak RSS is the worker's. The table goes to
stdout, the figures to --json, decode tok/s against position to --plot (PNG).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import suite  # noqa: E402

STEPS = 32


def prepare(shape: str, work: Path, skip: list[str]) -> list[suite.Prepared]:
    src = suite.checkpoint(shape, work)
    out = []

    def add(label, fn):
        if any(s and s.lower() in label.lower() for s in skip):
            return
        try:
            p = fn()
            p.name = label
        except (RuntimeError, ValueError, OSError, ImportError) as e:
            p = suite.Prepared(label, refused=str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__)
        print(f"{label}: " + (f"refused: {p.refused}" if p.refused else "ready"), flush=True)
        out.append(p)

    add(BASE, lambda: suite._edgert(src, work, shape, 4))

    def edgert_ops():           # the same artifact, the graph whose int8 cache is standard ops (onnxruntime 1.22's)
        from edgert.model import choose_graph
        p = suite._edgert(src, work, shape, 4)
        twin = choose_graph(json.loads((Path(p.path) / "edgert.json").read_text())["graphs"], None)
        if not twin.endswith("kv8gqa"):
            raise RuntimeError(f"this onnxruntime runs no kv8gqa twin of the default export: {twin} is already this graph")
        p.options = {"strategy": "default" if twin == "kv8gqa" else twin[:-len("+kv8gqa")]}
        return p
    add(OPS, edgert_ops)

    def edgert_kv(kv):          # round-to-nearest int4: the same bytes and speed as GPTQ's, a fraction of the export time
        art = work / "edgert" / f"{shape}-int4-rtn-kv{kv[-2:].lstrip('t')}"
        if not (art / "edgert.json").is_file():
            from edgert_export import export
            export(src, art, bits=4, recipe="rtn", kv_cache=kv, force=True, progress=False)
        return suite.Prepared("", "edgert", str(art))
    add("edgert int4 (fp16 KV)", lambda: edgert_kv("fp16"))
    add("edgert int4 (fp32 KV)", lambda: edgert_kv("fp32"))
    add("onnxruntime-genai int4", lambda: suite._genai(src, work, shape, "int4"))
    add("llama.cpp Q4_0 (f16 KV)", lambda: suite._llamacpp(src, work, shape, "Q4_0"))

    def q8_kv():
        p = suite._llamacpp(src, work, shape, "Q4_0")
        p.options = {"kv": "q8_0"}
        return p
    add("llama.cpp Q4_0 (q8_0 KV)", q8_kv)
    return out


def measure(runners, positions, mean_tokens, repeat, threads) -> dict:
    live = [p for p in runners if not p.refused]
    res = {p.name: {"by_position": {}, "mean": [], "peak_rss_mb": 0.0} for p in live}
    for r in range(repeat):
        for pos in positions:
            prompt = list(range(1000, 1000 + pos))
            for p in (live if (r + pos) % 2 == 0 else live[::-1]):
                m = suite.run_worker(p, prompt, STEPS, threads)
                if "error" in m:
                    print(f"{p.name} at {pos}: {m['error']}", flush=True)
                    continue
                res[p.name]["by_position"].setdefault(pos, []).append(m["decode_tok_s"])
                res[p.name]["peak_rss_mb"] = max(res[p.name]["peak_rss_mb"], m["peak_rss_mb"])
                print(f"round {r + 1} position {pos:>5} {p.name:>26}: decode {m['decode_tok_s']:7.1f} tok/s", flush=True)
        if mean_tokens:
            for p in live:
                m = suite.run_worker(p, list(range(1000, 1128)), mean_tokens, threads)
                if "error" not in m:
                    res[p.name]["mean"].append(m["decode_tok_s"])
                    res[p.name]["peak_rss_mb"] = max(res[p.name]["peak_rss_mb"], m["peak_rss_mb"])
                    print(f"round {r + 1} mean over {mean_tokens} {p.name:>26}: {m['decode_tok_s']:7.1f} tok/s", flush=True)
    for v in res.values():
        v["by_position"] = {pos: statistics.median(x) for pos, x in v["by_position"].items()}
        v["mean"] = statistics.median(v["mean"]) if v["mean"] else None
    return res


BASE = "edgert int4 (default: int8 KV)"
OPS = "edgert int4 (int8 KV, standard-op attention)"


def base_of(res: dict) -> str:
    """The runner the others are compared with: edgert's default (runs before the int8 default: fp16)."""
    return BASE if BASE in res else "edgert int4 (fp16 KV)"


def table(res: dict, positions, base: str) -> str:
    """Decode tok/s per position, the deepest over the shallowest, the mean over a long trace and
    edgert's (base) mean over each runner's."""
    def f(x, fmt="{:.1f}"):
        return fmt.format(x) if x is not None else "-"
    lines = ["| runner | " + " | ".join(str(p) for p in positions) + " | deepest / shallowest | mean over trace "
             "| edgert / this | peak RSS MB |", "|" + "---|" * (len(positions) + 5)]
    for name, v in res.items():
        by = v["by_position"]
        ratio = by[positions[-1]] / by[positions[0]] if positions[0] in by and positions[-1] in by else None
        rel = res[base]["mean"] / v["mean"] if v["mean"] and res.get(base, {}).get("mean") else None
        lines.append(f"| {name} | " + " | ".join(f(by.get(p)) for p in positions) +
                     f" | {f(ratio, '{:.2f}x')} | {f(v['mean'])} | {f(rel, '{:.2f}x')} | {v['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def plot(res: dict, path: Path, shape: str, threads: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, v in res.items():
        pts = sorted(v["by_position"].items())
        if pts:
            ax.plot([p for p, _ in pts], [t for _, t in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("decode position (tokens in the cache)")
    ax.set_ylabel("decode tok/s")
    ax.set_title(f"{shape} int4, {threads} threads: decode speed as the trace grows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


BEGIN, END = "<!-- long-reasoning: benchmarks/long_reasoning.py writes this section -->", "<!-- /long-reasoning -->"


def results_section(data: dict, plot_name: str | None, json_name: str | None = None) -> str:
    """The scenario's section of RESULTS.md: how it was run (its JSON and plot as named), the table, the plot."""
    positions = data["positions"]
    json_name, shown = json_name or "long_reasoning.json", plot_name or "long_reasoning.png"
    lines = [BEGIN, "## Long reasoning: decode speed as the trace grows", "",
             f"`python benchmarks/long_reasoning.py --work DIR --json benchmarks/{json_name} --plot "
             f"benchmarks/{shown} --results benchmarks/RESULTS.md` ({data['shape']}, {data['threads']} threads): "
             f"decode tok/s after P prompt tokens ({STEPS} greedy steps, a fresh process per runner and position, runners "
             f"interleaved), then the mean decode speed over a generation after a 128-token prompt; peak RSS is the worker's."
             + (f" {data['note']}." if data.get("note") else ""), "",
             table(data["results"], positions, base_of(data["results"]))]
    if plot_name:
        lines += ["", f"![decode tok/s against position]({plot_name})"]
    versions = data.get("versions") or {}
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(lines + [END]) + "\n"


def write_results(path: Path, section: str) -> None:
    """Replace the scenario's section of RESULTS.md (the suite writes the rest), or add it."""
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path)
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--positions", default="128,512,1024,2048,4096,8192")
    ap.add_argument("--mean-tokens", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma-separated substrings of runner names to leave out")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--results", type=Path, help="also write the scenario's section of this RESULTS.md")
    ap.add_argument("--from-json", type=Path, help="no measuring: table, plot and RESULTS.md section from a saved --json")
    a = ap.parse_args(argv)
    if a.from_json:
        data = json.loads(a.from_json.read_text())
        data["results"] = {k: {**v, "by_position": {int(p): t for p, t in v["by_position"].items()}}
                           for k, v in data["results"].items()}
    else:
        if not a.work:
            ap.error("--work is needed to measure (or give --from-json)")
        positions = [int(p) for p in a.positions.split(",")]
        a.work.mkdir(parents=True, exist_ok=True)
        runners = prepare(a.shape, a.work.resolve(), a.skip.split(","))
        res = measure(runners, positions, a.mean_tokens, a.repeat, a.threads)
        refused = {p.name: p.refused for p in runners if p.refused}
        data = {"shape": a.shape, "threads": a.threads, "positions": positions, "results": res, "refused": refused,
                "versions": suite.versions(a.work)}
        for name, why in refused.items():
            print(f"{name}: refused: {why}")
    print(table(data["results"], data["positions"], base_of(data["results"])))
    if a.json and not a.from_json:
        a.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
    if a.plot:
        plot(data["results"], a.plot, data["shape"], data["threads"])
    if a.results:
        source = a.from_json or a.json
        write_results(a.results, results_section(data, a.plot.name if a.plot else None, source.name if source else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
