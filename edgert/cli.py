"""The `edgert` command: a thin layer over edgert.load() and the exporter."""
from __future__ import annotations

import hashlib
import json
import math
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


class TokenWriter:
    """Streams Tokens as text, the <think> reasoning dimmed on a colour terminal (edgert run, edgert chat)."""

    def __init__(self, out, color: bool):
        self.out, self.color, self.dimmed = out, color, False

    def write(self, tok) -> None:
        if self.color and tok.reasoning != self.dimmed and tok.text:
            self.out.write(DIM if tok.reasoning else RESET)
            self.dimmed = tok.reasoning
        self.out.write(tok.text)
        self.out.flush()

    def end(self) -> None:
        if self.dimmed:
            self.out.write(RESET)
            self.dimmed = False
        self.out.flush()


def _finite(value, flag: str):
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{flag} must be a finite number, not {value}")
    return value


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
    model_dir: str = typer.Argument(..., help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json), "
                                    "or a hub repo id ORG/NAME (downloaded, or from the local cache when offline)."),
    out: Path = typer.Option(..., "-o", "--out", help="Artifact folder to write (atomically)."),
    bits: int = typer.Option(4, help="Weight bits for attention and MLP/expert projections: 4, 8, or 32 (fp32 reference)."),
    block_size: Optional[int] = typer.Option(None, help="Quantization block size along the input dimension (16-256, power of two) [default: int8 32; int4 per projection, 128 where its input width holds at least two blocks of 128, else 64 by the same rule, else 32; embeddings and lm_head 32; the optimum route 32]."),
    embed_bits: int = typer.Option(8, help="Bits for embeddings and lm_head: 8, 32, or 4 (faster decode, less faithful; ignored with --bits 32)."),
    context: Optional[int] = typer.Option(None, min=2, help="Longest context the artifact supports [default: model's, at most 32768]."),
    recipe: str = typer.Option("gptq", help="How int4 weights are chosen: gptq (calibrated, most accurate), search (block clipping search, no calibration) or rtn (plain round-to-nearest)."),
    calib: Optional[Path] = typer.Option(None, help="Calibration for --recipe gptq: 'self' (text the model samples itself, seeded), 'built-in' (stories, prose, arithmetic and code) or a UTF-8 text file [default: self]."),
    bits_per_weight: Optional[float] = typer.Option(None, help="Byte budget for the attention/MLP projections in bits per weight (e.g. 4.5; scales and zero points count): mixed int4 block sizes and int8 by measured sensitivity, recorded per tensor in edgert.json [default: 6 for int4 GPTQ models under 128 wide, whose rows int4 serves worst (--block-size 32 keeps them uniform); none otherwise]."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is an edgert artifact (never another non-empty "
                               "folder, never the source)."),
    kv_cache: Optional[str] = typer.Option(None, help="KV cache precision the graphs read and write: int8 (1 byte "
                                           "per element with the calibrated per-channel scales of int4 GPTQ exports, in "
                                           "GroupQueryAttention on onnxruntime >= 1.27 and standard ops before; exports "
                                           "without calibration add a scale per row and head), fp16 (GroupQueryAttention; on x86 "
                                           "onnxruntime converts it per head) or fp32 (twice fp16's memory, the fastest at "
                                           "short context) [default: int8, fp16 for heads under 32 wide; fp32 with --bits 32]."),
    revision: Optional[str] = typer.Option(None, help="With a hub repo id: the branch, tag or commit [default: main]."),
    via: Optional[str] = typer.Option(None, help="native (edgert's own graph builders) or optimum (optimum-onnx's graph, "
                                      "quantized by onnxruntime; needs the [optimum] extra) [default: native when "
                                      "edgert builds the model_type, else optimum]."),
):
    """Export a Hugging Face checkpoint to an int4/int8 ONNX artifact."""
    try:
        from edgert_export import ExportError, export as do_export
    except ImportError as e:
        fail(f"the exporter needs the [export] extra ({e.name} is missing): pip install 'edgert[export]'")
    try:
        manifest = do_export(model_dir, out, bits=bits, block_size=block_size, context=context, force=force,
                             embed_bits=embed_bits, recipe=recipe, calib=calib, kv_cache=kv_cache, revision=revision,
                             bits_per_weight=bits_per_weight, via=via)
    except ExportError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
    s, q = manifest["summary"], manifest["quantization"]
    budget = ""
    if "bits_per_weight_budget" in q:      # mixed layouts: say so (a narrow model gets one by default)
        projections = [v for t, v in q["tensors"].items() if t not in ("embed_tokens", "lm_head")]
        budget = (f"; projections {q['linear_bits_per_weight']:.2f} bits/weight under a budget of "
                  f"{q['bits_per_weight_budget']:g}, {sum(v['bits'] == 8 for v in projections)} of {len(projections)} at int8")
    typer.echo(f"exported {manifest['architecture']} ({manifest['model']['parameters'] / 1e6:.1f}M parameters) to {out}: "
               f"{s['bytes'] / 1e6:.1f} MB, {s['bits_per_weight']:.2f} bits/weight, {s['seconds']:.1f} s{budget}", err=True)


