"""N concurrent streaming clients against `edgert serve` and, when llama-cpp-python is installed and a
GGUF of the same model shape is given, against its OpenAI server (`python -m llama_cpp.server`):
aggregate decode tok/s, time to first token p50/p95, errors; and a two-turn conversation (the
second turn's TTFT against the first's: prefix reuse).

    python benchmarks/serve_load.py                         # the bundled reasoning fixture, int4, 4 clients
    python benchmarks/serve_load.py --artifact ART --gguf MODEL.gguf --clients 4 --requests 4 --threads 2

Measure on a quiet machine: every server here shares the CPU with the clients.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is (9-5)*7+2+2?", "What is 3*7+4-2-1?", "What is 8+3+1+6?", "What is 2*7*2-9?",
             "What is (4-1)*9?", "What is 6*5-4?", "What is 4+7-8?", "What is 1*3+5-4?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, log: Path, seconds: float = 600):
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"serve_load: {cmd[0]} exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"serve_load: {url} not ready after {seconds:.0f} s; see {log}")


def stream_chat(url: str, model: str, messages: list, max_tokens: int) -> dict:
    """One streamed greedy request: TTFT (first reasoning or answer text), completion tokens, time."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "min_tokens": max_tokens}   # llama-cpp-python's: random weights hit one of its EOG ids early
    t0 = time.perf_counter()
    try:
        return _stream(url, body, t0)
    except httpx.HTTPError as e:              # a server that drops the stream: an error row, not a crash
        return {"error": f"{type(e).__name__}: {str(e)[:120]}"}


def _stream(url: str, body: dict, t0: float) -> dict:
    first, tokens, deltas, text, finish = None, None, 0, "", None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}"}
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                d = c.get("delta", {})
                finish = c.get("finish_reason") or finish
                if d.get("reasoning_content") is not None or d.get("content") is not None:   # a token, maybe no text yet
                    first = first or time.perf_counter() - t0
                    deltas += 1
                    text += d.get("content") or ""
    if tokens is None:          # a server without stream_options.include_usage: all of max_tokens, or one per delta
        tokens = body["max_tokens"] if finish == "length" else deltas
    return {"ttft": first, "tokens": tokens, "seconds": time.perf_counter() - t0, "text": text}


def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    def client(c):
        return [stream_chat(url, model, [{"role": "user", "content": QUESTIONS[(c + k) % len(QUESTIONS)]}], max_tokens)
                for k in range(requests)]
    stream_chat(url, model, [{"role": "user", "content": QUESTIONS[0]}], max_tokens)       # warm-up
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        try:
            results = [r for rs in pool.map(client, range(clients)) for r in rs]
        except httpx.HTTPError as e:
            results = [{"error": f"{type(e).__name__}: {e}"}]
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    single = sorted(r["tokens"] / (r["seconds"] - r["ttft"]) for r in ok if r["ttft"] and r["seconds"] > r["ttft"])
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "tokens": sum(r["tokens"] for r in ok), "seconds": round(wall, 3),
            "aggregate_tok_s": round(sum(r["tokens"] for r in ok) / wall, 2) if wall else 0.0,
            "stream_tok_s_p50": round(pct(single, 50), 2) if single else None,
            "ttft_p50_s": round(pct(ttfts, 50), 4) if ttfts else None,
            "ttft_p95_s": round(pct(ttfts, 95), 4) if ttfts else None}


def first_token_seconds(url: str, model: str, messages: list) -> float | None:
    """Time to first token as a client sees it: one non-streamed greedy request for a single token
    (prefill + one step; needs no visible text, so random-weight models measure too)."""
    body = {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0}
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    return time.perf_counter() - t0 if r.status_code == 200 else None


