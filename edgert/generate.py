"""Prefill, then decode one token at a time: a generator the CLI and the Python API share.

Reasoning models write `<think> ... </think>` before their answer. Each yielded Step says
whether its token belongs to the reasoning, and `think_budget` closes the reasoning after N
tokens by feeding the close tag itself, so a device with a deadline still gets an answer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

_CHUNK = 1024          # ids per chunk of the sampler's two-level search (Sampling._inverse_cdf)


@dataclass
class Sampling:
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                # 0 = no limit
    seed: int | None = None
    bias: tuple | None = None     # (token ids, values) added to the logits before anything (logit_bias)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)
        self._z = self._lse = None

    def _scratch(self, n: int) -> np.ndarray:
        """A float64 array of the vocabulary's size, reused every token: a fresh array of 152k
        entries pays its page faults at every draw (2.8-2.9 ms a draw on a gVisor sandbox, where
        the arithmetic takes 0.9; benchmarks/votes_cost.py and README)."""
        if self._z is None or self._z.size != n:
            self._z = np.empty(n, np.float64)
        return self._z

    def _nucleus(self, p: np.ndarray) -> np.ndarray:   # -> the kept token ids, most likely first
        """Keep the smallest most-likely set reaching top_p. Sorting the whole vocabulary costs
        ~5 ms per token at 152k entries (and partitioning it ~1 ms), so when the ids at least a
        millionth as likely as the likeliest already hold top_p (then they contain the whole
        nucleus: they are the most likely ones), sort only those, else everything."""
        order = None
        if p.size > 512:
            head = np.flatnonzero(p >= p.max() * 1e-6)
            if head.size < p.size // 8 and p[head].sum() >= self.top_p:
                order = head[np.argsort(-p[head])]
        if order is None:
            order = np.argsort(-p)
        kept = int(np.count_nonzero(np.cumsum(p[order]) - p[order] < self.top_p))
        return order[:max(kept, 1)]         # (top_p 0: the likeliest alone)

    def __call__(self, logits: np.ndarray) -> int:
        self._lse = None
        if self.bias is not None:
            logits = logits.astype(np.float32).reshape(-1)       # a copy: the engine's array stays as it was
            np.add.at(logits, self.bias[0], self.bias[1])
        if self.temperature <= 0:
            return int(np.argmax(logits))
        lg = logits.reshape(-1)
        p = self._scratch(lg.size)
        top = lg.max()
        np.subtract(lg, top, out=p, dtype=np.float64)         # softmax((l - max) / T): exp's argument never above 0
        if self.temperature != 1.0:
            p /= self.temperature        # (a division: 1 / T overflows for T below ~1e-308, (l - max) / T only to -inf)
        if self.top_k and self.top_k < p.size:
            cut = np.partition(p, -self.top_k)[-self.top_k]
            p[p < cut] = -np.inf
        np.exp(p, out=p)
        total = p.sum()
        if not np.isfinite(total):
            raise ValueError("the logits are not finite")
        if self.temperature == 1.0 and not (self.top_k and self.top_k < p.size):
            self._lse = (logits, float(top) + np.log(total))   # log_softmax_at's normaliser, for this draw's logits
        if self.top_p < 1.0:                    # draw among the kept ids only
            p /= total
            keep = self._nucleus(p)
            return int(keep[self.rng.choice(keep.size, p=p[keep] / p[keep].sum())])
        return self._inverse_cdf(p, self.rng.random() * total)

    def _inverse_cdf(self, p: np.ndarray, u: float) -> int:
        """The first id whose running mass exceeds u (what a cumulative sum of p and a search give,
        and rng.choice(p.size, p=p / total) draws), in two levels: the chunk of _CHUNK ids whose
        running mass crosses u, then the id within it. A cumulative sum over 152k ids costs ~0.5 ms
        a draw; the chunk sums are one reduction. An id of mass 0 is never returned."""
        n = p.size
        if n > 2 * _CHUNK:
            sums = np.add.reduceat(p, np.arange(0, n, _CHUNK))
            run = np.cumsum(sums)
            c = int(run.searchsorted(u, side="right"))
            if c >= len(run):                   # u at the very end (rounding): the last chunk with mass
                c = int(np.flatnonzero(sums)[-1])
            u -= run[c - 1] if c else 0.0
            lo = c * _CHUNK
            p = p[lo:lo + _CHUNK]
        else:
            lo = 0
        i = int(np.cumsum(p).searchsorted(u, side="right"))
        if i >= p.size:
            i = int(np.flatnonzero(p)[-1])
        return lo + i

    def logprob(self, logits: np.ndarray, token: int) -> float:
        """log softmax(logits)[token] (temperature 1)."""
        return float(self.log_softmax_at(logits, token))

    def log_softmax_at(self, logits: np.ndarray, ids):
        """log softmax(logits)[ids] (temperature 1), computed in the scratch arrays, or from the
        normaliser the draw just computed over the same logits (temperature 1, no top-k)."""
        lse, self._lse = self._lse, None
        if lse is not None and lse[0] is logits:
            return logits.reshape(-1)[ids].astype(np.float64) - lse[1]
        z = self._scratch(logits.size)
        np.copyto(z, logits.reshape(-1))
        top = z.max()
        picked = z[ids] - top
        z -= top
        return picked - np.log(np.exp(z, out=z).sum())


@dataclass
class Step:
    id: int
    reasoning: bool               # inside <think> ... </think> (the tags themselves count as reasoning)
    forced: bool = False          # fed by the think budget, not sampled
    hidden: bool = False          # a harmony message's header or end marker: structure, not text
    header: tuple = ()            # on harmony's <|message|>: the header it ends (role, channel, recipient)


@dataclass(frozen=True)
class Channels:
    """OpenAI's harmony format (gpt-oss): an answer is messages `<|start|>assistant<|channel|>NAME
    <|message|>TEXT<|end|>`; the `analysis` channel is the reasoning, `final` the answer. The
    headers and markers are structure, not text (`Step.hidden`)."""
    start: int
    channel: int
    message: int
    end: int
    analysis: tuple[int, ...]        # the channel name's tokens
    answer: tuple[int, ...] = ()     # <|channel|>final<|message|>: an answer without reasoning
    close: tuple[int, ...] = ()      # <|end|><|start|>assistant<|channel|>final<|message|>: reasoning cut short

    def to(self, header) -> tuple[list[int], list[int]]:
        """(an answer's opening, the reasoning's close) with `header`, the tokens after <|channel|>, in
        place of the final channel's: a call gpt-oss is made to write (tool_choice)."""
        reopen = list(self.close[:len(self.close) - len(self.answer) + 1])       # <|end|><|start|>assistant<|channel|>
        return [self.channel, *header], reopen + list(header)

    @classmethod
    def detect(cls, tokenizer) -> "Channels | None":
        ids = [tokenizer.token_to_id(t) for t in ("<|start|>", "<|channel|>", "<|message|>", "<|end|>")]
        if None in ids:
            return None
        encode = lambda text: tuple(tokenizer.encode(text, add_special_tokens=False))    # noqa: E731
        return cls(*ids, encode("analysis"), encode("<|channel|>final<|message|>"),
                   encode("<|end|><|start|>assistant<|channel|>final<|message|>"))


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
        """Tokens computed per second of prefill (rows reused from the cache are not computed)."""
        done = self.prompt_tokens - self.extra.get("cached_tokens", 0)
        return done / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0


class Decoding:
    """One sequence's policy, fed the logits the engine returns: sample (or force) the next token,
    track whether it is reasoning, apply the think budget and the stops. No model inside, so one
    scheduler can drive many. `think` = (<think> id, </think> id); the prompt may already open the
    reasoning (R1 templates end with "<think>\\n")."""

    def __init__(self, prompt_ids, max_tokens: int, sampling: Sampling, stop_ids=(),
                 think: tuple[int | None, int | None] = (None, None), think_budget: int | None = None,
                 close_think_ids=(), deadline: float | None = None, logprobs: bool = False, answer_prefix=(),
                 channels: Channels | None = None, choice=None):
        self.max_tokens, self.sampling, self.stops = max_tokens, sampling, set(stop_ids)
        self.think_start, self.think_end = think
        self.think_budget, self.close_think_ids, self.deadline = think_budget, list(close_think_ids), deadline
        self.reasoning = False
        if self.think_start is not None:
            for t in prompt_ids:
                self.reasoning = True if t == self.think_start else False if t == self.think_end else self.reasoning
        self.channels, self.header, self.opened = channels, None, ()   # harmony: the header being read, the last read
        if channels is not None:                        # (the generation prompt opens one: <|start|>assistant)
            for t in prompt_ids:
                self._channel(t)
            self.opened = ()
        # forced where the answer begins (a tool call that tool_choice requires): in place of the answer's
        # first sampled token, after the reasoning (which the model may still open with its first token).
        # harmony: the header after <|channel|> of the first message not on the analysis channel, also
        # where a budget closes the analysis or skips it
        self.answer_prefix = list(answer_prefix)
        self.choice, self.choosing = choice, False   # tools.NameChoice: the name that follows the prefix, kept to the tools'
        opening = list(channels.answer) if channels is not None else []
        if channels is not None and self.answer_prefix:
            opening, self.close_think_ids = channels.to(self.answer_prefix)
        self.last = prompt_ids[-1] if len(prompt_ids) else None
        # forced tokens still to feed (think budget, deadline); a budget of 0 closes the reasoning at once
        self.pending: list[int] = list(self.close_think_ids) if self.reasoning and think_budget == 0 else []
        if channels is not None and think_budget == 0 and self.header is not None:
            self.pending, self.answer_prefix = opening, []    # harmony, no reasoning: the answer's header at once
            self.choosing = choice is not None and bool(answer_prefix)
        self.spent = 0                   # reasoning tokens generated so far
        self.generated = self.reasoning_tokens = 0
        self.stop_reason: str | None = None   # "eos", "length", "context"
        self.logprobs = [] if logprobs else None   # log p of each sampled token (forced: 0)

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def _channel(self, token: int) -> bool:
        """Follow harmony's structure: whether `token` is structure (hidden); sets self.reasoning."""
        c = self.channels
        if token == c.start or (token == c.channel and self.header is None):
            self.header, self.reasoning = [], False
        if self.header is not None:
            if token == c.message:      # the header names the channel: analysis is the reasoning
                h, n = self.header, len(c.analysis)
                self.reasoning = any(h[i:i + n] == list(c.analysis) for i in range(len(h) - n + 1))
                self.header, self.opened = None, tuple(h)
            else:
                self.header.append(token)
            return True
        if token == c.end:
            self.reasoning = False
            return True
        return False

    def close_thinking(self) -> None:
        """Feed </think> next (unless the reasoning is already closing)."""
        if self.reasoning and not self.pending:
            self.pending = list(self.close_think_ids)
            if self.channels is not None:
                self.choosing = self.choice is not None and bool(self.answer_prefix)
                self.answer_prefix = []          # (harmony: the close holds it)

    def next(self, logits: np.ndarray) -> Step | None:
        """The token that follows `logits` (sampled, or forced by a budget), or None at a stop."""
        if self.done:
            return None
        if self.deadline is not None and self.reasoning and time.monotonic() >= self.deadline:
            self.close_thinking()
        forced = bool(self.pending)
        if self.choosing and not forced:
            logits = self.choice.mask(logits)
        token = self.pending.pop(0) if forced else self.sampling(logits)
        if self.answer_prefix and not forced and (
                not self.reasoning and not (token == self.think_start and self.generated == 0) if self.channels is None
                else self.last == self.channels.channel and self.header is not None and token != self.channels.analysis[0]):
            self.pending, self.answer_prefix = self.answer_prefix, []
            token, forced = self.pending.pop(0), True
            self.choosing = self.choice is not None
        elif self.choosing and not forced:
            self.choosing = not self.choice.take(token)
        self.last = token
        hidden = self.channels is not None and self._channel(token)
        if token == self.think_start:
            self.reasoning = True
        in_reasoning = self.reasoning and not hidden
        if token == self.think_end:
            self.reasoning = False
        if not forced and token in self.stops:
            self.stop_reason = "eos"
            return None
        self.generated += 1
        self.reasoning_tokens += in_reasoning
        if self.logprobs is not None:
            self.logprobs.append(0.0 if forced else self.sampling.logprob(logits, token))
        if in_reasoning and self.reasoning and not forced:
            self.spent += 1
            if self.think_budget is not None and self.spent >= self.think_budget:
                self.close_thinking()
        if self.generated >= self.max_tokens:
            self.stop_reason = "length"
        header, self.opened = (self.opened, ()) if hidden else ((), self.opened)
        return Step(token, in_reasoning, forced, hidden, header)


def generate(engine, prompt_ids: list[int], max_tokens: int, sampling: Sampling, stop_ids=(),
             think: tuple[int | None, int | None] = (None, None), think_budget: int | None = None,
             close_think_ids: list[int] = (), stats: Stats | None = None, speculate: int = 0, drafter=None,
             marks=(), channels: Channels | None = None):
    """Yield Steps of one sequence: open it on the engine (a Model is wrapped in a one-slot engine),
    prefill the prompt, then decode one token per step until the Decoding stops.
    speculate=k (greedy only): each step also feeds up to k drafted tokens — `drafter(ids, k)`, by
    default `ngram_draft` from the text so far, or a `ModelDrafter` — and keeps those the model
    itself picks: the same tokens as without, fewer forward calls of the model. Models with a
    recurrent state cannot cut a rejected draft back, so they decode plainly.
    marks: prompt positions where a recurrent model keeps its state (the next turn resumes there).
    channels: a harmony model's markers (gpt-oss), which tell its reasoning from its answer."""
    drafter = drafter or ngram_draft
    from .engine import Engine
    engine = engine if isinstance(engine, Engine) else Engine(engine)
    stats = stats if stats is not None else Stats()
    stats.prompt_tokens = len(prompt_ids)
    dec = Decoding(prompt_ids, max_tokens, sampling, stop_ids, think, think_budget, close_think_ids, channels=channels)
    t0 = time.perf_counter()
    seq = engine.open(prompt_ids)
    engine.mark(seq, marks)
    try:
        logits = engine.step({seq: prompt_ids[seq.cached:]})[seq]
        stats.prefill_s = time.perf_counter() - t0
        stats.extra["cached_tokens"] = seq.cached
        queue: list[tuple[int, np.ndarray]] = []   # drafted tokens already in the cache, with the logits after each
        backoff = rest = 0                  # after drafts the model rejected: plain steps before drafting again
        while (step := dec.next(logits)) is not None:
            stats.generated, stats.reasoning_tokens = dec.generated, dec.reasoning_tokens
            yield step
            if dec.done:
                break
            if queue:
                expected, after = queue.pop(0)
                if step.id == expected:      # the model picked the drafted token: its logits are here
                    logits = after
                    continue
                engine.rewind(seq, seq.pos - 1 - len(queue))     # a forced token: drop the rest of the draft
                queue = []
            if seq.pos + 1 > engine.context:
                dec.stop_reason = "context"
                break
            t0 = time.perf_counter()
            room = min(speculate, engine.context - seq.pos - 1) if sampling.temperature <= 0 and not engine.recurrent else 0
            draft = drafter(seq.ids + [step.id], room) if room > 0 and rest == 0 else []
            rest = max(rest - 1, 0)
            if draft:                        # verify: logits after step.id and after each drafted token
                rows = engine.score(seq, [step.id] + draft)
                kept = 0
                while kept < len(draft) and int(np.argmax(rows[kept])) == draft[kept]:
                    kept += 1
                engine.rewind(seq, seq.pos - len(draft) + kept)
                backoff = 0 if kept else min(max(2 * backoff, 1), 16)   # a verify costs more than a step
                rest = backoff
                logits, queue = rows[0], [(draft[j], rows[j + 1]) for j in range(kept)]
                stats.extra["drafted"] = stats.extra.get("drafted", 0) + len(draft)
                stats.extra["accepted"] = stats.extra.get("accepted", 0) + kept
                stats.extra["verify_steps"] = stats.extra.get("verify_steps", 0) + 1
            else:
                logits, kept = engine.step({seq: [step.id]})[seq], 0
            stats.decode_s += time.perf_counter() - t0   # the consumer's time between steps is not ours
            stats.decode_steps += 1 + kept               # tokens whose logits this forward gave
        stats.stop_reason = dec.stop_reason or "length"
        stats.generated, stats.reasoning_tokens = dec.generated, dec.reasoning_tokens
    finally:
        engine.close(seq)


def ngram_draft(ids: list[int], k: int, max_n: int = 3, window: int = 4096) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the text's last n tokens
    (n = max_n down to 1): reasoning traces repeat numbers and phrases."""
    if k <= 0 or len(ids) < 2:
        return []
    hist = np.asarray(ids[-window:])
    for n in range(min(max_n, len(hist) - 1), 0, -1):
        tail = hist[-n:]
        cand = np.flatnonzero(hist[: len(hist) - n] == tail[0])
        for start in cand[::-1]:
            if np.array_equal(hist[start : start + n], tail):
                follow = hist[start + n : start + n + k]
                if follow.size:
                    return follow.tolist()
    return []


class ModelDrafter:
    """Drafts with a smaller model that shares the tokenizer: k greedy tokens from its own cache,
    which follows the text by its longest common prefix (so only new tokens are computed)."""

    def __init__(self, model):
        from .engine import Engine
        self.engine = Engine(model)
        self.seq = self.engine.open([])

    def __call__(self, ids: list[int], k: int) -> list[int]:
        from .engine import common_prefix
        eng, seq = self.engine, self.seq
        k = min(k, eng.context - len(ids))
        if k <= 0:
            return []
        n = common_prefix(seq.ids, ids, len(ids) - 1)
        eng.rewind(seq, n)
        logits = eng.step({seq: ids[n:]})[seq]
        out = []
        while True:
            out.append(int(np.argmax(logits)))
            if len(out) == k:
                return out
            logits = eng.step({seq: out[-1:]})[seq]

    def close(self):
        self.engine.close(self.seq)

