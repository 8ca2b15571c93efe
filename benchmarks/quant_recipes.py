"""int4 recipes side by side: perplexity over fp32 on held-out text, KL, top-1, size, export time.

    python benchmarks/quant_recipes.py [MODEL_DIR ...] [--text FILE] [--recipes a,b] [--llamacpp] [--json OUT]

MODEL_DIR defaults to ../shared/models/stories260K (or the identical bundled copy). The text (default: benchmarks/data/
heldout_stories.txt, original stories written for this, disjoint from the calibration text)
is tokenized once with BOS at the start and cut into consecutive windows of W = 512 tokens
(fewer when the model's context is shorter); every token but each window's first is scored
given its window prefix; ppl = exp(mean NLL). The reference is transformers fp32; artifacts run
through edgert.model.Model.forward(num_logits=all). KL(fp32 || artifact) and top-1 agreement
are over the same positions. "linear bpw" counts the MatMulNBits tensors of the projections
(codes + scales + zero points, padding included) per weight; "weight bpw" every stored tensor
per parameter, without the artifact's 4 kB page alignment of each tensor (which dominates the
file of a 260K-parameter model and is noise for real ones); "file kB" the files as written. --llamacpp adds llama.cpp Q4_0 / Q4_K_M / Q8_0 rows (benchmarks/peers.py
converts; needs llama-cpp-python and the converter, see benchmarks/README.md).
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
sys.path.insert(0, str(HERE))
# ../shared/models/stories260K, else the identical copy bundled for `edgert demo`
DEFAULT_MODEL = next(p for p in (HERE.parents[1] / "shared" / "models" / "stories260K",
                                 HERE.parent / "export" / "data" / "stories260K") if p.is_dir() or p.name == "stories260K"
                     and p.parent.name == "data")
DEFAULT_TEXT = HERE / "data" / "heldout_stories.txt"
WINDOW = 512


def _symmetric_rtn(w, bits, block_size, name=None):
    from edgert_export.quantize import quantize
    return quantize(w, bits, block_size, symmetric=bits == 4, shrink=(1.0,))


class _Int8For:
    """Mixed precision: linears whose name ends with one of `suffixes` at int8 (the MatMulNBits
    node takes the tensor's own bits), the rest by the recipe."""

    def __init__(self, recipe, suffixes):
        self.recipe, self.suffixes = recipe, suffixes

    def __call__(self, w, bits, block_size, name=None):
        from edgert_export.quantize import quantize
        if bits == 4 and name and name.endswith(self.suffixes):
            return quantize(w, 8, block_size)
        return self.recipe(w, bits, block_size, name)


# name -> export() keyword arguments; "quantizer" replaces the recipe's quantizer (issue variants)
CANDIDATES = {
    "fp32": dict(bits=32),
    "int8": dict(bits=8),
    "rtn-sym-b32": dict(bits=4, recipe="rtn", quantizer=_symmetric_rtn),
    "rtn-b32": dict(bits=4, recipe="rtn"),
    "rtn-b16": dict(bits=4, recipe="rtn", block_size=16),
    "search-b32": dict(bits=4, recipe="search"),
    "search-b64": dict(bits=4, recipe="search", block_size=64),
    "gptq-b32": dict(bits=4, recipe="gptq"),
    "gptq-b64": dict(bits=4, recipe="gptq", block_size=64),
    "gptq-b16": dict(bits=4, recipe="gptq", block_size=16),
    "gptq-b32-down8": dict(bits=4, recipe="gptq", int8=(".down",)),
    "gptq-b64-down8": dict(bits=4, recipe="gptq", block_size=64, int8=(".down",)),
    "gptq-b32-down8-o8": dict(bits=4, recipe="gptq", int8=(".down", ".o_proj")),
    "gptq-b16-down8": dict(bits=4, recipe="gptq", block_size=16, int8=(".down",)),
}


def windows_of(src: Path, text: str, window: int) -> list[list[int]]:
    from edgert.tokenizer import Tokenizer
    ids = Tokenizer.from_dir(src).encode(text, add_special_tokens=True)
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]


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
        return [log_softmax(model(torch.tensor([w])).logits[0, :-1].numpy()) for w in windows]


def artifact_logprobs(art: Path, windows, window: int) -> list[np.ndarray]:
    from edgert.model import Model
    model = Model(art, context=window)
    out = []
    for w in windows:
        model.reset()
        out.append(log_softmax(model.forward(w, num_logits=len(w))[:-1]))
    return out


def score(windows, ref, got) -> dict:
    """ppl of `got` on the text, KL(ref || got) and top-1 agreement over the scored positions."""
    nll, kl, agree = [], [], []
    for w, lp, lq in zip(windows, ref, got):
        nxt = np.array(w[1:])
        nll.append(-lq[np.arange(len(nxt)), nxt])
        kl.append((np.exp(lp) * (lp - lq)).sum(-1))
        agree.append(lp.argmax(-1) == lq.argmax(-1))
    return {"ppl": float(np.exp(np.concatenate(nll).mean())), "kl": float(np.concatenate(kl).mean()),
            "top1": float(np.concatenate(agree).mean()), "tokens": int(sum(len(n) for n in nll))}


def weight_bytes(art: Path) -> tuple[int, float | None]:
    """(bytes of every initializer, without the data file's page alignment; bits per weight of the
    MatMulNBits projections, lm_head excepted: codes + scales + zero points, padding included)."""
    import onnx
    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    sizes = {}
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        sizes[t.name] = int(ext["length"]) if "length" in ext else len(t.raw_data) or t.ByteSize()
    nbytes = weights = 0
    for n in m.graph.node:
        if n.op_type != "MatMulNBits" or n.name.startswith("n:lm_head"):
            continue
        a = {x.name: x.i for x in n.attribute}
        nbytes += sum(sizes.get(i, 0) for i in n.input[1:4] if i)
        weights += a["K"] * a["N"]
    return sum(sizes.values()), (8 * nbytes / weights if weights else None)


