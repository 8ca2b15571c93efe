"""Prefill, then decode one token at a time: a generator the CLI and the Python API share.

Reasoning models write `<think> ... </think>` before their answer. Each yielded Step says
whether its token belongs to the reasoning, and `think_budget` closes the reasoning after N
tokens by feeding the close tag itself, so a device with a deadline still gets an answer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .model import Model


@dataclass
class Sampling:
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                # 0 = no limit
    seed: int | None = None

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)

    def _nucleus(self, p: np.ndarray) -> np.ndarray:   # -> the kept token ids, most likely first
        """Keep the smallest most-likely set reaching top_p. Sorting the whole vocabulary costs
        ~5 ms per token at 152k entries, so sort only the largest few hundred when they already
        hold top_p (then they contain the whole nucleus), else everything."""
        order = None
        if p.size > 512:
            head = np.argpartition(p, -512)[-512:]
            if p[head].sum() >= self.top_p:
                order = head[np.argsort(-p[head])]
        if order is None:
            order = np.argsort(-p)
        return order[np.cumsum(p[order]) - p[order] < self.top_p]

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        if self.top_k and self.top_k < z.size:
            cut = np.partition(z, -self.top_k)[-self.top_k]
            z = np.where(z < cut, -np.inf, z)
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1.0:                    # draw among the kept ids only
            keep = self._nucleus(p)
            return int(keep[self.rng.choice(keep.size, p=p[keep] / p[keep].sum())])
        return int(self.rng.choice(p.size, p=p))


@dataclass
class Step:
    id: int
    reasoning: bool               # inside <think> ... </think> (the tags themselves count as reasoning)
    forced: bool = False          # fed by the think budget, not sampled


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated: int = 0
    decode_steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str | None = None   # "eos", "length", "context"
    reasoning_tokens: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0


PREFILL_CHUNK = 512   # bounds attention scratch memory on long prompts


def generate(model: Model, prompt_ids: list[int], max_tokens: int, sampling: Sampling, stop_ids=(),
             think: tuple[int | None, int | None] = (None, None), think_budget: int | None = None,
             close_think_ids: list[int] = (), stats: Stats | None = None):
    """Yield Steps. `think` = (<think> id, </think> id); the prompt may already open the reasoning
    (R1 templates end with "<think>\\n")."""
    stats = stats if stats is not None else Stats()
    stats.prompt_tokens = len(prompt_ids)
    think_start, think_end = think
    reasoning = False
    if think_start is not None:
        for t in prompt_ids:
            reasoning = True if t == think_start else False if t == think_end else reasoning
    stops = set(stop_ids)
    model.reset()
    t0 = time.perf_counter()
    for i in range(0, len(prompt_ids), PREFILL_CHUNK):
        logits = model.forward(prompt_ids[i : i + PREFILL_CHUNK])[-1]
    stats.prefill_s = time.perf_counter() - t0
    # forced tokens still to feed (think budget); a budget of 0 closes the reasoning at once
    pending: list[int] = list(close_think_ids) if reasoning and think_budget == 0 else []
    spent = 0                        # reasoning tokens generated so far
    while stats.generated < max_tokens:
        forced = bool(pending)
        token = pending.pop(0) if forced else sampling(logits)
        if token == think_start:
            reasoning = True
        in_reasoning = reasoning
        if token == think_end:
            reasoning = False
        if not forced and token in stops:
            stats.stop_reason = "eos"
            break
        stats.generated += 1
        stats.reasoning_tokens += in_reasoning
        yield Step(token, in_reasoning, forced)
        if in_reasoning and reasoning and not forced:
            spent += 1
            if think_budget is not None and spent >= think_budget and not pending:
                pending = list(close_think_ids)
        if stats.generated >= max_tokens:
            stats.stop_reason = "length"
            break
        if model.pos >= model.context:
            stats.stop_reason = "context"
            break
        t0 = time.perf_counter()
        logits = model.forward([token])[-1]
        stats.decode_s += time.perf_counter() - t0   # the consumer's time between steps is not ours
        stats.decode_steps += 1
    else:
        stats.stop_reason = stats.stop_reason or "length"
