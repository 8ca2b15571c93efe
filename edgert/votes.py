"""Self-consistency: n reasoning paths sampled together, the majority answer returned.

The n sequences share the prompt's cache rows (computed once, copied to each slot) and then
advance in one batched forward per step, so n votes read the weights as often as one answer.
"""
from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import replace

from .generate import Decoding, Sampling

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def answer_key(answer: str) -> str:
    """What votes agree on: a \\boxed{...} answer, else the last number, else the text itself
    (whitespace and case folded). Empty when there is no answer (the reasoning never closed)."""
    boxed = _BOXED.findall(answer)
    if boxed:
        return " ".join(boxed[-1].split())
    numbers = _NUMBER.findall(answer)
    if numbers:
        return numbers[-1].replace(",", "")
    return " ".join(answer.lower().split()).rstrip(".")


def sample_together(llm, prompt_ids: list[int], n: int, max_tokens: int, sampling: Sampling,
                    think_budget: int | None = None) -> dict:
    engine = llm.engine
    if n < 1 or n > engine.slots:
        raise ValueError(f"{n} votes need {n} cache slots; this model was loaded with {engine.slots}")
    t0 = time.perf_counter()
    seqs, logits = engine.open_many(prompt_ids, n)      # the prompt computed once, its rows copied
    try:
        prefill_s = time.perf_counter() - t0
        decs = {}
        for i, s in enumerate(seqs):
            own = replace(sampling, seed=None if sampling.seed is None else sampling.seed + i)   # its own generator
            decs[s] = Decoding(prompt_ids, max_tokens, own, llm.eos_ids, llm.think, think_budget,
                               llm.close_think_ids(), logprobs=True, channels=llm.channels)
        steps = {s: [] for s in seqs}
        t1, forwards = time.perf_counter(), 0
        active = list(seqs)
        while active:
            feeds = {}
            for s in active:
                step = decs[s].next(logits[s])
                if step is None:
                    continue
                steps[s].append(step)
                if decs[s].done:
                    continue
                if s.pos + 1 > engine.context:
                    decs[s].stop_reason = "context"
                    continue
                feeds[s] = [step.id]
            active = list(feeds)
            if feeds:
                logits = engine.step(feeds)
                forwards += 1
        decode_s = time.perf_counter() - t1
    finally:
        for s in seqs:
            engine.close(s)

    votes = []
    for s in seqs:
        ids = [st.id for st in steps[s]]
        reasoning = [st.id for st in steps[s] if st.reasoning]
        text = llm.tokenizer.decode([st.id for st in steps[s] if not st.hidden])     # (harmony's headers are no text)
        answer = llm.tokenizer.decode([st.id for st in steps[s] if not (st.reasoning or st.hidden)]).strip()
        closed = not llm.think[1] or not reasoning or llm.think[1] in ids
        votes.append({"text": text, "reasoning": llm.tokenizer.decode(reasoning), "answer": answer,
                      "key": answer_key(answer) if closed else "", "tokens": ids,
                      "logprob": round(sum(decs[s].logprobs), 4), "stop_reason": decs[s].stop_reason or "length"})
    groups: dict[str, list[dict]] = defaultdict(list)
    for v in votes:
        if v["key"]:
            groups[v["key"]].append(v)
    if groups:
        key = max(groups, key=lambda k: (len(groups[k]), sum(v["logprob"] for v in groups[k])))
        best = max(groups[key], key=lambda v: v["logprob"])
    else:
        key, best = "", max(votes, key=lambda v: v["logprob"])
    generated = sum(len(v["tokens"]) for v in votes)
    return {"answer": key, "text": best["text"], "answer_text": best["answer"], "counts": {k: len(g) for k, g in groups.items()},
            "votes": votes, "prompt_tokens": len(prompt_ids), "generated": generated,
            "prefill_s": round(prefill_s, 4), "decode_s": round(decode_s, 4), "decode_steps": forwards,
            "decode_tok_s": round(generated / decode_s, 2) if decode_s else 0.0}
