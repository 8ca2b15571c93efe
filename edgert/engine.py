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
SNAPSHOTS_PER_SLOT = 4    # recurrent models: state snapshots kept per slot (the latest positions)


class NoFreeSlot(Exception):
    pass


class StateRewind(ValueError):
    """A recurrent model was asked to go back to a position whose state it does not hold."""


class Seq:
    """One sequence: the slot whose cache rows it owns and the tokens those rows hold."""

    def __init__(self, slot: int, ids: list[int]):
        self.slot = slot
        self.ids = ids                  # tokens in the cache, in order
        self.cached = len(ids)          # of the prompt given to open(): rows reused, not computed
        self.open = True
        self.marks: set[int] = set()    # recurrent models: positions of the next feed to snapshot the state at

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
        # Recurrent (hybrid) models: a slot's live state always matches the tokens it holds; a
        # state cannot be cut back like KV rows, so copies of it are kept per slot at chosen
        # positions (the end of each prompt, and where the caller marks a turn boundary). open()
        # reuses a prefix only up to such a position; rewind() goes back only to one.
        self.recurrent = bool(getattr(model, "recurrent", False))
        self._snaps: list[dict[int, list]] = [{} for _ in range(self.slots)]

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
        shared = {s: self._resumable(s, common_prefix(self._held[s], prompt_ids, limit)) for s in range(self.slots)}
        slot = max(free, key=lambda s: (shared[s], -len(self._held[s])))     # best reuse, else the emptiest
        source = max(range(self.slots), key=lambda s: shared[s])
        n = shared[slot]
        if shared[source] > n:                       # a busy sequence holds more of it: copy its rows
            n = shared[source]
            self.model.copy_rows(source, slot, n)
        if self.recurrent:
            self._resume(slot, source if shared[source] == n and n > shared[slot] else slot, n)
        seq = Seq(slot, prompt_ids[:n])
        seq.marks = {len(prompt_ids)}       # the end of the prompt: a turn boundary
        self._held[slot] = seq.ids
        self._busy[slot] = seq
        return seq

    def close(self, seq: Seq) -> None:
        """Free the slot; its rows stay for a later open() to reuse."""
        if seq.open:
            seq.open = False
            self._busy[seq.slot] = None

    def rewind(self, seq: Seq, n: int) -> None:
        """Keep only the first n tokens of the sequence. A recurrent model goes back only to a
        position where it keeps a snapshot of its state (else StateRewind, nothing changed)."""
        if self.recurrent and n < seq.pos:
            if n not in self._snaps[seq.slot]:
                raise StateRewind(f"this model keeps a recurrent state, which cannot be cut back to position {n} "
                                  f"(it holds snapshots at {sorted(self._snaps[seq.slot]) or 'none'})")
            self._resume(seq.slot, seq.slot, n)
        del seq.ids[n:]

    def open_many(self, prompt_ids, n: int) -> tuple[list[Seq], dict[Seq, np.ndarray]]:
        """n sequences on one prompt (votes, `n` choices, batched bench): the prompt is computed once;
        the others copy its rows (a recurrent model: its state one token before the end) and feed
        what they could not reuse. Returns the sequences and the logits after the prompt for each."""
        prompt_ids = list(prompt_ids)
        first = self.open(prompt_ids)
        self.mark(first, [len(prompt_ids) - 1])
        seqs = [first]
        try:
            logits = self.step({first: prompt_ids[first.cached:]})
            seqs += [self.open(prompt_ids) for _ in range(n - 1)]
            if n > 1:
                logits.update(self.step({s: prompt_ids[s.cached:] for s in seqs[1:]}))
        except BaseException:
            for s in seqs:
                self.close(s)
            raise
        return seqs, logits

    def mark(self, seq: Seq, positions) -> None:
        """Recurrent models: also keep the state at these positions of the next feed (turn boundaries
        that the next prompt will share); a no-op for others."""
        seq.marks.update(p for p in positions if p > seq.pos)

    def forget(self, slot: int | None = None) -> None:
        """Drop what free slots hold (all of them, or one), so nothing is reused from them."""
        for s in range(self.slots) if slot is None else [slot]:
            if self._busy[s] is None:
                self._held[s] = []
                self._snaps[s] = {}

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
        for i, j in self._chunks(seq, len(toks)):
            chunk = toks[i:j]
            want = min(len(chunk), max(0, num_logits - (len(toks) - j)))      # logits wanted from this chunk
            logits = self.model.run(seq.slot, np.array([chunk]), np.array([seq.pos]), max(want, 1))[0]
            seq.ids.extend(chunk)
            self._keep(seq)
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
                if self.recurrent and self._busy[slot] is None:
                    self.forget(slot)           # its state holds the last token: the rows must not lose it
                elif not self.recurrent:
                    del held[self.context - 1:]
            lengths[r] = min(len(held), self.context - 1)
        for seq, tok in zip(seqs, tokens):
            ids[seq.slot - first, 0] = tok
        logits = self.model.run(first, ids, lengths, stepped=[s.slot - first for s in seqs] if self.recurrent else None)
        for seq, tok in zip(seqs, tokens):
            seq.ids.append(tok)
            self._keep(seq)
        return [logits[s.slot - first, -1] for s in seqs]

    # ---- recurrent state: snapshots at turn boundaries -------------------------------------------
    def _chunks(self, seq: Seq, n: int) -> list[tuple[int, int]]:
        """[i, j) pieces of an n-token feed: at most PREFILL_CHUNK long (or the model's own bound), cut
        at the marked positions."""
        size = min(PREFILL_CHUNK, self.model.feed_limit or PREFILL_CHUNK)
        cuts = {min(i + size, n) for i in range(0, n, size)}
        if self.recurrent:
            cuts |= {p - seq.pos for p in seq.marks if 0 < p - seq.pos < n}
        cuts = sorted(cuts)
        return list(zip([0] + cuts[:-1], cuts))

    def _keep(self, seq: Seq) -> None:
        """Snapshot the slot's state if the sequence just reached a marked position."""
        if self.recurrent and seq.pos in seq.marks:
            seq.marks.discard(seq.pos)
            snaps = self._snaps[seq.slot]
            snaps[seq.pos] = self.model.snapshot(seq.slot)
            for old in sorted(snaps)[:-SNAPSHOTS_PER_SLOT]:
                del snaps[old]

    def _resumable(self, slot: int, n: int) -> int:
        """The longest prefix of n tokens slot can resume from: any for KV-only models; for
        recurrent ones, a position with a snapshot or the slot's live end (else 0: start afresh)."""
        if not self.recurrent:
            return n
        held = len(self._held[slot])
        return max([p for p in [*self._snaps[slot], held] if p <= n] + [0])

    def _resume(self, slot: int, source: int, n: int) -> None:
        """Set slot's state to source's at position n (from a snapshot, its live state, or zeros) and
        drop slot's snapshots past n."""
        if n == 0:
            self.model.reset_state(slot)
        elif n in self._snaps[source]:
            self.model.restore(slot, self._snaps[source][n])
        elif source != slot:                                  # the source's live end
            self.model.restore(slot, self.model.snapshot(source))
        # else: slot's own live end, already in place
        snaps = self._snaps[slot]
        for p in [p for p in snaps if p > n]:
            del snaps[p]
        if source != slot and n in self._snaps[source]:
            snaps[n] = self._snaps[source][n]


def common_prefix(a: list[int], b: list[int], limit: int | None = None) -> int:
    """Length of the common prefix of a and b, at most limit."""
    n = min(len(a), len(b), len(a) if limit is None else limit)
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n