def conversation(url: str, model: str, filler_tokens: int, max_tokens: int) -> dict:
    """Turn 1: a long user message (first token timed on a cold cache), answered in full; turn 2
    sends it back with the answer and a new question: its first token shows the prefix reuse."""
    filler = " ".join(["1+1=2."] * max(1, filler_tokens // 6))
    first = [{"role": "user", "content": filler + " " + QUESTIONS[0]}]
    t1 = first_token_seconds(url, model, first)
    a = stream_chat(url, model, first, max_tokens)
    second = first + [{"role": "assistant", "content": a.get("text", "")}, {"role": "user", "content": QUESTIONS[1]}]
    t2 = first_token_seconds(url, model, second)
    if "error" in a or not t1 or not t2:
        return {"error": a.get("error") or "a request failed"}
    return {"turn1_ttft_s": round(t1, 4), "turn2_ttft_s": round(t2, 4), "turn2_over_turn1": round(t2 / t1, 3)}


def pct(xs: list, p: float) -> float:
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def bundled_artifact(work: Path) -> Path:
    from edgert_export import export
    out = work / "reasoning-qwen2-int4"
    if not (out / "edgert.json").is_file():
        export(ROOT / "export" / "data" / "reasoning-qwen2", out, bits=4, progress=False, force=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, help="edgert artifact [default: the bundled reasoning fixture at int4]")
    ap.add_argument("--gguf", type=Path, help="GGUF of the same model for llama-cpp-python's server (when installed)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--parallel", type=int, help="edgert serve --parallel [default: --clients]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, help="context per slot for both servers")
    ap.add_argument("--filler-tokens", type=int, default=150, help="length of the conversation's first message")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    art = args.artifact or bundled_artifact(work)
    results = {}
    runs = [("edgert", [sys.executable, "-m", "edgert.cli", "serve", str(art), "--threads", str(args.threads),
                        "--parallel", str(args.parallel or args.clients), "--queue", str(4 * args.clients)]
             + (["--context", str(args.context)] if args.context else []))]
    try:
        import llama_cpp  # noqa: F401
        if args.gguf:
            runs.append(("llama-cpp-python", [sys.executable, "-m", "llama_cpp.server", "--model", str(args.gguf),
                                              "--n_threads", str(args.threads), "--n_ctx", str(args.context or 4096),
                                              "--interrupt_requests", "False"]))   # queue requests, not cut them
        else:
            results["llama-cpp-python"] = {"skipped": "give --gguf MODEL.gguf (the same shape as --artifact)"}
    except ImportError:
        results["llama-cpp-python"] = {"skipped": "llama-cpp-python is not installed"}
    for name, cmd in runs:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd += ["--port", str(port)] + (["--host", "127.0.0.1"] if name != "edgert" else [])
        proc = start(cmd, url, work / f"{name}.log")
        try:
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            results[name] = {"single": load(url, model, 1, args.requests, args.max_tokens),
                             "concurrent": load(url, model, args.clients, args.requests, args.max_tokens),
                             "conversation": conversation(url, model, args.filler_tokens, args.max_tokens)}
            c, s = results[name]["concurrent"], results[name]["single"]
            c["speedup_vs_single"] = round(c["aggregate_tok_s"] / s["aggregate_tok_s"], 2) if s["aggregate_tok_s"] else None
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"{'server':<18} {'clients':>7} {'agg tok/s':>10} {'x single':>9} {'TTFT p50':>9} {'p95':>8} {'errors':>6}  turn2/turn1 TTFT")
    for name, r in results.items():
        if "skipped" in r:
            print(f"{name:<18} skipped: {r['skipped']}")
            continue
        c, conv = r["concurrent"], r["conversation"]
        print(f"{name:<18} {c['clients']:>7} {c['aggregate_tok_s']:>10.1f} {c['speedup_vs_single'] or 0:>9.2f} "
              f"{c['ttft_p50_s'] or 0:>8.3f}s {c['ttft_p95_s'] or 0:>7.3f}s {c['errors'] + r['single']['errors']:>6}  "
              f"{conv.get('turn2_over_turn1', conv.get('error'))}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(r.get("concurrent", {}).get("errors") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
