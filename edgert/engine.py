"""The engine: a batch of sequences, each with its own cache rows, stepped together.

Every client is a thin loop over four calls: `open` a sequence on a free slot (reusing the
longest token prefix any slot's cache rows already hold), `step` the sequences that advance
(every sequence feeding one token runs in ONE batched forward; a longer feed, a prompt or a
speculative draft, runs on its own slot in chunks), `rewind` one (a position moves back: the
rows past it are simply never attended to again), `close` it (its rows stay for reuse).

    run        open, then step one sequence until its Decoding stops
    votes      open the prompt once, open it N-1 more times (the rows are copied), step all N
    speculate  step one sequence on a drafted run of tokens, keep what the model agrees with, rewind
    chat/serve open each turn's whole prompt: the rows of what the template keeps are reused

Decode reads every weight once per step whatever the batch, so N sequences cost little more
than one until the arithmetic catches up with the bandwidth.
"""
from __future__ import annotations

import numpy as np

from .model import ContextFull, Model

PREFILL_CHUNK = 512       # tokens per forward on a long feed: bounds attention scratch memory


class NoFreeSlot(Exception):
    pass


class Seq:
    """One sequence: the slot whose cache rows it owns and the tokens those rows hold."""

    def __init__(self, slot: int, ids: list[int]):
        self.slot = slot
        self.ids = ids                  # tokens in the cache, in order
        self.cached = len(ids)          # of the prompt given to open(): rows reused, not computed
        self.open = True

    @property
    def pos(self) -> int:
        return len(self.ids)

    def __repr__(self):
        return f"Seq(slot={self.slot}, pos={self.pos})"


class Engine:
    def __init__(self, model: Model):
        self.model = model
        self.slots, self.context, self.vocab = model.slots, model.context, model.vocab
        self._held: list[list[int]] = [[] for _ in range(self.slots)]   # tokens each slot's rows hold
        self._busy: list[Seq | None] = [None] * self.slots

    # ---- sequences ---------------------------------------------------------------------------
    def open(self, prompt_ids) -> Seq:
        """Claim a free slot for a new sequence whose prompt is prompt_ids. The longest prefix of it
        that any slot holds (at most all but the last token: its logits are needed) is reused:
        in place when a free slot holds it, else copied from the busy slot that does."""
        prompt_ids = list(prompt_ids)
        free = [s for s in range(self.slots) if self._busy[s] is None]
        if not free:
            raise NoFreeSlot(f"all {self.slots} slots are busy")
        limit = max(len(prompt_ids) - 1, 0)
        shared = {s: common_prefix(self._held[s], prompt_ids, limit) for s in range(self.slots)}
        slot = max(free, key=lambda s: (shared[s], -len(self._held[s])))     # best reuse, else the emptiest
        source = max(range(self.slots), key=lambda s: shared[s])
        n = shared[slot]
        if shared[source] > n:                       # a busy sequence holds more of it: copy its rows
            n = shared[source]
            for buf in self.model.cache:
                buf[slot, :, :n] = buf[source, :, :n]
        seq = Seq(slot, prompt_ids[:n])
        self._held[slot] = seq.ids
        self._busy[slot] = seq
        return seq

    def close(self, seq: Seq) -> None:
        """Free the slot; its rows stay for a later open() to reuse."""
        if seq.open:
            seq.open = False
            self._busy[seq.slot] = None

    def rewind(self, seq: Seq, n: int) -> None:
        """Keep only the first n tokens of the sequence."""
        del seq.ids[n:]

    def forget(self, slot: int | None = None) -> None:
        """Drop what free slots hold (all of them, or one), so nothing is reused from them."""
        for s in range(self.slots) if slot is None else [slot]:
            if self._busy[s] is None:
                self._held[s] = []

    @property
    def busy(self) -> int:
        return sum(s is not None for s in self._busy)

    # ---- the step ----------------------------------------------------------------------------
    def step(self, feeds: dict[Seq, list[int]]) -> dict[Seq, np.ndarray]:
        """Append each sequence's tokens; return {seq: logits [vocab] after its last token}.
        Raises ContextFull (changing nothing) when a feed would pass the context."""
        for seq, toks in feeds.items():
            if not seq.open:
                raise ValueError(f"{seq} is closed")
            if not toks:
                raise ValueError(f"{seq}: nothing to feed")
            if seq.pos + len(toks) > self.context:
                raise ContextFull(f"{seq.pos + len(toks)} tokens do not fit the {self.context}-token context")
        out = {}
        singles = [s for s, toks in feeds.items() if len(toks) == 1]
        for seq, toks in feeds.items():
            if len(toks) > 1:
                out[seq] = self.score(seq, toks, 1)[-1]
        if singles:
            out.update(zip(singles, self._decode(singles, [feeds[s][0] for s in singles])))
        return out

    def score(self, seq: Seq, toks: list[int], num_logits: int | None = None) -> np.ndarray:
        """Feed toks to one sequence; logits [num_logits (default all), vocab] of its last positions."""
        num_logits = len(toks) if num_logits is None else num_logits
        if seq.pos + len(toks) > self.context:
            raise ContextFull(f"{seq.pos + len(toks)} tokens do not fit the {self.context}-token context")
        parts = []
        for i in range(0, len(toks), PREFILL_CHUNK):
            chunk = toks[i : i + PREFILL_CHUNK]
            want = min(len(chunk), max(0, num_logits - (len(toks) - i - len(chunk))))      # logits wanted from this chunk
            logits = self.model.run(seq.slot, np.array([chunk]), np.array([seq.pos]), max(want, 1))[0]
            seq.ids.extend(chunk)
            if want:
                parts.append(logits[-want:])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _decode(self, seqs: list[Seq], tokens: list[int]) -> list[np.ndarray]:
        """One forward, one token for each of seqs, over the contiguous slots they span. A slot in
        that span that is not stepping gets a dummy token written at its first unused row, which
        nothing reads (a full one gives up its last held row)."""
        first = min(s.slot for s in seqs)
        last = max(s.slot for s in seqs) + 1
        ids = np.zeros((last - first, 1), np.int64)
        lengths = np.zeros(last - first, np.int64)
        for r, slot in enumerate(range(first, last)):
            held = self._held[slot]
            if len(held) >= self.context:
                del held[self.context - 1:]
            lengths[r] = len(held)
        for seq, tok in zip(seqs, tokens):
            ids[seq.slot - first, 0] = tok
        logits = self.model.run(first, ids, lengths)
        for seq, tok in zip(seqs, tokens):
            seq.ids.append(tok)
        return [logits[s.slot - first, -1] for s in seqs]


def common_prefix(a: list[int], b: list[int], limit: int | None = None) -> int:
    """Length of the common prefix of a and b, at most limit."""
    n = min(len(a), len(b), len(a) if limit is None else limit)
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n
