"""The side-by-side suite: edgert against every peer, interleaved, medians and ratios -> RESULTS.md.

    python benchmarks/suite.py --work DIR [--shapes qwen2.5-0.5b,r1-distill-qwen-1.5b,qwen3-moe-small]
                               [--repeat 5] [--threads 2] [--runners SUBSTR,...] [--quick] [--prepare-only]
                               [--results benchmarks/RESULTS.md] [--json benchmarks/results.json]

For each shape it prepares (and caches in DIR) a random-weight checkpoint of the real shape, the
edgert exports, llama.cpp GGUFs (Q4_0, Q4_K_M, Q8_0), onnxruntime-genai models (int4, int8),
optimum-onnx models (fp32, dynamic int8; in a venv of their own, made here), then measures every
runner round-robin: each round starts one fresh process per runner (warm-up pass, then one timed
prefill of the same prompt ids + n_decode greedy steps), the order reversed every other round.
A runner that refuses (not installed, unsupported architecture, not enough memory) gets a row
with its one-line reason.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ROOT = Path(__file__).resolve().parents[1]
import checkpoints  # noqa: E402
import hf_peers  # noqa: E402
import machine  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import weight_bytes  # noqa: E402

SHAPES = ("qwen2.5-0.5b", "r1-distill-qwen-1.5b", "qwen3-moe-small")
BASELINE = "edgert int4"
WORKER_TIMEOUT_S = 1200


@dataclass
class Prepared:
    """A runner ready to measure: what the worker needs, plus what the table shows."""
    name: str
    kind: str = ""
    path: str = ""
    python: str = sys.executable
    options: dict = field(default_factory=dict)
    disk_bytes: int = 0            # the model as stored
    bytes_per_token: int = 0       # weight bytes a decode step reads (weight_bytes.py)
    notes: str = ""
    refused: str = ""              # one line: why this runner has no numbers


# --------------------------------------------------------------------------
# preparation
# --------------------------------------------------------------------------


def checkpoint(shape: str, work: Path) -> Path:
    path = work / "ckpt" / shape
    if not (path / "config.json").is_file():
        checkpoints.make_checkpoint(shape, path)
    return path


def export_edgert(src: Path, out: Path, bits: int = 4, embed_bits: int = 8, block_size: int | None = None,
                  kv_cache: str | None = None, recipe: str | None = None) -> tuple[Path, float]:
    """Export once (cached); returns the artifact and the export's wall time."""
    from edgert_export import export as do_export
    # cached per exporter source, options and checkpoint: a changed exporter exports again
    sources = sorted((ROOT / "export").rglob("*.py"))
    options = (bits, embed_bits, block_size, kv_cache) + ((recipe,) if recipe else ())
    stamp = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + repr(options).encode()
                           + (src / "config.json").read_bytes()).hexdigest()
    # beside OUT, not in it: `export --force` replaces only a folder holding nothing but what an export writes
    stamp_file, secs_file = out.parent / f".{out.name}.export_stamp", out.parent / f".{out.name}.export_seconds"
    if not (out / "edgert.json").is_file() or not stamp_file.is_file() or stamp_file.read_text() != stamp:
        for legacy in ("export_stamp", "export_seconds"):      # where earlier versions of this script kept them
            (out / legacy).unlink(missing_ok=True)
        t0 = time.time()
        do_export(src, out, bits=bits, force=True, progress=False, embed_bits=embed_bits, block_size=block_size,
                  kv_cache=kv_cache, **({"recipe": recipe} if recipe else {}))
        secs_file.write_text(str(time.time() - t0))
        stamp_file.write_text(stamp)
    return out, float(secs_file.read_text()) if secs_file.is_file() else 0.0


def _edgert(src, work, shape, bits):
    """The default export at every size. (Until 2026-12-05 shapes over 4B parameters were rounded to
    nearest to save GPTQ's calibration pass, "the same bytes and speed"; but without calibration an
    int8 KV cache has no per-channel scales, hence no GroupQueryAttention twin, so those rows timed
    the standard-op attention the default export does not use: gpt-oss-20b-8x 1.04x slower.)"""
    art, secs = export_edgert(src, work / "edgert" / f"{shape}-int{bits}", bits=bits)
    return Prepared("", "edgert", str(art), disk_bytes=peers._dir_size(art),
                    bytes_per_token=weight_bytes.onnx_bytes_per_token(art, _expert_share(src)),
                    notes=f"export {secs:.0f} s")


