"""Quantization recipes on trained models: perplexity over fp32 on held-out text, KL, top-1, bytes.

    python benchmarks/quant_recipes.py [MODEL_DIR ...] [--recipes a,b] [--seeds 0,1,2] [--llamacpp] [--plot PNG] [--json OUT]
    python benchmarks/quant_recipes.py --frontier          # the anchor table + benchmarks/frontier.png and .json

MODEL_DIR defaults to the bundled stories260K. What is scored (text the exporter never saw):
  * story models: edgert/data/stories.txt (original children's stories, disjoint from the built-in
    calibration text), tokenized once with BOS at the start and cut into consecutive windows of
    512 tokens (fewer when the model's context is shorter); every token but a window's first is scored;
  * the reasoning fixtures (a fixture.json with held-out ids): each of the 200 held-out problems
    as its chat prompt + transformers fp32's greedy answer; the answer tokens are scored.
The reference is transformers fp32; artifacts run through edgert.model.Model.forward(num_logits=all),
GGUFs through llama-cpp-python (all logits of a window in one batch). ppl = exp(mean NLL);
KL(fp32 || variant) and top-1 agreement over the same positions.

Bytes: "matrix bpw" = every stored byte of the weight matrices (codes, scales, zero points; the
embedding and lm_head included, a tied table once) per matrix weight, for edgert and GGUF alike
(norms, biases and rotary tables left out); "linear bpw" the same over the projections only
(attention, MLP, experts: what --bits-per-weight budgets); "file kB" the files as written.
--llamacpp adds llama.cpp's Q4_0 / Q4_K_S / Q4_K_M / Q5_K_M / IQ4_XS / Q8_0 from an F32 GGUF
(benchmarks/peers.py converts; needs llama-cpp-python, gguf and the converter, see
benchmarks/README.md). --plot draws perplexity increase against matrix bytes per weight.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "fixtures")]
DATA = ROOT / "export" / "data"
DEFAULT_MODEL = DATA / "stories260K"
ANCHOR = DATA / "anchor256"
DEFAULT_TEXT = ROOT / "edgert" / "data" / "stories.txt"     # the one held-out story text (also `edgert eval`'s)
USER_FILE = ROOT / "README.md"        # "a file the user has": prose, commands and code, not the model's text
WINDOW = 512
LLAMA_TYPES = ("Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_M", "IQ4_XS", "Q8_0")


# name -> export() keyword arguments
CANDIDATES = {
    "fp32": dict(bits=32),
    "int8": dict(bits=8),
    "rtn-b32": dict(bits=4, recipe="rtn", block_size=32),
    "search-b32": dict(bits=4, recipe="search", block_size=32),
    "default": dict(bits=4),
    "gptq-b32-builtin": dict(bits=4, calib="built-in", block_size=32),
    "gptq-b32-self": dict(bits=4, calib="self", block_size=32),
    "gptq-b32-file": dict(bits=4, calib=USER_FILE, block_size=32),
    "gptq-b64": dict(bits=4, block_size=64),
    "gptq-b128": dict(bits=4, block_size=128),
    "gptq-bpw4.3": dict(bits=4, bits_per_weight=4.3),
    "gptq-bpw4.5": dict(bits=4, bits_per_weight=4.5),
    "gptq-bpw4.75": dict(bits=4, bits_per_weight=4.75),
    "gptq-bpw5.0": dict(bits=4, bits_per_weight=5.0),
    "gptq-bpw5.5": dict(bits=4, bits_per_weight=5.5),
    "gptq-bpw6.0": dict(bits=4, bits_per_weight=6.0),
}
CALIB_SET = ["gptq-b32-builtin", "gptq-b32-self", "gptq-b32-file"]
FRONTIER_SET = ["fp32", "int8", "rtn-b32", "default", "gptq-b32-builtin", "gptq-b32-self", "gptq-b64", "gptq-b128",
                "gptq-bpw4.3", "gptq-bpw4.5", "gptq-bpw4.75", "gptq-bpw5.0"]


# ---- what is scored -------------------------------------------------------------------------

def eval_windows(src: Path, text: str) -> list[tuple[list[int], int]]:
    """(ids, first scored index) per window: held-out problems for the reasoning fixtures, else the text."""
    from edgert.tokenizer import Tokenizer
    fixture = src / "fixture.json"
    record = json.loads(fixture.read_text()) if fixture.is_file() else {}
    if "held_out_ids" in record:
        import reasoning_task as task
        from make_reasoning import prompt_ids
        from tokenizers import Tokenizer as HFTokenizer
        tok = HFTokenizer.from_file(str(src / "tokenizer.json"))
        out = []
        for p, answer in zip(task.held_out_problems(), record["held_out_ids"]):
            prompt = prompt_ids(tok, p)
            out.append((prompt + answer, len(prompt)))
        return out
    config = json.loads((src / "config.json").read_text())
    window = min(WINDOW, config.get("max_position_embeddings", WINDOW))
    ids = Tokenizer.from_dir(src).encode(text, add_special_tokens=True)
    return [(ids[i:i + window], 1) for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]


def windows_of(src: Path, text: str, window: int) -> list[list[int]]:
    """The text's windows (tests/test_quality.py)."""
    from edgert.tokenizer import Tokenizer
    ids = Tokenizer.from_dir(src).encode(text, add_special_tokens=True)
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]