@app.command()
def run(
    artifact: Path = typer.Argument(..., help="Artifact folder made by `edgert export`."),
    prompt: Optional[str] = typer.Argument(None, help="Prompt text; read from stdin when omitted."),
    max_tokens: int = typer.Option(256, min=1, help="Most tokens to generate."),
    temperature: Optional[float] = typer.Option(None, min=0.0, callback=lambda v: _finite(v, "--temperature"),
                                                help="0 = greedy [default: the model's generation config]."),
    top_p: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Nucleus sampling mass."),
    top_k: Optional[int] = typer.Option(None, min=0, help="Sample among the k most likely tokens (0 = all)."),
    seed: Optional[int] = typer.Option(None, min=0, help="Random seed for sampling."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is (no chat template), with the tokenizer's BOS."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object at the end instead of streaming text."),
    context: Optional[int] = typer.Option(None, min=1, help="KV cache size in tokens [default: min(model, 4096)]."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads [default: the fast physical cores]."),
    think_budget: Optional[int] = typer.Option(None, min=0, help="Close the <think> reasoning after N tokens and answer."),
    system: Optional[str] = typer.Option(None, help="System message for the chat template."),
    moe_strategy: Optional[str] = typer.Option(None, help="Which graph of the artifact: qmoe or plain (MoE), fused or default (hybrid models; fused needs onnxruntime >= 1.25); each with a +kv8gqa twin in int8-cache artifacts (onnxruntime >= 1.27) [default: the fastest for this onnxruntime]."),
    stats: bool = typer.Option(False, "--stats", help="Report active parameters per token and per-layer expert usage."),
    max_memory: Optional[str] = typer.Option(None, help=MAX_MEMORY_HELP),
    votes: int = typer.Option(1, min=1, max=64, help="Self-consistency: sample N answers together (one batched forward "
                              "per step) and print the majority answer; --json lists every vote."),
    speculate: str = typer.Option("off", help="ngram: greedy decoding verifies tokens drafted from the text so far, "
                                  "several per forward (the same output); draft: drafted by --draft ART; off."),
    draft_tokens: int = typer.Option(4, min=1, max=16, help="Most drafted tokens verified per forward with --speculate."),
    draft: Optional[Path] = typer.Option(None, help="Speculate with this smaller artifact (same tokenizer) as the drafter "
                                         "(implies --speculate; greedy)."),
):
    """Generate text. stdout carries only the generated text; reasoning is dimmed on a terminal."""
    if speculate not in ("off", "ngram", "draft"):
        fail(f"--speculate must be ngram, draft or off, not {speculate!r}")
    if draft is not None:
        speculate = "draft"
    elif speculate == "draft":
        fail("--speculate draft needs --draft ART (a smaller model with the same tokenizer)")
    from .limits import read_stdin
    if prompt is None:
        if sys.stdin.isatty():
            fail("no prompt: give one as an argument or on stdin")
        try:
            prompt = read_stdin()
        except ValueError as e:
            fail(str(e))
    if not prompt.strip():
        fail("the prompt is empty")
    from . import load
    writer = None
    try:
        llm = load(artifact, context=context, threads=threads, moe_strategy=moe_strategy, max_memory=max_memory,
                   slots=votes)
        if stats:
            llm.model.track_experts()
        if draft is not None:
            llm.use_draft(draft, max_memory=max_memory)
        if speculate != "off":                # said once, not left to a "drafted 0" in the stats
            why = ("the votes sample" if votes > 1 else "the model is recurrent" if llm.engine.recurrent else
                   "sampling is on (temperature > 0)" if llm.sampling(temperature, top_p, top_k).temperature > 0
                   else None)
            if why:
                typer.echo(f"edgert: note: speculation verifies greedy decoding only; {why}, so it decodes plainly",
                           err=True)
        ids = llm.encode(prompt, raw=raw, system=system)
        if votes > 1:
            return _print_votes(llm, ids, votes, as_json, dict(max_tokens=max_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed, think_budget=think_budget))
        stream = llm.generate(ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=seed, ignore_eos=ignore_eos, think_budget=think_budget,
                              speculate=draft_tokens if speculate != "off" else 0)
        writer = TokenWriter(sys.stdout, sys.stdout.isatty() and not as_json and not os.environ.get("NO_COLOR"))
        tokens, text, reasoning = [], [], []
        for tok in stream:
            if tok.id >= 0:
                tokens.append(tok.id)
            text.append(tok.text)
            if tok.reasoning:
                reasoning.append(tok.text)
            if not as_json:
                writer.write(tok)
    except _user_errors() as e:
        fail(str(e))
    except KeyboardInterrupt:
        if writer:
            writer.end()
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
        if speculate != "off":
            out["speculation"] = {k: st.extra.get(k, 0) for k in ("drafted", "accepted", "verify_steps")}
        if report:
            out["stats"] = report
        typer.echo(json.dumps(out, ensure_ascii=False))
    else:
        writer.end()
        sys.stdout.write("\n")
        spec = (f" | drafted {st.extra.get('drafted', 0)}, accepted {st.extra.get('accepted', 0)}"
                if speculate != "off" else "")
        typer.echo(f"[{st.prompt_tokens} prompt tokens, {st.prefill_tok_s:.1f} tok/s | {st.generated} generated, "
                   f"{st.decode_tok_s:.1f} tok/s | stop: {st.stop_reason}{spec}]", err=True)
        if st.stop_reason == "context":
            typer.echo(f"edgert: stopped: the {llm.context}-token context is full (prompt + generated); raise --context "
                       f"(this artifact holds up to {llm.manifest['context_length']})", err=True)
        if report:
            typer.echo(format_expert_report(report), err=True)


CHAT_COMMANDS = ("/clear  /system TEXT  /think on|off|N  /stats  /save FILE  /load FILE  /exit  "
                 "(start a message with // to send one that begins with /)")


@app.command()
def chat(
    artifact: Path = typer.Argument(..., help="Artifact folder made by `edgert export` (with a chat template)."),
    system: Optional[str] = typer.Option(None, help="System message (/system TEXT changes it)."),
    think_budget: Optional[int] = typer.Option(None, min=0, help="Close the <think> reasoning of each answer after N tokens (/think N)."),
    max_tokens: Optional[int] = typer.Option(None, min=1, help="Most tokens per answer [default: up to the end of the context]."),
    temperature: Optional[float] = typer.Option(None, min=0.0, callback=lambda v: _finite(v, "--temperature"),
                                                help="0 = greedy [default: the model's generation config]."),
    top_p: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Nucleus sampling mass."),
    top_k: Optional[int] = typer.Option(None, min=0, help="Sample among the k most likely tokens (0 = all)."),
    seed: Optional[int] = typer.Option(None, min=0, help="Random seed for sampling."),
    context: Optional[int] = typer.Option(None, min=1, help="KV cache size in tokens, the conversation's memory [default: min(model, 4096)]."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads [default: the fast physical cores]."),
    moe_strategy: Optional[str] = typer.Option(None, help="Which graph of the artifact: qmoe or plain (MoE), fused or default (hybrid models; fused needs onnxruntime >= 1.25); each with a +kv8gqa twin in int8-cache artifacts (onnxruntime >= 1.27) [default: the fastest for this onnxruntime]."),
    max_memory: Optional[str] = typer.Option(None, help=MAX_MEMORY_HELP),
):
    """Talk with a model in the terminal, turn after turn. The history stays in the KV cache: each turn
    prefills only its new text. Commands: /clear, /system TEXT, /think on|off|N, /stats, /save FILE,
    /load FILE, /exit. Ctrl+C stops an answer; Ctrl+D (or Ctrl+C twice at the prompt) leaves. Lines are
    read from stdin when it is not a terminal."""
    from . import load
    try:
        llm = load(artifact, context=context, threads=threads, moe_strategy=moe_strategy, max_memory=max_memory)
        conv = llm.chat(system=system, think_budget=think_budget)
    except _user_errors() as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        typer.echo(f"edgert chat: {artifact}, {llm.context}-token context. {CHAT_COMMANDS}. Ctrl+D leaves.", err=True)
    writer = TokenWriter(sys.stdout, sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    interrupted, failed = False, 0
    while True:
        try:
            line = input(">>> " if tty else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            if interrupted:
                break
            interrupted = True
            typer.echo("\n(Ctrl+C again or Ctrl+D to leave)", err=True)
            continue
        interrupted = False
        line = line.strip()
        try:
            if line.startswith("/") and not line.startswith("//"):
                if not _chat_command(conv, line):
                    break
            elif line:
                _chat_turn(conv, line[1:] if line.startswith("//") else line, writer, sampling)
        except (ValueError, OSError) as e:
            typer.echo(f"edgert: {e}", err=True)
            failed += 1
        except KeyboardInterrupt:
            writer.end()
            typer.echo("\n[stopped]", err=True)
    if tty:
        typer.echo("", err=True)
    elif failed:                              # a script learns that lines failed (a terminal user saw each)
        raise typer.Exit(1)


def _chat_turn(conv, text: str, writer: TokenWriter, sampling: dict) -> None:
    """One answer, streamed; Ctrl+C stops it (the turn is kept as far as it got)."""
    stream = None
    try:
        stream = conv.send(text, **sampling)
        if conv.stats.dropped_turns:
            typer.echo(f"[the context is full: dropped the oldest {conv.stats.dropped_turns} turn(s)]", err=True)
        for tok in stream:
            writer.write(tok)
    except KeyboardInterrupt:
        if stream is not None:
            stream.close()
        writer.end()
        typer.echo("\n[stopped]", err=True)
        return
    except _user_errors() as e:
        writer.end()
        typer.echo(f"edgert: {e}", err=True)
        return
    writer.end()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if conv.stats.stop_reason == "context":
        typer.echo(f"[the answer reached the end of the {conv.llm.context}-token context; the next turns drop "
                   f"the oldest ones as needed]", err=True)
    elif conv.stats.stop_reason == "length":
        typer.echo("[stopped at --max-tokens]", err=True)


def _chat_command(conv, line: str) -> bool:
    """Run a /command; False means leave. Bad input raises ValueError (one line)."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":
        typer.echo(CHAT_COMMANDS)
    elif name == "/clear":
        conv.clear()
        typer.echo("[conversation cleared]", err=True)
    elif name == "/system":
        conv.system = arg or None
        typer.echo(f"[system message {'set' if arg else 'removed'}]", err=True)
    elif name == "/think":
        if arg in ("on", "off"):
            conv.thinking, conv.think_budget = arg == "on", None
        elif arg.isdigit():
            conv.thinking, conv.think_budget = True, int(arg)
        else:
            raise ValueError("/think takes on, off or a token budget N")
        typer.echo(f"[thinking {'off' if not conv.thinking else f'on, budget {arg} tokens' if arg.isdigit() else 'on'}]",
                   err=True)
    elif name == "/stats":
        s = conv.stats
        if not s.prompt_tokens:
            typer.echo("no turn yet")
        else:
            typer.echo(f"last turn: prompt {s.prompt_tokens} tokens, {s.cached_tokens} reused from the cache, "
                       f"{s.prefilled_tokens} prefilled ({s.prefill_tok_s:.1f} tok/s) | {s.generated} generated "
                       f"({s.reasoning_tokens} reasoning), {s.decode_tok_s:.1f} tok/s | stop: {s.stop_reason}"
                       + (f" | dropped {s.dropped_turns} old turn(s)" if s.dropped_turns else ""))
    elif name in ("/save", "/load"):
        if not arg:
            raise ValueError(f"{name} needs a file name")
        path = Path(arg).expanduser()
        getattr(conv, name[1:])(path)
        typer.echo(f"[{len(conv.messages)} messages {'saved to' if name == '/save' else 'loaded from'} {path}]", err=True)
    else:
        raise ValueError(f"unknown command {name}; the commands are {CHAT_COMMANDS}")
    return True


def _print_votes(llm, ids, n: int, as_json: bool, options: dict) -> None:
    """`run --votes N`: the majority answer on stdout (every vote in --json), a summary on stderr."""
    result = llm.vote(ids, n, **options)
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False))
        return
    typer.echo(result["answer_text"] or result["text"])      # the answer after its reasoning (all of it if cut short)
    counts = ", ".join(f"{k!r}: {c}" for k, c in sorted(result["counts"].items(), key=lambda kv: -kv[1])) or "none"
    typer.echo(f"[{n} votes: {counts} -> {result['answer']!r} | {result['generated']} generated, "
               f"{result['decode_tok_s']:.1f} tok/s together]", err=True)


@app.command()
def bench(
    artifact: Optional[Path] = typer.Argument(None, help="Artifact folder (or use --synthetic)."),
    synthetic: Optional[str] = typer.Option(None, help="Bench a built-in shape with random weights instead, built here "
                                            "without a download and cached (EDGERT_SYNTHETIC_DIR): qwen2.5-0.5b, "
                                            "r1-distill-qwen-1.5b, r1-distill-qwen-7b, qwen3-0.6b, olmoe-1b-7b, phi-4-mini, "
                                            "gemma-3-1b, gpt-oss-20b, lfm2.5-1.2b, qwen3.5-0.8b, qwen3.5-2b, qwen3.5-35b-a3b."),
    bits: Optional[int] = typer.Option(None, help="With --synthetic: weight bits, 4 or 8 (default 4; embeddings/lm_head "
                                                  "int8, blocks as export chooses them)."),
    kv_cache: Optional[str] = typer.Option(None, help="With --synthetic: the KV cache, int8, fp16 or fp32 (default: "
                                                       "the export's; fp16 decodes folded: faster at depth on narrow heads, "
                                                       "twice int8's memory)."),
    prompt_tokens: int = typer.Option(128, min=1, help="Prompt length (synthetic tokens)."),
    gen_tokens: int = typer.Option(64, min=2, help="Tokens to generate (the first comes from prefill, the rest are decode steps)."),
    repeat: int = typer.Option(3, min=1, help="Timed rounds (after one warm-up); median, min and max are reported."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads, also for the bandwidth probe (default: the fast physical cores)."),
    context: Optional[int] = typer.Option(None, min=1, help="KV cache size (default: what the run needs, at least 256)."),
    json_out: Optional[str] = typer.Option(None, "--json", metavar="[FILE]",
                                           help="Print one JSON object instead of the table; with FILE, print the table "
                                                "and write the JSON there (- is stdout, as --json alone)."),
    moe_strategy: Optional[str] = typer.Option(None, help="Which graph of the artifact: qmoe or plain (MoE), fused or default (hybrid models; fused needs onnxruntime >= 1.25); each with a +kv8gqa twin in int8-cache artifacts (onnxruntime >= 1.27) (default: the fastest this onnxruntime has)."),
    max_memory: Optional[str] = typer.Option(None, help=MAX_MEMORY_HELP),
    batch: int = typer.Option(1, min=1, max=64, help="Also measure N sequences decoded together (one forward per step): "
                              "aggregate tok/s and its ratio to one sequence."),
):
    """Measure prefill/decode speed, time to first token, load time, peak memory and the decode
    roofline (memory bandwidth / bytes read per token) on this device."""
    from .bench import bench as do_bench, bench_context, synthetic_artifact, table
    if artifact is None and synthetic is None and json_out and Path(json_out).is_dir():
        artifact, json_out = Path(json_out), "-"      # `bench --json ART`: a folder is never the FILE
    if (artifact is None) == (synthetic is None):
        took = f"; --json took {json_out!r} as its FILE" if artifact is None and json_out not in (None, "-") else ""
        fail(f"give an artifact folder or --synthetic SHAPE (one of them){took}")
    if bits is not None and not synthetic:
        fail("--bits applies to --synthetic models only (an artifact's bits are fixed at export)")
    if kv_cache is not None and not synthetic:
        fail("--kv-cache applies to --synthetic models only (an artifact's KV cache is fixed at export)")
    if kv_cache not in (None, "int8", "fp16", "fp32"):
        fail(f"--kv-cache must be int8, fp16 or fp32, not {kv_cache[:20]!r}")
    if json_out not in (None, "-"):           # where the results go is checked before the run, not after
        target = Path(json_out)
        if target.is_dir() or (target.exists() and not target.is_file()):
            fail(f"--json {json_out}: not a file")
        if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
            fail(f"--json {json_out}: cannot write there (no such folder, or no permission)")
    try:
        if synthetic:
            artifact = synthetic_artifact(synthetic, bits or 4, bench_context(prompt_tokens, gen_tokens, context), kv_cache)
        result = do_bench(artifact, prompt_tokens, gen_tokens, repeat, threads, context, strategy=moe_strategy,
                          max_memory=max_memory, batch=batch)
    except _user_errors() as e:
        fail(str(e))
    result["synthetic"] = synthetic
    if json_out == "-":
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(table(result))
    if json_out:
        from .limits import write_text_atomic
        try:                                  # all or nothing: a full disk leaves no empty file
            write_text_atomic(json_out, json.dumps(result, indent=2) + "\n")
        except OSError as e:
            fail(f"--json {json_out}: cannot write it ({e.strerror or e})")


@app.command("eval")
def eval_(
    artifact: Path = typer.Argument(..., help="Artifact folder to evaluate."),
    reference: Optional[Path] = typer.Option(None, help="Compare with this model: an artifact, or a Hugging Face "
                                             "folder run by transformers in fp32 (needs transformers + torch)."),
    text: Optional[Path] = typer.Option(None, help="UTF-8 text file to score (default: built-in held-out children's stories, 4127 words)."),
    window: Optional[int] = typer.Option(None, help="Tokens per window (default: min(context, 512)); a last window of 2+ tokens is scored too."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: ppl, tokens, windows, window, seconds, "
                                 "quantization (bits per weight, layouts per tensor) (+ kld, top1, ref_ppl with --reference)."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for onnxruntime and torch (default: theirs)."),
    moe_strategy: Optional[str] = typer.Option(None, help="Which graph of ARTIFACT: qmoe or plain (MoE), fused or default "
                                               "(hybrid models) (the reference runs its default; default: the fastest here)."),
):
    """Perplexity on a text (BOS once, non-overlapping windows; each window's tokens after the first are
    scored given their prefix in the window) and, with --reference, mean KL(reference || artifact) and top-1 agreement."""
    from .evaluate import EvalError, evaluate
    from .limits import read_text_file
    try:
        body = None if text is None else read_text_file(text, what=f"--text {text}")
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
    q = r.get("quantization") or {}
    if q.get("layouts"):
        lin = f", projections {q['linear_bits_per_weight']:.3f} bits/weight" if "linear_bits_per_weight" in q else ""
        budget = f" (budget {q['bits_per_weight_budget']:g})" if "bits_per_weight_budget" in q else ""
        typer.echo(f"weights: {', '.join(f'{k} x{v}' for k, v in q['layouts'].items())}{lin}{budget}; "
                   f"file {q.get('bits_per_weight', 0):.2f} bits/weight")


def _is_demo(out: Path, src: Path, bits: int) -> bool:
    """Whether `out` is a loadable export of the bundled model at `bits` (its tokenizer, its precision)."""
    from .artifact import ArtifactError, read_manifest
    from .llm import _vocabulary
    try:
        m = read_manifest(out)
    except (ArtifactError, OSError, ValueError):
        return False
    return m.get("quantization", {}).get("attention") == bits and _vocabulary(out) == _vocabulary(src)


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
    cached = out is None
    out = out or (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgert"
                  / f"demo-reasoning-qwen2-{bits}bit-{weights}")
    if (out / "edgert.json").is_file() and not _is_demo(out, src, bits):
        if not cached:
            fail(f"--out {out} holds another artifact than the {bits}-bit demo (or a damaged one): choose another folder")
        import shutil
        shutil.rmtree(out)                   # our own cache folder, damaged: exported again below
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
        moe_strategy=None, stats=False, max_memory=None, votes=1, speculate="off", draft_tokens=4, draft=None)


@app.command()
def verify(artifact: Path = typer.Argument(..., help="Artifact folder.")):
    """Check an artifact's files (graphs, data, tokenizer, template, config, the manifest itself)
    against the sha256 sums in its manifest."""
    from .artifact import ArtifactError, unchecked, verify as do_verify
    try:
        m = do_verify(artifact)
        skipped = unchecked(artifact, m)
    except ArtifactError as e:
        fail(str(e))
    n = len(m["files"]) + len(m.get("text_files", {})) + ("manifest_sha256" in m)
    typer.echo(f"{artifact}: ok ({m['architecture']}, {n} files verified)")
    if skipped:          # exported before edgert hashed them, or added since: said, not passed over
        typer.echo(f"{artifact}: not checked (the manifest records no sha256 for them): {', '.join(skipped)}")


@app.command()
def serve(
    artifact: Path = typer.Argument(..., help="Artifact folder made by `edgert export`."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default; elsewhere, set --api-key)."),
    port: int = typer.Option(8080, min=0, max=65535, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, envvar="EDGERT_API_KEY", show_envvar=True,
                                          help="Require `Authorization: Bearer KEY` (all but / and /health)."),
    parallel: int = typer.Option(1, min=1, max=64, help="Slots: sequences decoded together, one batched step for all."),
    context: Optional[int] = typer.Option(None, min=1, help="KV cache size in tokens per slot [default: min(model, 4096)]."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads [default: the fast physical cores]."),
    max_memory: Optional[str] = typer.Option(None, help=MAX_MEMORY_HELP),
    cors_origin: Optional[list[str]] = typer.Option(None, help="Allow browser requests from this origin (repeatable) [default: CORS off]."),
    queue: Optional[int] = typer.Option(None, min=0, help="Requests that may wait for a slot; more get 429 [default: 8 x --parallel]."),
    timeout: float = typer.Option(600.0, min=1.0, help="Longest time a request may take, seconds (then it ends with finish_reason length)."),
):
    """OpenAI-compatible HTTP server (/v1/chat/completions with streaming, reasoning and tool calls,
    /v1/completions, /v1/models, /health, /metrics, /tokenize, /detokenize) and a chat page at /.
    Needs the [serve] extra: pip install 'edgert[serve]'."""
    from .artifact import ArtifactError, read_manifest
    try:
        from .serve import serve as do_serve
    except ImportError as e:
        fail(str(e))
    try:
        read_manifest(artifact)
    except ArtifactError as e:
        fail(str(e))
    code = do_serve(artifact, host=host, port=port, api_key=api_key, parallel=parallel, context=context,
                    threads=threads, max_memory=max_memory, cors_origins=cors_origin or (), max_queue=queue,
                    timeout=timeout)
    raise typer.Exit(code)


def format_expert_report(r: dict) -> str:
    lines = [f"parameters {r['parameters'] / 1e6:.1f}M, active per token {r['active_parameters_per_token'] / 1e6:.1f}M"
             + (f", graph {r['strategy']}" if r["strategy"] != "default" else "")]
    for layer, counts in (r.get("expert_usage") or {}).items():
        c = sorted(enumerate(counts), key=lambda t: -t[1])
        total = sum(counts) or 1
        top = " ".join(f"#{e}:{n / total:.0%}" for e, n in c[:4] if n)
        lines.append(f"  layer {layer:>3}: {sum(1 for n in counts if n)}/{len(counts)} experts used; busiest {top}")
    return "\n".join(lines)


def _bench_json_value(args: list[str]) -> list[str]:
    """`edgert bench --json` without a FILE means stdout: give the option its "-" (typer has no
    optional option values); `--json -` says so itself."""
    if args[:1] == ["bench"] and "--json" in args:
        i = args.index("--json")
        if i + 1 == len(args) or args[i + 1].startswith("-") and args[i + 1] != "-":
            return args[: i + 1] + ["-"] + args[i + 1:]
    return args


def main():
    # a closed stdin/stdout/stderr (`<&-`, `>&-`): read nothing, write nowhere, rather than fail on None
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode))
    try:
        try:
            code = _run(_bench_json_value(sys.argv[1:]))
        finally:
            sys.stdout.flush()        # here, where a failed write can still be reported
    except OSError as e:              # the output could not be written (a full disk, /dev/full, a closed pipe)
        if isinstance(e, BrokenPipeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())    # no second error at exit
            sys.exit(141)
        try:
            sys.stderr.write(f"edgert: error: cannot write the output: {e.strerror or e}\n")
        except OSError:
            pass
        sys.exit(1)
    sys.exit(code)


def _run(args: list[str]) -> int:
    """The app without click's standalone mode: its usage errors (four lines: usage, try --help, a
    blank, the error) become one line; the exit status is what the command or click chose."""
    click = sys.modules[typer.BadParameter.__module__]      # click's exceptions (or typer's copy of click)
    try:
        code = app(args=args, standalone_mode=False)       # typer.Exit, --help, Ctrl-C (130): a status
    except getattr(click, "NoArgsIsHelpError", ()) as e:
        e.show()                                             # `edgert` alone: the help (click >= 8.2)
        return e.exit_code
    except click.ClickException as e:
        ctx = getattr(e, "ctx", None)
        see = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        typer.echo(f"edgert: error: {' '.join(e.format_message().split())}{see}", err=True)
        return e.exit_code
    except typer.Abort:
        typer.echo("edgert: error: aborted", err=True)
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    main()