def _genai(src, work, shape, precision):
    r = peers.prepare_genai(src, work / "peers" / shape, precision=precision)
    return Prepared("", "genai", str(r.model_dir), disk_bytes=r.info["bytes"],
                    bytes_per_token=weight_bytes.onnx_bytes_per_token(r.model_dir, _expert_share(src)),
                    notes=f"build {r.info['convert_s']:.0f} s")


def _llamacpp(src, work, shape, qtype):
    if qtype == "MXFP4_MOE" and _config(src).get("quantization_config", {}).get("quant_method") != "mxfp4":
        return None     # llama.cpp's own gpt-oss form: the checkpoint's MXFP4 experts kept, the rest Q8_0
    r = peers.prepare_llamacpp(src, work / "peers" / shape, qtype=qtype, src_dir=work)
    r.close()
    gguf = work / "peers" / shape / f"llamacpp-{qtype}.gguf"
    return Prepared("", "llamacpp", str(gguf), disk_bytes=r.info["bytes"],
                    bytes_per_token=weight_bytes.gguf_bytes_per_token(gguf, _expert_share(src)),
                    notes=f"convert {r.info['convert_s']:.0f} s + quantize {r.info.get('quantize_s', 0):.0f} s")


_OPTIMUM_FAILED: dict[str, str] = {}     # shape -> why its fp32 export failed (int8 starts from it)


def _optimum(src, work, shape, quant):
    if shape in _OPTIMUM_FAILED:
        raise RuntimeError(_OPTIMUM_FAILED[shape])
    py = hf_peers.ensure_venv(work / "venvs", "optimum", hf_peers.OPTIMUM_VENV)
    try:
        path, meta = hf_peers.prepare_optimum(src, work / "optimum" / shape, py, _params(src), quant)
    except RuntimeError as e:
        _OPTIMUM_FAILED[shape] = str(e)
        raise
    return Prepared("", "optimum", str(path), python=str(py), disk_bytes=meta["bytes"],
                    bytes_per_token=weight_bytes.onnx_bytes_per_token(path, _expert_share(src)),
                    notes=f"export {meta['convert_s']:.0f} s")


def _transformers(src, work, shape, _):
    config = _config(src)
    return Prepared("", "transformers", str(src), disk_bytes=peers._dir_size(src),
                    bytes_per_token=weight_bytes.hf_bytes_per_token(config, checkpoints.active_param_count(config)),
                    notes="bf16 checkpoint, run in fp32")


def _config(src: Path) -> dict:
    return json.loads((src / "config.json").read_text())


def _params(src: Path) -> int:
    return checkpoints.param_count(_config(src))


def _expert_share(src: Path) -> float:
    return weight_bytes.expert_share(_config(src))


# table order; the first is the baseline of every ratio
RUNNERS = [(BASELINE, _edgert, 4), ("edgert int8", _edgert, 8),
           ("onnxruntime-genai int4", _genai, "int4"), ("onnxruntime-genai int8", _genai, "int8"),
           ("llama.cpp Q4_0", _llamacpp, "Q4_0"), ("llama.cpp Q4_K_M", _llamacpp, "Q4_K_M"),
           ("llama.cpp Q8_0", _llamacpp, "Q8_0"), ("llama.cpp MXFP4_MOE", _llamacpp, "MXFP4_MOE"),
           ("optimum-onnx fp32", _optimum, "fp32"), ("optimum-onnx int8 dynamic", _optimum, "int8"),
           ("transformers fp32", _transformers, None)]


def prepare_all(shape: str, work: Path, wanted) -> tuple[Path, list[Prepared]]:
    src = checkpoint(shape, work)
    out = []
    for label, fn, arg in RUNNERS:
        if not wanted(label):
            continue
        t0 = time.perf_counter()
        try:
            p = fn(src, work, shape, arg)
            if p is None:       # a runner for other checkpoints only
                continue
            p.name = label
        except (RuntimeError, ValueError, OSError) as e:
            p = Prepared(label, refused=str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__)
        print(f"[{shape}] {label}: " + (f"refused: {p.refused}" if p.refused else
              f"ready ({time.perf_counter() - t0:.0f} s, {p.disk_bytes / 1e6:.0f} MB)"), flush=True)
        out.append(p)
    return src, out


