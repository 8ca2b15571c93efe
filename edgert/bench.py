"""`edgert bench`: what an artifact (or a synthetic model of a real shape) does on this device.

Prefill and decode speed with synthetic tokens (no tokenizer, no prompt file), time to first
token, load time, peak memory, and the decode roofline: a decode step reads every weight it
uses once, so (bytes read per token) / (measured memory bandwidth) is a ceiling on decode
speed; the % of it reached says how much a faster kernel could still win on this device.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .artifact import bytes_per_weight, read_json, read_manifest
from .generate import Sampling, Stats, generate
from .device import available_memory, kv_bytes, state_bytes
from .model import Model

# ---- the device ----------------------------------------------------------------------------

# /proc/cpuinfo flag -> the name we report (x86 "flags", ARM "Features")
_X86_FEATURES = {"avx2": "avx2", "avx512f": "avx512", "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni",
                 "amx_int8": "amx"}
_ARM_FEATURES = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2"}


def cpu_info(text: str | None = None) -> dict:
    """CPU model, the SIMD features that matter for int4/int8 kernels, and physical cores,
    from /proc/cpuinfo (x86 or ARM layout)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
    fields: dict[str, str] = {}
    cores, processors = set(), 0
    physical = None
    for line in text.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "processor":
            processors += 1
        elif key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
        fields.setdefault(key, value)
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    names = {**_X86_FEATURES, **_ARM_FEATURES}
    model = fields.get("model name") or fields.get("Model") or fields.get("Hardware") or ""
    if not model and "CPU part" in fields:      # ARM without a name: implementer/part ids
        model = f"ARM implementer {fields.get('CPU implementer')} part {fields['CPU part']}"
    return {"model": model or platform.processor() or platform.machine(),
            "features": sorted({names[f] for f in flags if f in names}),
            "cores": len(cores) or processors or os.cpu_count() or 1}


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def memory_bandwidth(threads: int, seconds: float = 1.0, size: int = 512 * 2**20) -> float:
    """Read bandwidth in GB/s: `threads` threads each reduce their part of a buffer far larger than
    the caches (numpy releases the GIL), repeated for ~`seconds`; the best pass counts, as in STREAM.
    The buffer takes at most a quarter of the free memory (a Pi with the model loaded)."""
    size = min(size, (available_memory() or (size * 4, ''))[0] // 4)
    buf = np.ones(size // 4, np.float32)
    parts = np.array_split(buf, threads)
    best, t_end = 0.0, time.perf_counter() + seconds
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.max, parts))                 # page the buffer in
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            list(pool.map(np.max, parts))
            best = max(best, buf.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


# ---- what a decode step reads ---------------------------------------------------------------

def decode_bytes_per_token(manifest: dict, config: dict, data_bytes: int, position: float,
                           graph: str | None = None) -> float:
    """Bytes one decode step reads: the data file minus what a single token does not touch (the
    embedding table but one row, unless a tied lm_head reads all of it; the idle experts; the
    rotary tables but one row), plus the KV cache up to `position` and a hybrid model's recurrent state."""
    m, q = manifest["model"], manifest["quantization"]
    bs, hidden, vocab, hd = q.get("block_size", 32), m["hidden"], m["vocab"], m["head_dim"]
    embed = vocab * hidden * bytes_per_weight(q["embed"], bs)
    shared = bool(config.get("tie_word_embeddings")) and q["embed"] == q["lm_head"] != 32
    unread = 0 if shared else embed * (1 - 1 / vocab)
    unread += m.get("idle_expert_parameters", 0) * bytes_per_weight(q["mlp"], m.get("expert_block_size", bs))
    el = 2 if q.get("kv_cache") == "fp16" else 4       # the rotary tables: fp16 with an fp16 cache, else fp32
    unread += 2 * el * (manifest["context_length"] - 1) * hd // 2
    kv = kv_bytes(manifest, 1, graph) * position
    state = 4 * state_bytes(manifest)       # hybrid models: the step reads and writes the state, the copy back again
    return data_bytes - unread + kv + state


# ---- the measurement -------------------------------------------------------------------------

def _progress(message: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{message}")
        sys.stderr.flush()


def _spread(result: dict, key: str, values: list[float]) -> None:
    result[key], result[key + "_min"], result[key + "_max"] = statistics.median(values), min(values), max(values)


def bench_context(prompt_tokens: int, gen_tokens: int, context: int | None, most: int | None = None) -> int:
    """The KV cache a bench run allocates (checked before anything is loaded or built): --context, or
    what the run needs (at least 256, at most `most`, the artifact's own context)."""
    if gen_tokens < 2:
        raise ValueError("--gen-tokens must be at least 2: the first token comes from prefill, decode is timed from the second")
    if context and context < prompt_tokens + gen_tokens:
        raise ValueError(f"--context {context} cannot hold --prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens}")
    if context:
        return context
    need = prompt_tokens + gen_tokens
    if most is not None and need > most:
        raise ValueError(f"--prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens} do not fit this artifact's "
                         f"{most}-token context")
    return min(max(need + 1, 256), most or 1 << 62)


def batch_decode(model: Model, ids: list[int], steps: int, n: int) -> float:
    """Aggregate decode tok/s of n sequences stepped together (one forward per step), after one
    prompt whose rows every sequence shares (copied, as `run --votes` does)."""
    from .engine import Engine
    eng = Engine(model)
    seqs, logits = eng.open_many(ids, n)
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        logits = eng.step({s: [int(np.argmax(logits[s]))] for s in seqs})
    elapsed = time.perf_counter() - t0
    for s in seqs:
        eng.close(s)
    return n * (steps - 1) / elapsed


def bench(path, prompt_tokens: int = 128, gen_tokens: int = 64, repeat: int = 3, threads: int | None = None,
          context: int | None = None, seed: int = 0, strategy: str | None = None, probe_seconds: float = 1.0,
          max_memory=None, batch: int = 1) -> dict:
    path = Path(path)
    context = bench_context(prompt_tokens, gen_tokens, context, read_manifest(path)["context_length"])
    cpu = cpu_info()
    _progress("bench: loading")
    t0 = time.perf_counter()
    model = Model(path, context=context, threads=threads, strategy=strategy, max_memory=max_memory, slots=batch)
    load_s = time.perf_counter() - t0
    special = model.manifest["special_tokens"]
    avoid = {i for i in [special.get("bos"), special.get("pad"), *(special.get("eos") or [])] if i is not None}
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in rng.integers(0, model.vocab, prompt_tokens * 2) if int(i) not in avoid][:prompt_tokens]
    runs = []
    model.track_experts()                            # only the untimed warm-up round counts expert use
    for r in range(repeat + 1):                      # the first round warms up (page-in, prepacking)
        _progress(f"bench: round {r}/{repeat}" + (" (warm-up)" if r == 0 else f", last decode {runs[-1].decode_tok_s:.1f} tok/s"))
        stats = Stats()
        for _ in generate(model, ids, gen_tokens, Sampling(0.0), stats=stats):
            pass
        runs.append(stats)
        if len(runs) == 1:
            experts = model.expert_report()
            model.track_experts(False)
    runs = runs[1:]
    together = [batch_decode(model, ids, gen_tokens, batch) for _ in range(repeat)] if batch > 1 else []
    rss = peak_rss_mb()                              # before the probe's buffer
    _progress("bench: memory bandwidth")
    bandwidth = memory_bandwidth(model.threads, probe_seconds)
    _progress("")
    m = model.manifest
    config = read_json(path, "config.json")
    data_bytes = (path / "model.onnx.data").stat().st_size
    per_token = decode_bytes_per_token(m, config, data_bytes, prompt_tokens + gen_tokens / 2, model.strategy)
    result = {
        "artifact": str(path), "architecture": m["architecture"], "parameters": m["model"]["parameters"],
        "active_parameters_per_token": experts["active_parameters_per_token"], "quantization": m["quantization"],
        "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "threads": model.threads, "repeat": repeat,
        "strategy": model.strategy, "kv_cache": model.kv_cache,
    }
    _spread(result, "prefill_tok_s", [r.prefill_tok_s for r in runs])
    _spread(result, "decode_tok_s", [r.decode_tok_s for r in runs])
    _spread(result, "ttft_s", [r.prefill_s for r in runs])      # prompt in, logits of the first token out
    if together:
        result["batch"] = batch
        _spread(result, "batch_decode_tok_s", together)           # all sequences' tokens per second
        result["batch_speedup"] = result["batch_decode_tok_s"] / result["decode_tok_s"]
    roofline = bandwidth * 1e9 / per_token
    result.update({
        "ms_per_token": 1000 / result["decode_tok_s"], "load_s": load_s, "peak_rss_mb": rss,
        "model_mb": sum(f["bytes"] for f in m["files"].values()) / 1e6,
        "bits_per_weight": 8 * data_bytes / m["model"]["parameters"],
        "bytes_per_token_mb": per_token / 1e6, "bandwidth_gbs": bandwidth, "roofline_tok_s": roofline,
        "roofline_pct": 100 * result["decode_tok_s"] / roofline,
        "cpu": cpu["model"], "cpu_features": cpu["features"], "cores": cpu["cores"],
        "onnxruntime": ort.__version__, "machine": platform.machine(), "python": platform.python_version(),
        "expert_usage": experts.get("expert_usage"),
    })
    return result


def table(r: dict) -> str:
    arch = f"{r['architecture']}, {r['parameters'] / 1e6:.1f}M parameters"
    if r["active_parameters_per_token"] != r["parameters"]:
        arch += f", {r['active_parameters_per_token'] / 1e6:.1f}M active per token (graph {r['strategy']})"

    def spread(key, fmt, unit):
        return f"{r[key]:{fmt}} {unit} (min {r[key + '_min']:{fmt}}, max {r[key + '_max']:{fmt}})"
    rows = [("artifact", r.get("synthetic") and f"synthetic {r['synthetic']} ({r['artifact']})" or r["artifact"]),
            ("architecture", arch),
            ("size", f"{r['model_mb']:.0f} MB, {r['bits_per_weight']:.2f} bits per weight, {r.get('kv_cache', 'fp32')} KV cache"),
            ("prompt / generated", f"{r['prompt_tokens']} / {r['gen_tokens']} tokens, {r['threads']} threads, "
                                   f"median of {r['repeat']}"),
            ("prefill", spread("prefill_tok_s", ".1f", "tok/s")),
            ("decode", spread("decode_tok_s", ".1f", "tok/s") + f", {r['ms_per_token']:.1f} ms/token"),
            ("first token", spread("ttft_s", ".3f", "s")),
            *([(f"decode x{r['batch']}", spread("batch_decode_tok_s", ".1f", "tok/s") +
                f" together, {r['batch_speedup']:.2f}x one sequence")] if r.get("batch") else []),
            ("roofline", f"{r['roofline_tok_s']:.1f} tok/s = {r['bandwidth_gbs']:.1f} GB/s / "
                         f"{r['bytes_per_token_mb']:.0f} MB per token; decode reaches {r['roofline_pct']:.0f}%"),
            ("load", f"{r['load_s']:.2f} s"), ("peak RSS", f"{r['peak_rss_mb']:.0f} MB"),
            ("cpu", f"{r['cpu']} ({r['cores']} cores; {' '.join(r['cpu_features']) or 'no int8 SIMD features'})"),
            ("onnxruntime", f"{r['onnxruntime']} on {r['machine']}")]
    return "\n".join(f"{k:<20} {v}" for k, v in rows)


def synthetic_artifact(shape: str, bits: int, context: int, kv_cache: str | None = None) -> Path:
    """The cached synthetic artifact of a built-in shape (with this KV cache, else the export's
    default), built first when needed. The build runs in a child process, so its memory does not
    count in this process's peak RSS."""
    from concurrent.futures import ProcessPoolExecutor

    from edgert_export import ExportError
    from edgert_export.synthetic import SyntheticError, build
    _progress(f"bench: building the synthetic {shape} (int{bits}" + (f", {kv_cache} KV cache)" if kv_cache else ")"))
    try:
        with ProcessPoolExecutor(1) as pool:
            return pool.submit(build, shape, bits, context, kv_cache=kv_cache).result()
    except (SyntheticError, ExportError) as e:
        raise ValueError(str(e)) from None
