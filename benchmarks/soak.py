"""Long reasoning: one conversation generating 8k+ tokens. RSS must not grow beyond the KV cache
rows filled, decode speed may fall only as attention reads more positions, and generation
must stop cleanly, with its reason, when the context is full.

    python benchmarks/soak.py --work DIR [--context 8704] [--every 256] [--threads 2] [--artifact ART] [--json OUT]

Without --artifact, the real stories260K (bundled) is exported with its position limit raised to
--context (rotary extrapolates; the text is not the point), and generates with --ignore-eos from
"Once upon a time" until the context is full. The run is a child process (`soak.py --_child`)
sampling its own /proc/self/status every --every tokens. Afterwards `edgert run` is called at a
small --context to check what the CLI says when the context fills (stderr line, --json stop_reason).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from memory import MB, ROOT, proc_status  # noqa: E402

PROMPT = "Once upon a time"
WARM_UP = 1024                # tokens after which the arena and caches have settled


def long_stories(work: Path, context: int) -> Path:
    """stories260K with max_position_embeddings = context, exported int8 (cached)."""
    from edgert_export import export
    from edgert_export.artifact import BUNDLED_MODEL
    out = work / f"stories260K-ctx{context}"
    if not (out / "edgert.json").is_file():
        src = work / f"stories260K-src-ctx{context}"
        shutil.copytree(BUNDLED_MODEL, src, dirs_exist_ok=True)
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "max_position_embeddings": context}, indent=2))
        export(src, out, bits=8, context=context, force=True, progress=False)
    return out


def child(args) -> None:
    import edgert
    llm = edgert.load(args.artifact, context=args.context, threads=args.threads)
    samples = [{"tokens": 0, "s": 0.0, **proc_status()}]
    t0 = time.perf_counter()
    for n, _ in enumerate(llm.generate(PROMPT, raw=True, max_tokens=10 * args.context, ignore_eos=True,
                                       temperature=0.0), 1):
        if n % args.every == 0:
            samples.append({"tokens": n, "s": time.perf_counter() - t0, **proc_status()})
    st = llm.stats
    samples.append({"tokens": st.generated, "s": time.perf_counter() - t0, **proc_status()})
    print(json.dumps({"samples": samples, "stop_reason": st.stop_reason, "prompt_tokens": st.prompt_tokens,
                      "generated": st.generated, "decode_tok_s": st.decode_tok_s, "manifest": llm.manifest}))


def summarize(run: dict, context: int) -> dict:
    """Growth is measured from after loading to the end, against the cache rows filled by then: numpy
    asks for transparent huge pages on large arrays, so the cache becomes resident in 2 MiB steps
    (a jump at the first token, then stairs), not row by row; by the end every filled row counts."""
    from edgert.device import kv_bytes
    s = run["samples"]
    warm = next((x for x in s if x["tokens"] >= WARM_UP), s[-1])
    filled = kv_bytes(run["manifest"], min(context, run["prompt_tokens"] + run["generated"] - 1)) / MB
    windows = [{"from": a["tokens"], "to": b["tokens"], "tok_s": (b["tokens"] - a["tokens"]) / (b["s"] - a["s"])}
               for a, b in zip(s, s[1:]) if b["tokens"] > a["tokens"] and a["tokens"] > 0]
    growth = s[-1]["rss"] - s[0]["rss"]
    return {"context": context, "generated": run["generated"], "prompt_tokens": run["prompt_tokens"],
            "stop_reason": run["stop_reason"], "kv_cache_mb": kv_bytes(run["manifest"], context) / MB,
            "rss_after_load_mb": s[0]["rss"], "rss_after_warm_up_mb": warm["rss"], "rss_max_mb": max(x["rss"] for x in s),
            "rss_end_mb": s[-1]["rss"], "growth_mb": growth, "kv_filled_mb": filled, "excess_growth_mb": growth - filled,
            "decode_tok_s": run["decode_tok_s"], "windows": windows, "samples": s}


def cli_stop_check(artifact: Path, threads: int) -> dict:
    """What `edgert run` says when the context fills: the stderr line and --json's stop_reason."""
    base = [sys.executable, "-m", "edgert.cli", "run", str(artifact), PROMPT, "--raw", "--ignore-eos",
            "--max-tokens", "100000", "--context", "64", "--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    text = subprocess.run(base, capture_output=True, text=True, env=env)
    js = subprocess.run(base + ["--json"], capture_output=True, text=True, env=env)
    return {"exit": [text.returncode, js.returncode], "stderr": text.stderr.strip().splitlines()[-1:],
            "json_stop_reason": json.loads(js.stdout)["stop_reason"] if js.returncode == 0 else None}


def report(r: dict, cli: dict) -> None:
    print(f"one conversation: {r['prompt_tokens']} prompt + {r['generated']} generated tokens, context {r['context']} "
          f"(KV cache {r['kv_cache_mb']:.1f} MB), stop_reason {r['stop_reason']!r}")
    print(f"RSS MB: after load {r['rss_after_load_mb']:.1f} | after {WARM_UP} tokens {r['rss_after_warm_up_mb']:.1f} | "
          f"max {r['rss_max_mb']:.1f} | end {r['rss_end_mb']:.1f}")
    print(f"growth after load {r['growth_mb']:.1f} MB, of which KV cache rows filled {r['kv_filled_mb']:.1f} MB: "
          f"excess {r['excess_growth_mb']:+.1f} MB")
    step = max(1, len(r["windows"]) // 8)
    print("decode tok/s by position: " + ", ".join(f"{w['from']}-{w['to']}: {w['tok_s']:.0f}" for w in r["windows"][::step]))
    print(f"CLI at --context 64: exit codes {cli['exit']}, --json stop_reason {cli['json_stop_reason']!r}, "
          f"stderr: {' / '.join(cli['stderr'])}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-out"))
    ap.add_argument("--context", type=int, default=8192 + 512)
    ap.add_argument("--every", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--artifact", type=Path, help="soak this artifact instead (its context must reach --context)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        return child(args)
    args.work.mkdir(parents=True, exist_ok=True)
    artifact = args.artifact or long_stories(args.work, args.context)
    cmd = [sys.executable, __file__, "--_child", "--artifact", str(artifact), "--context", str(args.context),
           "--every", str(args.every), "--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode:
        sys.exit(f"soak failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    result = summarize(json.loads(r.stdout.strip().splitlines()[-1]), args.context)
    cli = cli_stop_check(artifact, args.threads)
    report(result, cli)
    if args.json:
        args.json.write_text(json.dumps({**result, "cli": cli, "median_window_tok_s":
                                         statistics.median(w["tok_s"] for w in result["windows"])}, indent=2) + "\n")


if __name__ == "__main__":
    main()