# --------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------


def run_worker(p: Prepared, prompt: list[int], n_decode: int, threads: int) -> dict:
    """One fresh process: load, warm up, one timed round."""
    spec = {"kind": p.kind, "path": p.path, "name": p.name, "options": p.options, "prompt": prompt,
            "n_decode": n_decode, "threads": threads}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    try:
        r = subprocess.run([p.python, str(HERE / "runners.py"), json.dumps(spec)], capture_output=True, text=True,
                           timeout=WORKER_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {WORKER_TIMEOUT_S} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    tail = [ln for ln in r.stderr.splitlines() if ln.strip()]
    why = (" (SIGILL: built for an instruction this CPU lacks? llama.cpp's GGML_AVX_VNNI on an AVX-512-VNNI-only "
           "CPU such as AMD Zen 4: see benchmarks/README.md)") if r.returncode == -4 else ""
    return {"error": f"worker exited {r.returncode}{why}: {tail[-1][:300] if tail else 'no output'}"}


def interleave(runners: list[Prepared], prompt, n_decode, repeat, threads, shape) -> dict[str, list[dict]]:
    live = [p for p in runners if not p.refused]
    rounds: dict[str, list[dict]] = {p.name: [] for p in live}
    for i in range(repeat):
        for p in (live if i % 2 == 0 else live[::-1]):
            if p.refused:
                continue
            c0 = peers._cpu_times()
            m = run_worker(p, prompt, n_decode, threads)
            if "error" in m:
                p.refused = f"failed while measuring: {m['error']}"
                print(f"[{shape}] {p.name}: {p.refused}", flush=True)
                continue
            m["other_load"] = peers.other_load(c0, peers._cpu_times())
            rounds[p.name].append(m)
            print(f"[{shape}] round {i + 1}/{repeat} {p.name:>28}: prefill {m['prefill_tok_s']:8.1f}  "
                  f"decode {m['decode_tok_s']:7.1f} tok/s  peak {m['peak_rss_mb']:6.0f} MB  "
                  f"(others {m['other_load']:.0%})", flush=True)
    return rounds


def summarise(runners: list[Prepared], rounds) -> list[dict]:
    rows = []
    for p in runners:
        ms = rounds.get(p.name, [])
        row = {"name": p.name, "kind": p.kind, "disk_mb": p.disk_bytes / 1e6, "notes": p.notes}
        if p.refused or not ms:
            row["refused"] = p.refused or "no rounds"
            rows.append(row)
            continue
        pre = [m["prefill_tok_s"] for m in ms]
        dec = [m["decode_tok_s"] for m in ms]
        row.update(prefill_tok_s=statistics.median(pre), decode_tok_s=statistics.median(dec),
                   prefill_range=[min(pre), max(pre)], decode_range=[min(dec), max(dec)],
                   peak_rss_mb=max(m["peak_rss_mb"] for m in ms), load_s=statistics.median(m["load_s"] for m in ms),
                   other_load_median=statistics.median(m["other_load"] for m in ms), rounds=len(ms),
                   bytes_per_token_mb=p.bytes_per_token / 1e6)
        rows.append(row)
    base = next((r for r in rows if r["name"] == BASELINE and "refused" not in r), None)
    for r in rows:
        if base and "refused" not in r:
            r["prefill_vs_edgert"] = r["prefill_tok_s"] / base["prefill_tok_s"]
            r["decode_vs_edgert"] = r["decode_tok_s"] / base["decode_tok_s"]
    return rows


def add_roofline(rows: list[dict], bandwidth: float) -> None:
    """Decode roofline per measured row: bandwidth / the weight bytes its decode step reads."""
    for r in rows:
        if r.get("bytes_per_token_mb"):
            r["roofline_tok_s"] = bandwidth / (r["bytes_per_token_mb"] * 1e6)
            r["roofline_pct"] = 100 * r["decode_tok_s"] / r["roofline_tok_s"]


def run_shape(shape: str, args, wanted) -> dict:
    src, runners = prepare_all(shape, args.work, wanted)
    config = json.loads((src / "config.json").read_text())
    prompt = peers.make_prompt(src, args.prompt_len, args.seed)
    load_before = os.getloadavg()
    t0 = time.time()
    rounds = interleave(runners, prompt, args.decode, args.repeat, args.threads, shape)
    return {"shape": shape, "architecture": config["architectures"][0],
            "params": checkpoints.param_count(config), "active_params": checkpoints.active_param_count(config),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "measure_s": round(time.time() - t0), "rows": summarise(runners, rounds),
            "rounds": rounds}


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="cache folder: checkpoints, exports, peers, venvs")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated [default: {','.join(SHAPES)}; "
                    f"any of {', '.join(checkpoints.SHAPES)}]")
    ap.add_argument("--runners", default="", help="only runners whose name contains one of these (comma-separated)")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds; medians are reported")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt ids")
    ap.add_argument("--prepare-only", action="store_true", help="build and cache every model, measure nothing")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 16 decode tokens, 0.5B shape only")
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="markdown report to write")
    ap.add_argument("--json", type=Path, default=HERE / "results.json", help="JSON results to write")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeat, args.decode = 1, 16
        if args.shapes == ",".join(SHAPES):
            args.shapes = SHAPES[0]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in checkpoints.SHAPES]
    if bad:
        ap.error(f"unknown shape {bad[0]!r}; choose from {', '.join(checkpoints.SHAPES)}")
    if args.repeat < 1 or args.threads < 1 or args.prompt_len < 1 or args.decode < 1:
        ap.error("--repeat, --threads, --prompt-len and --decode must be >= 1")
    args.work = args.work.resolve()
    try:
        args.work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        ap.error(f"--work {args.work}: {e.strerror}")
    filters = [f.strip().lower() for f in args.runners.split(",") if f.strip()]

    def wanted(label: str) -> bool:
        return label == BASELINE or not filters or any(f in label.lower() for f in filters)

    if args.prepare_only:
        for s in shapes:
            prepare_all(s, args.work, wanted)
        return 0
    started = datetime.datetime.now(datetime.timezone.utc)
    bw_before = machine.read_bandwidth(args.threads)
    print(f"memory read bandwidth ({args.threads} threads): {bw_before / 1e9:.1f} GB/s", flush=True)
    results = []
    for s in shapes:
        results.append(run_shape(s, args, wanted))
        # written after every shape: a long run that is stopped still leaves its finished shapes
        write_report(args, argv, started, [bw_before / 1e9, None], results)
    bw_after = machine.read_bandwidth(args.threads)
    write_report(args, argv, started, [bw_before / 1e9, bw_after / 1e9], results)
    print(f"wrote {args.results} and {args.json}")
    return 0