def _ids(w):
    return w[0] if isinstance(w, tuple) else w


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_model(src: Path):
    import torch
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()


def reference_logprobs(src: Path, windows) -> list[np.ndarray]:
    import torch
    model = reference_model(src)
    with torch.no_grad():
        return [log_softmax(model(torch.tensor([_ids(w)])).logits[0, :-1].numpy()) for w in windows]


def artifact_logprobs(art: Path, windows, window: int | None = None) -> list[np.ndarray]:
    from edgert.model import Model
    model = Model(art, context=window or max(len(_ids(w)) for w in windows))
    out = []
    for w in windows:
        model.reset()
        out.append(log_softmax(model.forward(_ids(w), num_logits=len(_ids(w)))[:-1]))
    return out


def score(windows, ref, got) -> dict:
    """ppl of `got`, KL(ref || got) and top-1 agreement over the scored positions."""
    nll, kl, agree = [], [], []
    for w, lp, lq in zip(windows, ref, got):
        ids, first = (w if isinstance(w, tuple) else (w, 1))
        rows = np.arange(first - 1, len(ids) - 1)
        nxt = np.array(ids[first:])
        nll.append(-lq[rows, nxt])
        kl.append((np.exp(lp[rows]) * (lp[rows] - lq[rows])).sum(-1))
        agree.append(lp[rows].argmax(-1) == lq[rows].argmax(-1))
    return {"ppl": float(np.exp(np.concatenate(nll).mean())), "kl": float(np.concatenate(kl).mean()),
            "top1": float(np.concatenate(agree).mean()), "tokens": int(sum(len(n) for n in nll))}


# ---- bytes ----------------------------------------------------------------------------------

def matrix_params(src: Path) -> tuple[int, int]:
    """(weights of every matrix, of the projections only) in the checkpoint; a tied table once."""
    model = reference_model(src)
    seen, total, linear = set(), 0, 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
        if "embed" not in name and "lm_head" not in name and ".gate.weight" not in name:
            linear += p.numel()
    return total, linear


