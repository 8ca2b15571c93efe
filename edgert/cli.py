"""The `edgert` command: a thin layer over edgert.load() and the exporter."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Run distilled reasoning and Mixture-of-Experts LLMs on edge CPUs.")

DIM, RESET = "\033[2m", "\033[0m"
MAX_MEMORY_HELP = ("Memory budget, e.g. 2G or 1500M: refuse before loading when weights + KV cache at --context "
                   "do not fit [default: available memory]; off = no check.")


def fail(message: str, code: int = 1):
    typer.echo(f"edgert: error: {message}", err=True)
    raise typer.Exit(code)


def _user_errors():
    from .artifact import ArtifactError
    from .llm import PromptTooLong
    from .model import ContextFull, RunError
    return (ArtifactError, PromptTooLong, ContextFull, RunError, ValueError, OSError)


@app.command()
def export(
    model_dir: Path = typer.Argument(..., help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json)."),
    out: Path = typer.Option(..., "-o", "--out", help="Artifact folder to write (atomically)."),
    bits: int = typer.Option(4, help="Weight bits for attention and MLP/expert projections: 4, 8, or 32 (fp32 reference)."),
    block_size: int = typer.Option(32, help="Quantization block size along the input dimension (16-256, power of two)."),
    embed_bits: int = typer.Option(8, help="Bits for embeddings and lm_head: 8, 32, or 4 (faster decode, less faithful; ignored with --bits 32)."),
    context: Optional[int] = typer.Option(None, help="Longest context the artifact supports [default: model's, at most 32768]."),
    recipe: str = typer.Option("gptq", help="How int4 weights are chosen: gptq (calibrated, most accurate), search (block clipping search, no calibration) or rtn (plain round-to-nearest)."),
    calib: Optional[Path] = typer.Option(None, help="Calibration text file for --recipe gptq (default: a built-in text of stories, prose, arithmetic and code)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
):
    """Export a Hugging Face checkpoint to an int4/int8 ONNX artifact."""
    try:
        from edgert_export import ExportError, export as do_export
    except ImportError as e:
        fail(f"the exporter needs the [export] extra ({e.name} is missing): pip install 'edgert[export]'")
    try:
        manifest = do_export(model_dir, out, bits=bits, block_size=block_size, context=context, force=force,
                             embed_bits=embed_bits, recipe=recipe, calib=calib)
    except ExportError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
    s = manifest["summary"]
    typer.echo(f"exported {manifest['architecture']} ({manifest['model']['parameters'] / 1e6:.1f}M parameters) to {out}: "
               f"{s['bytes'] / 1e6:.1f} MB, {s['bits_per_weight']:.2f} bits/weight, {s['seconds']:.1f} s", err=True)


@app.command()
def run(
    artifact: Path = typer.Argument(..., help="Artifact folder made by `edgert export`."),
    prompt: Optional[str] = typer.Argument(None, help="Prompt text; read from stdin when omitted."),
    max_tokens: int = typer.Option(256, min=1, help="Most tokens to generate."),
    temperature: Optional[float] = typer.Option(None, min=0.0, help="0 = greedy [default: the model's generation config]."),
    top_p: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Nucleus sampling mass."),
    top_k: Optional[int] = typer.Option(None, min=0, help="Sample among the k most likely tokens (0 = all)."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is (no chat template), with the tokenizer's BOS."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object at the end instead of streaming text."),
    context: Optional[int] = typer.Option(None, min=1, help="KV cache size in tokens [default: min(model, 4096)]."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads [default: the fast physical cores]."),
    think_budget: Optional[int] = typer.Option(None, min=0, help="Close the <think> reasoning after N tokens and answer."),
    system: Optional[str] = typer.Option(None, help="System message for the chat template."),
    moe_strategy: Optional[str] = typer.Option(None, help="MoE artifacts: qmoe or plain [default: fastest for this onnxruntime]."),
    stats: bool = typer.Option(False, "--stats", help="Report active parameters per token and per-layer expert usage."),
    max_memory: Optional[str] = typer.Option(None, help=MAX_MEMORY_HELP),
):
    """Generate text. stdout carries only the generated text; reasoning is dimmed on a terminal."""
    if prompt is None:
        if sys.stdin.isatty():
            fail("no prompt: give one as an argument or on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        fail("the prompt is empty")
    from . import load
    try:
        llm = load(artifact, context=context, threads=threads, moe_strategy=moe_strategy, max_memory=max_memory)
        if stats:
            llm.model.track_experts()
        ids = llm.encode(prompt, raw=raw, system=system)
        stream = llm.generate(ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=seed, ignore_eos=ignore_eos, think_budget=think_budget)
        color = sys.stdout.isatty() and not as_json and not os.environ.get("NO_COLOR")
        tokens, text, reasoning = [], [], []
        dimmed = False
        for tok in stream:
            if tok.id >= 0:
                tokens.append(tok.id)
            text.append(tok.text)
            if tok.reasoning:
                reasoning.append(tok.text)
            if as_json:
                continue
            if color and tok.reasoning != dimmed and tok.text:
                sys.stdout.write(DIM if tok.reasoning else RESET)
                dimmed = tok.reasoning
            sys.stdout.write(tok.text)
            sys.stdout.flush()
    except _user_errors() as e:
        fail(str(e))
    except KeyboardInterrupt:
        if color:
            sys.stdout.write(RESET)
        raise typer.Exit(130)
    st = llm.stats
    report = llm.model.expert_report() if stats else None
    if as_json:
        full = "".join(text)
        think = "".join(reasoning)
        answer = full[len(think):] if full.startswith(think) else full
        out = {"text": full, "tokens": tokens, "prompt_tokens": st.prompt_tokens,
               "reasoning": think, "answer": answer.lstrip("\n") if think else answer,
               "prefill_tok_s": round(st.prefill_tok_s, 2), "decode_tok_s": round(st.decode_tok_s, 2),
               "stop_reason": st.stop_reason}
        if report:
            out["stats"] = report
        typer.echo(json.dumps(out, ensure_ascii=False))
    else:
        if dimmed:
            sys.stdout.write(RESET)
        sys.stdout.write("\n")
        typer.echo(f"[{st.prompt_tokens} prompt tokens, {st.prefill_tok_s:.1f} tok/s | {st.generated} generated, "
                   f"{st.decode_tok_s:.1f} tok/s | stop: {st.stop_reason}]", err=True)
        if st.stop_reason == "context":
            typer.echo(f"edgert: stopped: the {llm.context}-token context is full (prompt + generated); raise --context "
                       f"(this artifact holds up to {llm.manifest['context_length']})", err=True)
        if report:
            typer.echo(format_expert_report(report), err=True)


@app.command()
def bench(
    artifact: Optional[Path] = typer.Argument(None, help="Artifact folder (or use --synthetic)."),
    synthetic: Optional[str] = typer.Option(None, help="Bench a built-in shape with random weights instead, built here "
                                            "without a download and cached (EDGERT_SYNTHETIC_DIR): qwen2.5-0.5b, "
                                            "r1-distill-qwen-1.5b, r1-distill-qwen-7b, qwen3-0.6b, olmoe-1b-7b, phi-4-mini, "
                                            "gemma-3-1b, gpt-oss-20b."),
    bits: Optional[int] = typer.Option(None, help="With --synthetic: weight bits, 4 or 8 (default 4; embeddings/lm_head "
                                                  "int8, block 32, as export does)."),
    prompt_tokens: int = typer.Option(128, min=1, help="Prompt length (synthetic tokens)."),
    gen_tokens: int = typer.Option(64, min=2, help="Tokens to generate (the first comes from prefill, the rest are decode steps)."),
    repeat: int = typer.Option(3, min=1, help="Timed rounds (after one warm-up); median, min and max are reported."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads, also for the bandwidth probe (default: the fast physical cores)."),
    context: Optional[int] = typer.Option(None, min=1, help="KV cache size (default: what the run needs, at least 256)."),
    json_out: Optional[str] = typer.Option(None, "--json", metavar="[FILE]",
                                           help="Print one JSON object instead of the table; with FILE, print the table "
                                                "and write the JSON there."),
    moe_strategy: Optional[str] = typer.Option(None, help="MoE artifacts: qmoe or plain (default: the fastest this onnxruntime has)."),
    max_memory: Optional[str] = typer.Option(None, help=MAX_MEMORY_HELP),
):
    """Measure prefill/decode speed, time to first token, load time, peak memory and the decode
    roofline (memory bandwidth / bytes read per token) on this device."""
    from .bench import bench as do_bench, bench_context, synthetic_artifact, table
    if (artifact is None) == (synthetic is None):
        fail("give an artifact folder or --synthetic SHAPE (one of them)")
    if bits is not None and not synthetic:
        fail("--bits applies to --synthetic models only (an artifact's bits are fixed at export)")
    try:
        if synthetic:
            artifact = synthetic_artifact(synthetic, bits or 4, bench_context(prompt_tokens, gen_tokens, context))
        result = do_bench(artifact, prompt_tokens, gen_tokens, repeat, threads, context, strategy=moe_strategy,
                          max_memory=max_memory)
    except _user_errors() as e:
        fail(str(e))
    result["synthetic"] = synthetic
    if json_out == "-":
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(table(result))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")


@app.command("eval")
def eval_(
    artifact: Path = typer.Argument(..., help="Artifact folder to evaluate."),
    reference: Optional[Path] = typer.Option(None, help="Compare with this model: an artifact, or a Hugging Face "
                                             "folder run by transformers in fp32 (needs transformers + torch)."),
    text: Optional[Path] = typer.Option(None, help="UTF-8 text file to score (default: built-in children's stories, 2066 words)."),
    window: Optional[int] = typer.Option(None, help="Tokens per window (default: min(context, 512)); a last window of 2+ tokens is scored too."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: ppl, tokens, windows, window, seconds "
                                 "(+ kld, top1, ref_ppl with --reference)."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for onnxruntime and torch (default: theirs)."),
    moe_strategy: Optional[str] = typer.Option(None, help="MoE artifacts: qmoe or plain for ARTIFACT (the reference "
                                               "runs its default; default: the fastest here)."),
):
    """Perplexity on a text (BOS once, non-overlapping windows; each window's tokens after the first are
    scored given their prefix in the window) and, with --reference, mean KL(reference || artifact) and top-1 agreement."""
    from .evaluate import EvalError, evaluate
    try:
        body = None if text is None else text.read_text(encoding="utf-8")
        r = evaluate(artifact, body, reference=reference, window=window, threads=threads, moe_strategy=moe_strategy)
    except UnicodeDecodeError:
        fail(f"{text}: not UTF-8 text")
    except (EvalError, *_user_errors()) as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(r))
        return
    typer.echo(f"ppl {r['ppl']:.4f} over {r['tokens']} tokens ({r['windows']} windows of up to {r['window']}, "
               f"{r['seconds']:.1f} s)")
    if reference is not None:
        typer.echo(f"reference ppl {r['ref_ppl']:.4f} ({r['ppl'] / r['ref_ppl'] - 1:+.2%}), "
                   f"KL(reference || artifact) {r['kld']:.5f}, top-1 agreement {r['top1']:.2%}")


DEMO_PROMPT = "What is (9-5)*7+2+2?"   # one of the fixture's held-out problems (tests/test_fixtures.py)


@app.command()
def demo(
    prompt: str = typer.Argument(DEMO_PROMPT, help="Question for the model: arithmetic chains of +, - and * by digits, results 0-50."),
    bits: int = typer.Option(4, help="Export precision: 4, 8 or 32."),
    max_tokens: int = typer.Option(120, min=1, help="Most tokens to generate."),
    out: Optional[Path] = typer.Option(None, help="Where to keep the exported demo artifact [default: a cache folder]."),
):
    """Export the bundled reasoning model (a 0.66M-parameter Qwen2 trained on arithmetic in
    DeepSeek-R1's format) and watch it think before it answers."""
    try:
        from edgert_export import ExportError, export as do_export
        from edgert_export.artifact import BUNDLED_MODEL
    except ImportError as e:
        fail(f"the demo exports a model, which needs the [export] extra ({e.name} is missing): pip install 'edgert[export]'")
    src = BUNDLED_MODEL.parent / "reasoning-qwen2"
    if not (src / "model.safetensors").is_file():
        fail(f"the bundled reasoning model is missing from {src}: reinstall edgert")
    # the cache key holds a hash of the weights, so an upgraded fixture is exported again
    weights = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()[:12]
    out = out or (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgert"
                  / f"demo-reasoning-qwen2-{bits}bit-{weights}")
    try:
        if not (out / "edgert.json").is_file():
            m = do_export(src, out, bits=bits, force=True, progress=False)
            typer.echo(f"exported the bundled reasoning-qwen2 ({bits}-bit) to {out}: {m['summary']['bytes'] / 1e3:.0f} kB",
                       err=True)
    except ExportError as e:
        fail(str(e))
    typer.echo(prompt, err=True)
    run(out, prompt, max_tokens=max_tokens, temperature=0.0, top_p=None, top_k=None, seed=None, raw=False,
        ignore_eos=False, as_json=False, context=None, threads=None, think_budget=None, system=None,
        moe_strategy=None, stats=False, max_memory=None)


@app.command()
def verify(artifact: Path = typer.Argument(..., help="Artifact folder.")):
    """Check an artifact's files against the sha256 sums in its manifest."""
    from .artifact import ArtifactError, verify as do_verify
    try:
        m = do_verify(artifact)
    except ArtifactError as e:
        fail(str(e))
    typer.echo(f"{artifact}: ok ({m['architecture']}, {len(m['files'])} files verified)")


def format_expert_report(r: dict) -> str:
    lines = [f"parameters {r['parameters'] / 1e6:.1f}M, active per token {r['active_parameters_per_token'] / 1e6:.1f}M"
             + (f", expert strategy {r['strategy']}" if r["strategy"] != "default" else "")]
    for layer, counts in (r.get("expert_usage") or {}).items():
        c = sorted(enumerate(counts), key=lambda t: -t[1])
        total = sum(counts) or 1
        top = " ".join(f"#{e}:{n / total:.0%}" for e, n in c[:4] if n)
        lines.append(f"  layer {layer:>3}: {sum(1 for n in counts if n)}/{len(counts)} experts used; busiest {top}")
    return "\n".join(lines)


def _bench_json_value(args: list[str]) -> list[str]:
    """`edgert bench --json` without a FILE means stdout: give the option its "-" (typer has no
    optional option values)."""
    if args[:1] == ["bench"] and "--json" in args:
        i = args.index("--json")
        if i + 1 == len(args) or args[i + 1].startswith("-"):
            return args[: i + 1] + ["-"] + args[i + 1:]
    return args


def main():
    app(args=_bench_json_value(sys.argv[1:]))


if __name__ == "__main__":
    main()
