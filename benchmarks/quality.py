"""Quality side by side: edgert's exports and llama.cpp's quantizations of the same models, scored
on the same token ids in the same windows (`edgert eval`'s definition, edgert/evaluate.py).

    python benchmarks/quality.py MODEL_DIR [MODEL_DIR ...] --work DIR [--text FILE] [--window N]
                                 [--threads 1] [--json OUT]

Per model folder (a Hugging Face checkpoint):
  * edgert: fp32, int8, int4 (the default export) and int4 `--recipe rtn` when the exporter has
    that flag, exported afresh each run through the CLI (the exporter changes; caches would lie);
  * llama.cpp: convert_hf_to_gguf.py to an F32 GGUF (benchmarks/peers.py: the converter from the
    llama-cpp-python sdist, run unchanged except that an unknown BPE hash with exactly Qwen2's
    pre-tokenizer is answered "qwen2"), then llama_model_quantize to Q4_0, Q4_K_M and Q8_0 from
    that F32 file; logits of every position from llama-cpp-python (Llama(logits_all=True),
    n_ctx = n_batch = window);
  * the reference: transformers fp32 on the HF folder (the edgert fp32 artifact without it).
Every variant is fed the same ids (the tokenizer.json's, BOS once) window by window; reported:
perplexity, its increase over the reference and over the variant's own fp32 (edgert fp32 / GGUF
F32), mean KL(reference || variant), top-1 agreement, file size (edgert: model.onnx + data;
GGUF: the whole file, its vocabulary included), bits per parameter, and the tensor types
llama.cpp actually wrote (k-quants need rows that are multiples of 256 and fall back otherwise).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

from edgert.evaluate import ArtifactScorer, EvalError, sample_text, score_window, split_windows  # noqa: E402
from edgert_export.reference import TransformersScorer  # noqa: E402

LLAMA_QTYPES = ("Q4_0", "Q4_K_M", "Q8_0")
DEFAULT_INT4 = "edgert int4"


class Variant:
    """One quantized model: where it lives, its size, and the sums of its scores."""

    def __init__(self, name: str, family: str, scorer, nbytes: int, weight_bits: float, types: str = ""):
        self.name, self.family, self.scorer = name, family, scorer
        self.nbytes, self.weight_bits, self.types = nbytes, weight_bits, types
        self.sums = Counter()


class LlamaCppScorer:
    def __init__(self, gguf: Path, window: int, threads: int):
        import llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=window, n_batch=window, n_ubatch=window,
                                   logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)

    def logits(self, ids: list[int]):
        self.llm.reset()
        self.llm.eval(ids)
        return self.llm.scores[:len(ids)].copy()


def exporter_has_recipe() -> bool:
    r = subprocess.run([sys.executable, "-m", "edgert.cli", "export", "--help"], capture_output=True, text=True)
    return "--recipe" in r.stdout


def edgert_variants(src: Path, work: Path, window: int, threads: int) -> list[Variant]:
    specs = [("edgert fp32", ["--bits", "32"]), ("edgert int8", ["--bits", "8"]), (DEFAULT_INT4, [])]
    if exporter_has_recipe():
        specs.append(("edgert int4 rtn", ["--recipe", "rtn"]))
    out = []
    for name, args in specs:
        art = work / name.replace(" ", "-")
        cmd = [sys.executable, "-m", "edgert.cli", "export", str(src), "-o", str(art), "--force", *args]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
        manifest = json.loads((art / "edgert.json").read_text())
        nbytes = sum(f["bytes"] for f in manifest["files"].values())
        data = sum(f["bytes"] for n, f in manifest["files"].items() if n.endswith(".data"))
        q = manifest["quantization"]
        types = f"attn/mlp {q['attention']}, embed {q['embed']}, lm_head {q['lm_head']}, block {q['block_size']}"
        out.append(Variant(name, "edgert", ArtifactScorer(art, window, threads), nbytes,
                           8 * data / manifest["model"]["parameters"], types))
    return out


def gguf_types(path: Path) -> tuple[float, str]:
    """Bits per element over all tensors, and the tensor types by share of the elements."""
    from gguf import GGUFReader
    by_type, nbytes = Counter(), 0
    for t in GGUFReader(str(path)).tensors:
        by_type[t.tensor_type.name] += int(t.n_elements)
        nbytes += int(t.n_bytes)
    total = sum(by_type.values())
    return 8 * nbytes / total, " ".join(f"{k} {v / total:.0%}" for k, v in by_type.most_common())


def llamacpp_variants(src: Path, work: Path, window: int, threads: int, errors: dict) -> list[Variant]:
    out = []
    for qtype in ("F32", *LLAMA_QTYPES):
        name = f"llama.cpp {qtype}"
        try:
            runner = peers.prepare_llamacpp(src, work / "llamacpp", qtype=qtype, outtype="f32")
            gguf = runner.gguf
            runner.close()
            bits, types = gguf_types(gguf)
            out.append(Variant(name, "llama.cpp", LlamaCppScorer(gguf, window, threads), gguf.stat().st_size, bits, types))
        except (RuntimeError, ValueError, ImportError) as e:
            errors[name] = str(e)
            print(f"{name}: unavailable: {e}", flush=True)
    return out


def reference_scorer(src: Path, fp32: Variant, window: int, threads: int):
    try:
        return "transformers fp32", TransformersScorer(src, window, threads)
    except EvalError as e:
        print(f"reference: {e}; using the edgert fp32 artifact instead", flush=True)
        return "edgert fp32", fp32.scorer


def evaluate_model(src: Path, work: Path, text: str, window: int | None, threads: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    errors: dict = {}
    variants = edgert_variants(src, work, window, threads)
    fp32 = variants[0]
    window = fp32.scorer.window
    variants += llamacpp_variants(src, work, window, threads, errors)
    ref_name, ref = reference_scorer(src, fp32, window, threads)
    ids = fp32.scorer.tokenizer.encode(text, add_special_tokens=True)
    windows = split_windows(ids, window)
    t0 = time.perf_counter()
    ref_sums = Counter()
    for w in windows:
        ref_logits = ref.logits(w)
        ref_sums.update(score_window(w, ref_logits))
        for v in variants:
            if v.name in errors:
                continue
            logits = v.scorer.logits(w)
            if logits.shape != ref_logits.shape:
                errors[v.name] = f"logits of shape {logits.shape}, the reference's are {ref_logits.shape}"
                continue
            v.sums.update(score_window(w, logits, ref_logits))
    n = sum(len(w) - 1 for w in windows)
    ref_ppl = math.exp(ref_sums["nll"] / n)
    rows = {}
    for v in variants:
        if v.name in errors:
            continue
        rows[v.name] = {"family": v.family, "ppl": math.exp(v.sums["nll"] / n), "kld": v.sums["kl"] / n,
                        "top1": v.sums["top1"] / n, "bytes": v.nbytes, "weight_bits": v.weight_bits, "types": v.types}
    for row in rows.values():
        own = rows.get("edgert fp32" if row["family"] == "edgert" else "llama.cpp F32")
        row["ppl_vs_ref"] = row["ppl"] / ref_ppl - 1
        row["ppl_vs_own_fp32"] = row["ppl"] / own["ppl"] - 1 if own else None
    return {"model": str(src), "reference": ref_name, "ref_ppl": ref_ppl, "tokens": n, "windows": len(windows),
            "window": window, "seconds": round(time.perf_counter() - t0, 1), "variants": rows, "errors": errors}


def table(r: dict) -> str:
    lines = [f"{Path(r['model']).name}: {r['tokens']} tokens in {r['windows']} windows of {r['window']}; "
             f"reference {r['reference']} ppl {r['ref_ppl']:.4f}",
             f"{'variant':<18} {'ppl':>8} {'vs ref':>8} {'vs fp32':>8} {'KL':>9} {'top-1':>7} {'MB':>8} {'bits/w':>7}  types"]
    for name, v in r["variants"].items():
        own = "" if v["ppl_vs_own_fp32"] is None else f"{v['ppl_vs_own_fp32']:+.2%}"
        lines.append(f"{name:<18} {v['ppl']:>8.4f} {v['ppl_vs_ref']:>+8.2%} {own:>8} {v['kld']:>9.5f} {v['top1']:>7.2%} "
                     f"{v['bytes'] / 1e6:>8.3f} {v['weight_bits']:>7.2f}  {v['types']}")
    for name, e in r["errors"].items():
        lines.append(f"{name:<18} ERROR: {e}")
    ours, theirs = r["variants"].get(DEFAULT_INT4), r["variants"].get("llama.cpp Q4_K_M")
    if ours and theirs:
        ok = ours["ppl_vs_ref"] <= theirs["ppl_vs_ref"] and ours["bytes"] <= theirs["bytes"]
        lines.append(f"default int4 {ours['ppl_vs_ref']:+.2%} at {ours['bytes'] / 1e6:.3f} MB vs Q4_K_M "
                     f"{theirs['ppl_vs_ref']:+.2%} at {theirs['bytes'] / 1e6:.3f} MB: "
                     + ("no worse and no larger" if ok else "NOT (worse or larger)"))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Perplexity/KL of edgert's exports vs llama.cpp's quantizations.")
    ap.add_argument("models", nargs="+", type=Path, help="Hugging Face model folders")
    ap.add_argument("--work", type=Path, required=True, help="folder for the exports and GGUF files")
    ap.add_argument("--text", type=Path, help="UTF-8 text [default: edgert's built-in stories]")
    ap.add_argument("--window", type=int, help="tokens per window [default: min(context, 512)]")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads per runtime (default 1: on a busy machine spinning thread pools make this 5-10x slower)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args(argv)
    text = a.text.read_text(encoding="utf-8") if a.text else sample_text()
    results = []
    for src in a.models:
        if not (src / "config.json").is_file():
            ap.error(f"{src} is not a Hugging Face model folder (no config.json)")
        tag = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:8]
        r = evaluate_model(src, a.work / f"{src.name}-{tag}", text, a.window, a.threads)
        print(table(r) + "\n", flush=True)
        results.append(r)
    if a.json:
        versions = {m: peers._version(m) for m in ("onnxruntime", "llama_cpp_python", "transformers", "torch")}
        a.json.write_text(json.dumps({"text_sha256": hashlib.sha256(text.encode()).hexdigest(), "threads": a.threads,
                                      "versions": versions, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
