"""Task accuracy of the trained reasoning fixtures through edgert, against transformers fp32.

    python benchmarks/reasoning_accuracy.py [--fixtures reasoning-qwen2,reasoning-qwen3moe,reasoning-lfm2]
                                            [--bits 32,8,4] [--work DIR] [--json out.json]
                                            [--kv-cache fp16|fp32|int8] [--votes 5 --temperature 1.0]

Each fixture (export/data/reasoning-*) is exported at every --bits (other options default)
and answers the 200 held-out problems of fixtures/reasoning_task.py: greedy, chat template
applied, up to --max-tokens. The table gives exact-match answer accuracy, how many answers
equal the fp32 transformers reference's, and how many generations are identical to it token
for token. The issue's acceptance: int4 within 2 points of fp32, int8 equal to fp32.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "fixtures"), str(ROOT)]
import reasoning_task as task  # noqa: E402

FIXTURES = ("reasoning-qwen2", "reasoning-qwen3moe", "reasoning-lfm2")


def reference_texts(fixture: Path, problems) -> list[str]:
    """transformers fp32 greedy continuations (the training script's own evaluation)."""
    import torch
    import transformers
    from tokenizers import Tokenizer
    from make_reasoning import greedy_answers
    model = transformers.AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32).eval()
    return greedy_answers(model, Tokenizer.from_file(str(fixture / "tokenizer.json")), problems)


def edgert_texts(artifact: Path, problems, max_tokens: int, threads: int | None) -> tuple[list[str], float]:
    """Greedy generations through edgert's runtime; returns the texts and the decode tok/s median."""
    import statistics
    import edgert
    llm = edgert.load(artifact, threads=threads)
    texts, speeds = [], []
    for p in problems:
        texts.append("".join(t.text for t in llm.generate(p.prompt, max_tokens=max_tokens, temperature=0.0)))
        speeds.append(llm.stats.decode_tok_s)
    return texts, statistics.median(speeds)


def score(texts, problems, ref_texts) -> dict:
    answers = [task.extract_answer(t) for t in texts]
    ref = [task.extract_answer(t) for t in ref_texts]
    return {"accuracy": sum(a == p.answer for a, p in zip(answers, problems)) / len(problems),
            "same_answer_as_fp32": sum(a == r for a, r in zip(answers, ref)),
            "same_text_as_fp32": sum(t.strip() == r.strip() for t, r in zip(texts, ref_texts)),
            "answers": answers}


def votes_accuracy(artifact: Path, problems, votes: int, temperature: float, max_tokens: int,
                   threads: int | None) -> dict:
    """Self-consistency through `run --votes`' engine path: accuracy of the first sample alone and
    of the majority of `votes` samples drawn together (seeded per problem)."""
    import edgert
    llm = edgert.load(artifact, threads=threads, slots=votes)
    single = majority = 0
    for i, p in enumerate(problems):
        r = llm.vote(p.prompt, votes, max_tokens=max_tokens, temperature=temperature, seed=i)
        single += task.extract_answer(r["votes"][0]["text"]) == p.answer
        majority += r["answer"] == str(p.answer)
    return {"single": single / len(problems), "majority": majority / len(problems)}


def run(fixtures, bits_list, work: Path, max_tokens: int, threads: int | None, n: int,
        kv_cache: str | None = None, votes: int = 0, temperature: float = 1.0) -> list[dict]:
    from edgert_export import export
    problems = task.held_out_problems()[:n]
    rows = []
    for src in fixtures:
        name = src.name
        ref_texts = reference_texts(src, problems)
        rows.append({"fixture": name, "precision": "transformers fp32", **score(ref_texts, problems, ref_texts)})
        for bits in bits_list:
            out = work / f"{name}-{bits}bit"
            t0 = time.time()
            export(src, out, bits=bits, force=True, progress=False, kv_cache=kv_cache)
            export_s = time.time() - t0
            texts, tok_s = edgert_texts(out, problems, max_tokens, threads)
            rows.append({"fixture": name, "precision": f"edgert int{bits}" if bits < 32 else "edgert fp32",
                         **score(texts, problems, ref_texts), "export_seconds": round(export_s, 1),
                         "decode_tok_s": round(tok_s, 1)})
            print(f"  {name} {bits}-bit: {rows[-1]['accuracy']:.3f}", file=sys.stderr, flush=True)
            if votes > 1:
                rows[-1]["votes"] = {"n": votes, "temperature": temperature,
                                     **votes_accuracy(out, problems, votes, temperature, max_tokens, threads)}
                print(f"  {name} {bits}-bit, T={temperature}: one sample {rows[-1]['votes']['single']:.3f}, "
                      f"majority of {votes} {rows[-1]['votes']['majority']:.3f}", file=sys.stderr, flush=True)
    return rows


def table(rows, n: int) -> str:
    lines = [f"| fixture | precision | accuracy ({n} held-out) | answer = fp32 | text = fp32 | decode tok/s | votes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r.get("votes")
        votes = (f"T={v['temperature']}: one {100 * v['single']:.1f}% -> majority of {v['n']} {100 * v['majority']:.1f}%"
                 if v else "")
        lines.append(f"| {r['fixture']} | {r['precision']} | {100 * r['accuracy']:.1f}% | {r['same_answer_as_fp32']}/{n} "
                     f"| {r['same_text_as_fp32']}/{n} | {r.get('decode_tok_s', '')} | {votes} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", default=",".join(FIXTURES), help="names under export/data/, or folders")
    ap.add_argument("--bits", default="32,8,4")
    ap.add_argument("--work", type=Path, default=None, help="where the artifacts go [default: a temporary folder]")
    ap.add_argument("--max-tokens", type=int, default=96, help="generous: a 4-step answer takes ~45 tokens")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--problems", type=int, default=task.HELD_OUT_SIZE, help="the first N held-out problems")
    ap.add_argument("--kv-cache", choices=["fp16", "fp32", "int8"], default=None, help="the exports' KV cache [default: export's]")
    ap.add_argument("--votes", type=int, default=0, help="also self-consistency: one sample vs the majority of N (batched)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for --votes")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    fixtures = [Path(f) if "/" in f else ROOT / "export" / "data" / f for f in args.fixtures.split(",") if f]
    missing = [f for f in fixtures if not (f / "config.json").is_file()]
    if missing:
        ap.error(f"no fixture at {missing[0]} (bundled: {', '.join(FIXTURES)})")
    try:
        bits_list = [int(b) for b in args.bits.split(",")]
    except ValueError:
        ap.error(f"--bits takes a comma-separated list of 4, 8, 32, not {args.bits!r}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(fixtures, bits_list, args.work or Path(tmp), args.max_tokens, args.threads, args.problems,
                   args.kv_cache, args.votes, args.temperature)
    print(table(rows, args.problems))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