def gguf_weight_bytes(path: Path) -> int:
    import gguf
    return int(sum(t.n_bytes for t in gguf.GGUFReader(str(path)).tensors))


def export_candidate(src: Path, out: Path, spec: dict) -> dict:
    from edgert_export import artifact, export
    spec = dict(spec)
    custom, int8 = spec.pop("quantizer", None), spec.pop("int8", None)
    saved = artifact.Quantizer
    if custom:
        artifact.Quantizer = lambda method, stats=None: custom
    elif int8:
        artifact.Quantizer = lambda method, stats=None: _Int8For(saved(method, stats), int8)
    try:
        t0 = time.time()
        m = export(src, out, force=True, progress=False, **spec)
        seconds = time.time() - t0
    finally:
        artifact.Quantizer = saved
    wbytes, linear_bpw = weight_bytes(out)
    return {"file_bytes": m["summary"]["bytes"], "weight_bytes": wbytes, "linear_bpw": linear_bpw, "export_s": seconds}


def llamacpp_logprobs(gguf_runner, windows) -> list[np.ndarray]:
    """Logits at every position of each window through llama.cpp's batch API."""
    lc = gguf_runner.lc
    out = []
    for w in windows:
        ctx = gguf_runner._context(len(w), 2)
        batch = lc.llama_batch_init(len(w), 0, 1)
        try:
            batch.n_tokens = len(w)
            for i, t in enumerate(w):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, True
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            rows = [np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(gguf_runner.n_vocab,)).copy()
                    for i in range(len(w) - 1)]
        finally:
            lc.llama_batch_free(batch)
        out.append(log_softmax(np.stack(rows)))
    return out


def run_model(src: Path, text: str, names: list[str], work: Path, llamacpp: bool) -> list[dict]:
    config = json.loads((src / "config.json").read_text())
    window = min(WINDOW, config.get("max_position_embeddings", WINDOW))
    windows = windows_of(src, text, window)
    ref = reference_logprobs(src, windows)
    base = score(windows, ref, ref)["ppl"]
    rows = []
    params = sum(int(np.prod(t.shape)) for t in reference_model(src).parameters())
    for name in names:
        out = work / name
        info = export_candidate(src, out, CANDIDATES[name])
        rows.append({"model": src.name, "recipe": name, **info, **score(windows, ref, artifact_logprobs(out, windows, window))})
    if llamacpp:
        from peers import prepare_llamacpp
        for qtype in ("Q4_0", "Q4_K_M", "Q8_0"):
            try:
                r = prepare_llamacpp(src, work / "llamacpp", qtype)
                got = llamacpp_logprobs(r, windows)
                rows.append({"model": src.name, "recipe": f"llama.cpp {qtype}", "file_bytes": r.info["bytes"],
                             "weight_bytes": gguf_weight_bytes(work / "llamacpp" / f"llamacpp-{qtype}.gguf"),
                             "linear_bpw": None,
                             "export_s": r.info.get("quantize_s"), **score(windows, ref, got)})
                r.close()
            except RuntimeError as e:
                print(f"llama.cpp {qtype}: {e}", file=sys.stderr)
    for r in rows:
        r["ppl_fp32"], r["ppl_increase"] = base, r["ppl"] / base - 1
        r["weight_bpw"] = 8 * r["weight_bytes"] / params
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'model':<14} {'recipe':<18} {'ppl':>7} {'Δppl':>7} {'KL':>7} {'top-1':>6} {'linear bpw':>10} "
            f"{'weight bpw':>10} {'weights kB':>10} {'file kB':>8} {'export s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lb = f"{r['linear_bpw']:.3f}" if r["linear_bpw"] else "—"
        es = f"{r['export_s']:.1f}" if r["export_s"] is not None else "—"
        lines.append(f"{r['model'][:14]:<14} {r['recipe']:<18} {r['ppl']:>7.4f} {100 * r['ppl_increase']:>+6.2f}% "
                     f"{r['kl']:>7.4f} {100 * r['top1']:>5.1f}% {lb:>10} {r['weight_bpw']:>10.2f} "
                     f"{r['weight_bytes'] / 1e3:>10.1f} {r['file_bytes'] / 1e3:>8.1f} {es:>8}")
    if rows:
        lines.append(f"(fp32 reference ppl {rows[0]['ppl_fp32']:.4f} over {rows[0]['tokens']} scored tokens)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", type=Path, default=[DEFAULT_MODEL])
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="held-out evaluation text")
    ap.add_argument("--recipes", default=",".join(CANDIDATES), help=f"comma-separated subset of: {', '.join(CANDIDATES)}")
    ap.add_argument("--llamacpp", action="store_true", help="add llama.cpp Q4_0 / Q4_K_M / Q8_0 rows")
    ap.add_argument("--work", type=Path, help="where artifacts go [default: a temporary folder]")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        sys.exit(f"quant_recipes: unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(CANDIDATES)}")
    text = args.text.read_text(encoding="utf-8")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in args.models:
            if not (src / "config.json").is_file():
                sys.exit(f"quant_recipes: {src} is not a Hugging Face model folder (no config.json)")
            rows += run_model(src, text, names, (args.work or Path(tmp)) / src.name, args.llamacpp)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