def write_report(args, argv, started, bandwidth_gbs, results) -> None:
    # others' load can only slow the probe down: the best of the probes is the device's figure
    for s in results:
        add_roofline(s["rows"], max(b for b in bandwidth_gbs if b) * 1e9)
    rep = {
        "command": "python benchmarks/suite.py " + " ".join(shlex.quote(a) for a in argv),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": args.threads, "prompt_len": args.prompt_len, "decode": args.decode, "repeat": args.repeat,
        "bandwidth_gbs": bandwidth_gbs,
        "machine": machine.describe(), "versions": versions(args.work), "shapes": results,
    }
    args.json.write_text(json.dumps(rep, indent=2) + "\n")
    args.results.write_text(report.markdown(rep))


def versions(work: Path) -> dict:
    v = {m: peers._version(m) for m in ("onnxruntime", "onnxruntime_genai", "llama_cpp_python", "torch",
                                        "transformers", "numpy", "edgert")}
    v["python"] = platform.python_version()
    try:
        v["edgert_commit"] = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    venv_py = work / "venvs" / "optimum" / "bin" / "python"
    if venv_py.exists():
        v["optimum venv"] = hf_peers.venv_versions(venv_py, ["optimum-onnx", "optimum", "transformers", "torch",
                                                             "onnxruntime"])
    return v


if __name__ == "__main__":
    sys.exit(main())