def edgert_bytes(art: Path) -> tuple[int, int]:
    """(bytes of every weight matrix's stored tensors, of the projections' MatMulNBits tensors):
    codes + scales + zero points; the tied table once; biases, norms and rotary tables left out."""
    import onnx
    graphs = json.loads((art / "edgert.json").read_text())["graphs"]
    name = graphs.get("plain", graphs.get("default", next(iter(graphs.values()))))   # experts as MatMulNBits
    m = onnx.load(str(art / name), load_external_data=False)
    sizes, nodes, todo = {}, [], [m.graph]
    while todo:                          # the graph and its If branches
        g = todo.pop()
        for t in g.initializer:
            ext = {e.key: e.value for e in t.external_data}
            sizes[t.name] = int(ext["length"]) if "length" in ext else len(t.raw_data) or t.ByteSize()
        for n in g.node:
            nodes.append(n)
            todo += [a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    every, linear = set(), set()
    for n in nodes:
        head = n.name.startswith(("n:lm_head", "n:embed"))
        if n.op_type == "MatMulNBits":
            names = [i for k, i in enumerate(n.input) if i and k in (1, 2, 3, 6)]
        elif n.op_type in ("Gather", "MatMul") and n.input[0] in sizes and not n.input[0].startswith("rope"):
            names = [n.input[0]]
        elif n.op_type == "MatMul" and n.input[1] in sizes:
            names = [n.input[1]]
        else:
            continue
        names = [i for i in names if i in sizes]
        every.update(names)
        if not head and n.op_type in ("MatMulNBits", "MatMul"):
            linear.update(names)
    return sum(sizes[i] for i in every), sum(sizes[i] for i in linear)


def gguf_bytes(path: Path) -> tuple[int, int, str]:
    """(bytes of the GGUF's matrices, of its projections, their types by share of the weights)."""
    from collections import Counter
    import gguf
    every = linear = 0
    types = Counter()
    for t in gguf.GGUFReader(str(path)).tensors:
        if len([d for d in t.shape if d > 1]) < 2:
            continue
        every += int(t.n_bytes)
        types[t.tensor_type.name] += int(t.n_elements)
        if not t.name.startswith(("token_embd", "output.")):
            linear += int(t.n_bytes)
    total = sum(types.values())
    return every, linear, " ".join(f"{k} {v / total:.0%}" for k, v in types.most_common())


# ---- variants -------------------------------------------------------------------------------

def export_candidate(src: Path, out: Path, spec: dict, seed: int | None = None) -> dict:
    """seed: the self-calibration's sampling seed (None: the exporter's SELF_SEED)."""
    from edgert_export import artifact, calibrate, export
    t0 = time.time()
    kept = calibrate.SELF_SEED
    if seed is not None:          # the sampler reads it from calibrate, the manifest's record from artifact
        calibrate.SELF_SEED = artifact.SELF_SEED = seed
    try:
        m = export(src, out, force=True, progress=False, **spec)
    finally:
        calibrate.SELF_SEED = artifact.SELF_SEED = kept
    seconds = time.time() - t0
    every, linear = edgert_bytes(out)
    q = m["quantization"]
    return {"file_bytes": m["summary"]["bytes"], "matrix_bytes": every, "linear_bytes": linear, "export_s": seconds,
            "calibration": q.get("calibration"), "types": ""}


def llamacpp_logprobs(gguf: Path, windows) -> list[np.ndarray]:
    """Logits at every position of each window from llama-cpp-python (quality.py's scorer:
    Llama(logits_all=True), n_ctx = n_batch = the longest window, one thread)."""
    from quality import LlamaCppScorer
    scorer = LlamaCppScorer(gguf, max(len(_ids(w)) for w in windows), 1)
    return [log_softmax(scorer.logits(_ids(w))[:-1]) for w in windows]


def run_model(src: Path, text: str, names: list[str], work: Path, llamacpp: bool, seeds=(None,)) -> list[dict]:
    windows = eval_windows(src, text)
    ref = reference_logprobs(src, windows)
    base = score(windows, ref, ref)["ppl"]
    every_w, linear_w = matrix_params(src)
    rows = []
    for name in names:
        out = work / name
        spec = CANDIDATES[name]
        sampled = spec.get("bits") == 4 and spec.get("recipe", "gptq") == "gptq" and spec.get("calib", "self") == "self"
        for seed in seeds if sampled else (None,):
            info = export_candidate(src, out, spec, seed)
            label = name if seed is None else f"{name} seed {seed}"
            rows.append({"model": src.name, "recipe": label, **info, **({"seed": seed} if seed is not None else {}),
                         **score(windows, ref, artifact_logprobs(out, windows))})
            print(f"  {src.name} {label}: {100 * (rows[-1]['ppl'] / base - 1):+.2f}%", file=sys.stderr, flush=True)
    if llamacpp:
        import peers
        peers.LLAMA_QTYPES = tuple(dict.fromkeys(peers.LLAMA_QTYPES + LLAMA_TYPES))
        for qtype in LLAMA_TYPES:
            try:
                r = peers.prepare_llamacpp(src, work / "llamacpp", qtype, outtype="f32")
                got = llamacpp_logprobs(r.gguf, windows)
                every, linear, types = gguf_bytes(r.gguf)
                rows.append({"model": src.name, "recipe": f"llama.cpp {qtype}", "file_bytes": r.info["bytes"],
                             "matrix_bytes": every, "linear_bytes": linear, "export_s": r.info.get("quantize_s"),
                             "calibration": None, "types": types, **score(windows, ref, got)})
                r.close()
                print(f"  {src.name} {qtype}: {100 * (rows[-1]['ppl'] / base - 1):+.2f}%", file=sys.stderr, flush=True)
            except (RuntimeError, ValueError) as e:
                print(f"llama.cpp {qtype}: {e}", file=sys.stderr)
    for r in rows:
        r["ppl_fp32"], r["ppl_increase"] = base, r["ppl"] / base - 1
        r["matrix_bpw"] = 8 * r["matrix_bytes"] / every_w
        r["linear_bpw"] = 8 * r["linear_bytes"] / linear_w
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | recipe | ppl | Δppl | KL | top-1 | matrix bpw | linear bpw | file kB | export s | types |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        es = f"{r['export_s']:.1f}" if r["export_s"] is not None else "—"
        lines.append(f"| {r['model']} | {r['recipe']} | {r['ppl']:.4f} | {100 * r['ppl_increase']:+.2f}% | {r['kl']:.4f} | "
                     f"{100 * r['top1']:.1f}% | {r['matrix_bpw']:.3f} | {r['linear_bpw']:.3f} | "
                     f"{r['file_bytes'] / 1e3:.1f} | {es} | {r['types']} |")
    models = dict.fromkeys(r["model"] for r in rows)
    for m in models:
        r = next(r for r in rows if r["model"] == m)
        lines.append(f"\n{m}: fp32 reference ppl {r['ppl_fp32']:.4f} over {r['tokens']} scored tokens")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity increase and KL against matrix bytes per weight, one column per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(7 * len(models), 8.5), squeeze=False)
    for col, m in enumerate(models):
        for row, (key, scale, label) in enumerate((("ppl_increase", 100, "perplexity increase over fp32 (%)"),
                                                   ("kl", 1, "KL(fp32 || quantized), nats per token"))):
            ax = axes[row][col]
            for family, marker, color in (("edgert", "o", "tab:blue"), ("llama.cpp", "s", "tab:orange")):
                pts = sorted((r for r in rows if r["model"] == m and r["recipe"] not in ("fp32", "llama.cpp F32")
                              and r["recipe"].startswith("llama.cpp") == (family == "llama.cpp") and r["matrix_bpw"] < 10),
                             key=lambda r: r["matrix_bpw"])
                ax.scatter([r["matrix_bpw"] for r in pts], [scale * r[key] for r in pts], marker=marker, color=color,
                           label=family)
                for r in pts:
                    ax.annotate(r["recipe"].replace("llama.cpp ", ""), (r["matrix_bpw"], scale * r[key]),
                                textcoords="offset points", xytext=(4, 3), fontsize=7)
            ax.set_xlabel("bits per weight of the weight matrices (scales and zero points included)")
            ax.set_ylabel(label)
            if key == "kl":
                ax.set_yscale("log")
            ax.set_title(f"{m}: held-out text")
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="held-out evaluation text (story models)")
    ap.add_argument("--recipes", default=None, help=f"comma-separated subset of: {', '.join(CANDIDATES)}; "
                    "'calib' = the calibration comparison")
    ap.add_argument("--seeds", default=None, help="comma-separated self-calibration sampling seeds: each "
                    "self-calibrated recipe once per seed [default: the exporter's]")
    ap.add_argument("--llamacpp", action="store_true", help=f"add llama.cpp {', '.join(LLAMA_TYPES)} rows")
    ap.add_argument("--frontier", action="store_true", help="the anchor fixture, the frontier recipes and llama.cpp, "
                    "the plot to benchmarks/frontier.png")
    ap.add_argument("--plot", type=Path, help="write the frontier plot (PNG) here")
    ap.add_argument("--work", type=Path, help="where artifacts go [default: a temporary folder]")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--rows", type=Path, nargs="+", default=[], help="also tabulate and plot the rows of earlier --json files")
    args = ap.parse_args(argv)
    if args.frontier:
        args.models = args.models or [ANCHOR]
        args.recipes = args.recipes or ",".join(FRONTIER_SET)
        args.llamacpp = True
        args.plot = args.plot or HERE / "frontier.png"
        args.json = args.json or HERE / "frontier.json"
    models = args.models or [DEFAULT_MODEL]
    spec = args.recipes or ",".join(CANDIDATES)
    names = CALIB_SET if spec == "calib" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        sys.exit(f"quant_recipes: unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(CANDIDATES)}")
    text = args.text.read_text(encoding="utf-8")
    try:
        seeds = tuple(int(x) for x in args.seeds.split(",")) if args.seeds else (None,)
    except ValueError:
        sys.exit(f"quant_recipes: --seeds takes integers, not {args.seeds!r}")
    rows = [r for f in args.rows for r in json.loads(f.read_text())]
    if args.rows and not args.models and not args.frontier:
        models = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in models:
            if not (src / "config.json").is_file():
                sys.exit(f"quant_recipes: {src} is not a Hugging Face model folder (no config.json)")
            rows += run_model(src, text, names, (args.work or Path(tmp)) / src.name, args.llamacpp, seeds)
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
