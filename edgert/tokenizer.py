"""Read a Hugging Face ``tokenizer.json`` with one of two interchangeable backends.

* ``"tokenizers"``: wraps the Rust library when it is importable (the fast path).
* ``"python"``: a stdlib-only re-implementation of the BPE subset LLMs use, because
  Termux/Android has no ``tokenizers`` wheel. It covers byte-level BPE (GPT-2, Qwen2/2.5/3,
  Llama-3, DeepSeek-R1 distills) and SentencePiece-style BPE with byte fallback (Llama-2,
  stories260K). The ``regex`` module is used for the split patterns when present; otherwise
  ``\\p{..}`` and ``\\s`` are rewritten into explicit classes for the stdlib ``re``.

The python path follows the Rust pipeline step by step (added tokens, normalizer,
pre-tokenizer, model, post-processor; the decoder chain), so both backends give the same ids
and text. Any other tokenizer.json feature raises ValueError naming it.
"""
from __future__ import annotations

import contextlib
import contextvars
import heapq
import json
import os
import re
import signal
import threading
import time
import unicodedata
from functools import lru_cache
from itertools import groupby
from pathlib import Path

try:  # optional: compiles the Oniguruma-style patterns as they are
    import regex as _regex
except ImportError:  # pragma: no cover - depends on the device
    _regex = None

__all__ = ["Tokenizer", "StreamDecoder"]

# ---- bounds (README: Security) ------------------------------------------------------------------
MAX_TOKENIZER_BYTES = 64 << 20          # tokenizer.json
ENCODE_SECONDS = 4.0                    # one encode() of the python backend: this much
ENCODE_SECONDS_PER_MB = 20.0            # ... plus this per MB of text
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("edgert_encode_deadline", default=None)


class _EncodeTimeout(Exception):
    pass


def _nested_repeat(pattern: str) -> bool:
    """A quantified group holding another unbounded quantifier ((a+)+, (\\w+\\s?)*, (.*a){20}):
    the shape that backtracks exponentially in `re` and `regex`. \\p{..} classes are replaced by
    a plain class first: only the structure matters."""
    try:
        import re._parser as sre_parse          # Python >= 3.11
    except ImportError:                          # pragma: no cover
        import sre_parse
    plain = re.sub(r"\\[pP](\{[^}]*\}|.)", r"\\w", pattern)
    try:
        tree = sre_parse.parse(plain)
    except Exception:
        return False                             # the engine reports its own syntax error
    repeats = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None)}

    def walk(items, inside: bool) -> bool:
        for op, av in items:
            if op in repeats:
                lo, hi, sub = av
                many = hi is sre_parse.MAXREPEAT or hi > 1
                if many and inside:
                    return True
                if walk(sub, inside or many):
                    return True
            elif op is sre_parse.SUBPATTERN:
                if walk(av[-1], inside):
                    return True
            elif op is sre_parse.BRANCH:
                if any(walk(b, inside) for b in av[1]):
                    return True
            elif op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
                if walk(av[1], inside):
                    return True
        return False
    return walk(tree, False)


@contextlib.contextmanager
def _time_bound(seconds: float):
    """Bound one encode. In the main thread (the CLI) a timer signal interrupts the scan (`re`
    and `regex` both check for signals while matching); elsewhere (a server's threads) `regex`
    gets the deadline as its timeout (it checks the clock coarsely: it may run ~2x over), and
    without `regex` only the nested-quantifier refusal at load applies."""
    token = _DEADLINE.set(time.monotonic() + seconds)
    timer = (threading.current_thread() is threading.main_thread()
             and hasattr(signal, "setitimer") and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    if timer:
        def alarm(signum, frame):
            raise _EncodeTimeout()
        old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except (_EncodeTimeout, TimeoutError):
        raise ValueError(f"tokenizing took longer than {seconds:.0f} s: the tokenizer's split pattern backtracks "
                         f"catastrophically on this text") from None
    finally:
        if timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        _DEADLINE.reset(token)


class _TimedPattern:
    """A `regex` pattern whose scans stop at the current encode's deadline."""

    def __init__(self, compiled):
        self.compiled = compiled

    @staticmethod
    def _timeout():
        deadline = _DEADLINE.get()
        return None if deadline is None else max(deadline - time.monotonic(), 1e-3)

    def finditer(self, s: str):
        return self.compiled.finditer(s, timeout=self._timeout())

    def sub(self, repl, s: str):
        return self.compiled.sub(repl, s, timeout=self._timeout())

# Unicode White_Space is what Oniguruma and Rust mean by \s. Python's \s also matches
# \x1c-\x1f, so it is never used to imitate them.
_WS_RANGES = [(9, 13), (32, 32), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
              (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]
_WS = frozenset(chr(c) for lo, hi in _WS_RANGES for c in range(lo, hi + 1))
_CATEGORY_ALIASES = {"Letter": "L", "Mark": "M", "Number": "N", "Punctuation": "P",
                     "Symbol": "S", "Separator": "Z", "Other": "C"}


@lru_cache(maxsize=None)
def _category_runs() -> dict:
    """General category -> [(lo, hi)]; one pass over unicodedata (~0.2 s, only without `regex`)."""
    runs: dict = {}
    prev, start = None, 0
    for cp in range(0x110001):
        cat = unicodedata.category(chr(cp)) if cp < 0x110000 else None
        if cat != prev:
            if prev is not None:
                runs.setdefault(prev, []).append((start, cp - 1))
            prev, start = cat, cp
    return runs


def _property_ranges(name: str) -> list:
    name = _CATEGORY_ALIASES.get(name, name)
    runs = _category_runs()
    if not (len(name) == 1 and name in "LMNPSZC" or name in runs):
        raise ValueError(f"unsupported regex property \\p{{{name}}} (install the `regex` module)")
    return sorted(r for cat, rs in runs.items() if cat.startswith(name) for r in rs)


def _complement(ranges: list) -> list:
    out, nxt = [], 0
    for lo, hi in sorted(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = max(nxt, hi + 1)
    return out + ([(nxt, 0x10FFFF)] if nxt <= 0x10FFFF else [])


def _class_body(ranges: list, top: int) -> str:
    ranges = [(lo, min(hi, top)) for lo, hi in ranges if lo <= top]
    return "".join(f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges)


def _to_stdlib(pattern: str, top: int = 0x10FFFF) -> str:
    """Rewrite \\p{X}, \\P{X}, \\pX, \\s, \\S (inside or outside [...]) into explicit classes
    of the code points up to `top`."""
    out, i, n, in_class, class_first = [], 0, len(pattern), False, -1
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            d = pattern[i + 1]
            if d not in "pPsS":
                out.append(pattern[i:i + 2])
                i += 2
                continue
            if d in "sS":
                ranges, negate, i = _WS_RANGES, d == "S", i + 2
            else:
                if pattern.startswith("{", i + 2):
                    j = pattern.index("}", i + 2)
                    name, i = pattern[i + 3:j], j + 1
                else:
                    name, i = pattern[i + 2], i + 3
                negate = (d == "P") != name.startswith("^")
                ranges = _property_ranges(name.lstrip("^"))
            if negate and in_class:
                ranges, negate = _complement(ranges), False
            body = _class_body(ranges, top)
            out.append(body if in_class else f"[{'^' if negate else ''}{body}]")
            continue
        if in_class:
            in_class = not (c == "]" and i != class_first)   # a leading ']' is a literal
        elif c == "[":
            in_class, class_first = True, i + 1 + pattern.startswith("^", i + 1)
        out.append(c)
        i += 1
    return "".join(out)


class _StdlibPattern:
    """`re` tests a class beyond U+FFFF range by range, so text without such characters (the
    usual case) runs a BMP-only compilation, about 8x faster."""

    def __init__(self, pattern: str):
        self.full, self.bmp = re.compile(_to_stdlib(pattern)), re.compile(_to_stdlib(pattern, 0xFFFF))

    def _pick(self, s: str):
        return self.bmp if not s or max(s) <= "\uffff" else self.full

    def finditer(self, s: str):
        return self._pick(s).finditer(s)

    def sub(self, repl, s: str):
        return self._pick(s).sub(repl, s)


@lru_cache(maxsize=64)
def _compile_with(pattern: str, engine):
    if not isinstance(pattern, str) or len(pattern) > 10_000:
        raise ValueError("a split pattern in tokenizer.json is not a string of at most 10000 characters")
    if _nested_repeat(pattern):
        raise ValueError(f"split pattern {pattern[:80]!r} nests quantifiers (it can backtrack catastrophically); refused")
    try:
        return _TimedPattern(engine.compile(pattern)) if engine is not None else _StdlibPattern(pattern)
    except (re.error, getattr(engine, "error", re.error), RecursionError, OverflowError) as e:
        raise ValueError(f"cannot compile split pattern {pattern[:80]!r}: {e}") from None


def _compile(pat: dict):
    """tokenizer.json pattern {"String": s} or {"Regex": r} -> compiled regex."""
    if "String" in pat:
        return re.compile(re.escape(pat["String"]))
    if "Regex" in pat:
        return _compile_with(pat["Regex"], _regex)
    raise ValueError(f"unsupported pattern {pat!r}")


def _is_word_char(c: str) -> bool:
    # Rust regex \w: Alphabetic, marks, decimal digits, connector punctuation, joiners.
    cat = unicodedata.category(c)
    return cat[0] in "LM" or cat in ("Nd", "Nl", "Pc") or c in "\u200c\u200d"


def _bytes_to_unicode() -> dict:
    """GPT-2's reversible byte <-> printable character map used by byte-level BPE."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHAR = _bytes_to_unicode()
_CHAR_BYTE = {c: b for b, c in _BYTE_CHAR.items()}
_LATIN1_TO_BYTE_CHAR = {b: c for b, c in _BYTE_CHAR.items() if chr(b) != c}
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _spans(rx, s: str) -> list:
    """Regex matches as [(start, end, is_match)] covering s (Rust's Pattern::find_matches)."""
    out, prev = [], 0
    for m in rx.finditer(s):
        a, b = m.span()
        if a != prev:
            out.append((prev, a, False))
        out.append((a, b, True))
        prev = b
    if prev != len(s):
        out.append((prev, len(s), False))
    return out


def _split(s: str, spans: list, behavior: str) -> list:
    """NormalizedString::split: group the spans per delimiter behaviour, drop empty pieces."""
    behavior = behavior.lower().replace("_", "")
    if behavior == "isolated":
        groups = [[a, b] for a, b, _ in spans]
    elif behavior == "removed":
        groups = [[a, b] for a, b, m in spans if not m]
    elif behavior in ("mergedwithprevious", "contiguous", "mergedwithnext"):
        rev = behavior == "mergedwithnext"
        groups, prev = [], False
        for a, b, m in (reversed(spans) if rev else spans):
            join = (m == prev) if behavior == "contiguous" else (m and not prev)
            if join and groups:
                groups[-1][0 if rev else 1] = a if rev else b
            else:
                groups.append([a, b])
            prev = m
        groups.reverse() if rev else None
    else:
        raise ValueError(f"unsupported split behavior {behavior!r}")
    return [s[a:b] for a, b in groups if b > a]


def _chain(steps: list):
    """A "Sequence" of normalizers, pre-tokenizers, decoders or post-processors."""
    def run(x, *args):
        for step in steps:
            x = step(x, *args)
        return x
    return run


def _normalizer(cfg):
    """Normalizer config -> str -> str (None when absent)."""
    if not cfg:
        return None
    kind = cfg.get("type")
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda s: unicodedata.normalize(kind, s)
    if kind == "Lowercase":   # Rust lowercases char by char: no final-sigma rule
        return lambda s: s.lower() if "\u03a3" not in s else "".join(c.lower() for c in s)
    if kind == "Prepend":
        return lambda s: cfg["prepend"] + s if s else s
    if kind == "Replace":
        rx, content = _compile(cfg["pattern"]), cfg["content"]
        return lambda s: rx.sub(lambda _m: content, s)
    if kind == "Strip":
        ws, left, right = "".join(_WS), cfg.get("strip_left", True), cfg.get("strip_right", True)

        def strip(s):
            s = s.lstrip(ws) if left else s
            return s.rstrip(ws) if right else s
        return strip
    if kind == "Sequence":
        return _chain([f for f in map(_normalizer, cfg["normalizers"]) if f])
    raise ValueError(f"unsupported normalizer {kind!r} in tokenizer.json")


def _pre_tokenizer(cfg):
    """Pre-tokenizer config -> [(piece, at_start)] -> [(piece, at_start)] (None when absent).

    at_start tells Metaspace's prepend_scheme "first" that the piece begins the input."""
    if not cfg:
        return None
    kind = cfg.get("type")

    def per_piece(fn):
        return lambda pieces: [(q, st and k == 0) for p, st in pieces for k, q in enumerate(fn(p, st))]

    if kind == "Split":
        rx, behavior, invert = _compile(cfg["pattern"]), cfg["behavior"], cfg.get("invert", False)
        return per_piece(lambda p, st: _split(p, [(a, b, m != invert) for a, b, m in _spans(rx, p)],
                                              behavior))
    if kind == "ByteLevel":
        prefix = cfg.get("add_prefix_space", True)
        rx = _compile({"Regex": _GPT2_PATTERN}) if cfg.get("use_regex", True) else None

        def byte_level(p, st):
            p = " " + p if prefix and not p.startswith(" ") else p
            parts = [p[a:b] for a, b, _ in _spans(rx, p)] if rx else [p]
            # every UTF-8 byte becomes one printable character of the byte-level alphabet
            return [q.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_BYTE_CHAR) for q in parts if q]
        return per_piece(byte_level)
    if kind == "Metaspace":
        rep, split = cfg["replacement"], cfg.get("split", True)
        scheme = "never" if cfg.get("add_prefix_space") is False else cfg.get("prepend_scheme", "always")
        rx = re.compile(re.escape(rep))

        def metaspace(p, st):
            p = p.replace(" ", rep)
            if not p.startswith(rep) and (scheme == "always" or scheme == "first" and st):
                p = rep + p
            return _split(p, _spans(rx, p), "MergedWithNext") if split else [p]
        return per_piece(metaspace)
    if kind == "Sequence":
        return _chain([f for f in map(_pre_tokenizer, cfg["pretokenizers"]) if f])
    raise ValueError(f"unsupported pre_tokenizer {kind!r} in tokenizer.json")


def _decoder(cfg):
    """Decoder config -> list[str] -> list[str] (Rust's decode_chain; the caller joins)."""
    kind = cfg.get("type")
    if kind == "ByteLevel":
        def byte_level(tokens):
            # a token with a character outside the byte alphabet passes through as its UTF-8
            data = b"".join(bytes(_CHAR_BYTE[c] for c in t) if all(c in _CHAR_BYTE for c in t)
                            else t.encode("utf-8") for t in tokens)
            return [data.decode("utf-8", "replace")]
        return byte_level
    if kind == "Metaspace":
        rep = cfg["replacement"]
        scheme = "never" if cfg.get("add_prefix_space") is False else cfg.get("prepend_scheme", "always")
        return lambda tokens: [t.replace(rep, "" if i == 0 and scheme != "never" else " ")
                               for i, t in enumerate(tokens)]
    if kind == "Replace":
        rx, content = _compile(cfg["pattern"]), cfg["content"]
        return lambda tokens: [rx.sub(lambda _m: content, t) for t in tokens]
    if kind == "ByteFallback":
        def byte_fallback(tokens):
            out = []
            for is_byte, run in groupby(tokens, key=lambda t: _BYTE_TOKEN.fullmatch(t) is not None):
                if not is_byte:
                    out.extend(run)
                    continue
                data = bytes(int(t[3:5], 16) for t in run)
                try:
                    out.append(data.decode("utf-8"))
                except UnicodeDecodeError:   # an invalid run: one U+FFFD per byte, as in Rust
                    out.extend("\ufffd" * len(data))
            return out
        return byte_fallback
    if kind == "Fuse":
        return lambda tokens: ["".join(tokens)]
    if kind == "Strip":
        ch, start, stop = cfg["content"], cfg["start"], cfg["stop"]

        def strip(t):
            a, b = 0, len(t)
            while a < min(start, len(t)) and t[a] == ch:
                a += 1
            while len(t) - b < stop and b > 0 and t[b - 1] == ch:
                b -= 1
            return t[a:max(a, b)]
        return lambda tokens: [strip(t) for t in tokens]
    if kind == "Sequence":
        return _chain([_decoder(c) for c in cfg["decoders"]])
    raise ValueError(f"unsupported decoder {kind!r} in tokenizer.json")


def _post_processor(cfg):
    """Post-processor config -> (ids, add_special_tokens) -> ids."""
    if not cfg:
        return lambda ids, add: ids
    kind = cfg.get("type")
    if kind == "ByteLevel":   # only trims offsets, which this reader does not compute
        return lambda ids, add: ids
    if kind == "TemplateProcessing":
        specials = {k: v["ids"] for k, v in cfg.get("special_tokens", {}).items()}
        pieces = []
        for piece in cfg["single"]:
            if "SpecialToken" in piece:
                pieces.append(specials[piece["SpecialToken"]["id"]])
            elif piece.get("Sequence", {}).get("id") == "A":
                pieces.append(None)
        return lambda ids, add: [i for p in pieces for i in (ids if p is None else p if add else ())]
    if kind in ("BertProcessing", "RobertaProcessing"):
        cls_id, sep_id = cfg["cls"][1], cfg["sep"][1]
        return lambda ids, add: [cls_id, *ids, sep_id] if add else ids
    if kind == "Sequence":
        return _chain([_post_processor(c) for c in cfg["processors"]])
    raise ValueError(f"unsupported post_processor {kind!r} in tokenizer.json")


class _BPE:
    """The BPE model: a merge-rank table over id pairs, applied with the same heap order as Rust."""

    def __init__(self, cfg: dict):
        if cfg.get("type", "BPE") != "BPE":
            raise ValueError(f"unsupported model type {cfg.get('type')!r} in tokenizer.json (only BPE)")
        if cfg.get("dropout"):
            raise ValueError("unsupported BPE dropout in tokenizer.json (it is not deterministic)")
        self.vocab: dict = cfg["vocab"]
        self.unk = cfg.get("unk_token")
        self.fuse_unk, self.byte_fallback = cfg.get("fuse_unk", False), cfg.get("byte_fallback", False)
        self.ignore_merges = cfg.get("ignore_merges", False)
        self.prefix = cfg.get("continuing_subword_prefix") or ""
        self.suffix = cfg.get("end_of_word_suffix") or ""
        self.merges: dict = {}   # (left id, right id) -> (rank, merged id)
        rank = 0
        for m in cfg["merges"]:
            if isinstance(m, str):
                if m.startswith("#version"):
                    continue
                m = m.split(" ")
            if len(m) != 2:
                raise ValueError(f"bad merge #{rank + 1} in tokenizer.json: {m!r}")
            a, b = m
            try:
                self.merges[(self.vocab[a], self.vocab[b])] = (rank, self.vocab[a + b[len(self.prefix):]])
            except KeyError as e:
                raise ValueError(f"merge {a!r} + {b!r} uses a token missing from the vocab: {e}") from None
            rank += 1
        self.cache: dict = {}

    def tokenize(self, word: str) -> list:
        ids = self.cache.get(word)
        if ids is None:
            if self.ignore_merges and word in self.vocab:   # Llama-3: a whole known pre-token wins
                ids = [self.vocab[word]]
            else:
                ids = self._merge(self._symbols(word))
            if len(self.cache) > 200_000:
                self.cache.clear()
            self.cache[word] = ids
        return ids

    def _symbols(self, word: str) -> list:
        """Initial symbols: one per character, else its <0xXX> bytes, else (fused) unk."""
        out, unk, vocab = [], None, self.vocab
        for k, ch in enumerate(word):
            s = (self.prefix if k else "") + ch + (self.suffix if k == len(word) - 1 else "")
            if s in vocab:
                if unk is not None:
                    out.append(unk)
                    unk = None
                out.append(vocab[s])
                continue
            if self.byte_fallback:
                byte_ids = [vocab.get(f"<0x{b:02X}>") for b in s.encode("utf-8")]
                if None not in byte_ids:
                    out.extend(byte_ids)
                    continue
            if self.unk is not None:
                if self.unk not in vocab:
                    raise ValueError(f"unk_token {self.unk!r} is not in the vocab")
                if unk is not None and not self.fuse_unk:
                    out.append(unk)
                unk = vocab[self.unk]
        return out + ([unk] if unk is not None else [])

    def _merge(self, syms: list) -> list:
        merges, n = self.merges, len(syms)
        if n < 2:
            return syms
        nxt, prev, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        nxt[-1] = -1
        heap = [(merges[p][0], i, merges[p][1]) for i, p in enumerate(zip(syms, syms[1:])) if p in merges]
        heapq.heapify(heap)
        while heap:   # lowest rank first, leftmost on ties; stale entries are skipped
            _, i, new = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j < 0 or merges.get((syms[i], syms[j]), (0, -1))[1] != new:
                continue
            syms[i], alive[j], nxt[i] = new, False, nxt[j]
            if nxt[j] >= 0:
                prev[nxt[j]] = i
            if prev[i] >= 0 and (syms[prev[i]], new) in merges:
                r, m = merges[(syms[prev[i]], new)]
                heapq.heappush(heap, (r, prev[i], m))
            if nxt[i] >= 0 and (new, syms[nxt[i]]) in merges:
                r, m = merges[(new, syms[nxt[i]])]
                heapq.heappush(heap, (r, i, m))
        return [s for s, a in zip(syms, alive) if a]


class _PythonBackend:
    def __init__(self, cfg: dict):
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
            raise ValueError("tokenizer.json has no 'model' object")
        self.model = _BPE(cfg["model"])
        self.normalize = _normalizer(cfg.get("normalizer"))
        self.pre_tokenize = _pre_tokenizer(cfg.get("pre_tokenizer"))
        self.decode_chain = _decoder(cfg["decoder"]) if cfg.get("decoder") else None
        self.id_to_tok = {i: t for t, i in self.model.vocab.items()}
        self.added: dict = {}   # content -> id
        self.special: set = set()
        raw, normed, next_id = [], [], len(self.model.vocab)
        for tok in cfg.get("added_tokens") or []:   # ids assigned as AddedVocabulary::add_tokens does
            content = tok["content"]
            if not content:
                continue
            tid = self.added.get(content, self.model.vocab.get(content))
            if tid is None:
                tid, next_id = next_id, next_id + 1
            self.added[content] = tid
            if tok.get("special"):
                self.special.add(content)
            normalized = tok.get("normalized", not tok.get("special"))
            # normalized tokens match (and decode) in their normalized form
            form = (self.normalize(content) if normalized and self.normalize else "") or content
            self.id_to_tok[tid] = form
            (normed if normalized else raw).append((form, tid, tok))
        self.raw_matcher, self.norm_matcher = self._matcher(raw), self._matcher(normed)
        self.special_ids = frozenset(self.added[c] for c in self.special)
        self.post = _post_processor(cfg.get("post_processor"))
        self.vocab_size = len(set(self.model.vocab) | set(self.added))

    @staticmethod
    def _matcher(tokens: list):
        if not tokens:
            return None
        table = {form: (tid, tok) for form, tid, tok in tokens}
        # longest alternative first makes the regex leftmost-longest, like Rust's Aho-Corasick
        alts = sorted(table, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, alts))), table

    @staticmethod
    def _find_added(s: str, matcher) -> list:
        """Port of AddedVocabulary::find_matches -> [(piece, id or None, offset)] covering s."""
        if matcher is None:
            return [(s, None, 0)]
        rx, table = matcher
        out, pos = [], 0
        for m in rx.finditer(s):
            start, stop = m.span()
            tid, tok = table[m.group()]
            if tok.get("single_word") and ((start > 0 and _is_word_char(s[start - 1]))
                                           or (stop < len(s) and _is_word_char(s[stop]))):
                continue
            if tok.get("lstrip"):
                while start > pos and s[start - 1] in _WS:
                    start -= 1
            if tok.get("rstrip"):
                while stop < len(s) and s[stop] in _WS:
                    stop += 1
            if pos < start:
                out.append((s[pos:start], None, pos))
            out.append((s[start:stop], tid, start))
            pos = stop
        if pos < len(s):
            out.append((s[pos:], None, pos))
        return out

    def encode(self, text: str, add_special_tokens: bool) -> list:
        ids = []
        for seg, tid, off in self._find_added(text, self.raw_matcher):
            if tid is not None:
                ids.append(tid)
                continue
            norm = self.normalize(seg) if self.normalize else seg
            for piece, tid2, off2 in self._find_added(norm, self.norm_matcher) if norm else ():
                if tid2 is not None:
                    ids.append(tid2)
                    continue
                pieces = [(piece, off == 0 and off2 == 0)]
                for p, _ in self.pre_tokenize(pieces) if self.pre_tokenize else pieces:
                    ids.extend(self.model.tokenize(p))
        return self.post(ids, add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool) -> str:
        tokens = [t for t in map(self.id_to_tok.get, ids)
                  if t is not None and not (skip_special_tokens and t in self.special)]
        return "".join(self.decode_chain(tokens)) if self.decode_chain else " ".join(tokens)

    def token_to_id(self, token: str):
        return self.added.get(token, self.model.vocab.get(token))

    def id_to_token(self, i: int):
        return self.id_to_tok.get(i)


@contextlib.contextmanager
def _rust_errors(what: str, quiet: bool = True):
    """A `tokenizers` failure as one ValueError line. A Rust panic arrives as pyo3's
    PanicException, a BaseException; Rust's panic hook also prints it (with a backtrace under
    RUST_BACKTRACE) to fd 2, which is silenced meanwhile in the main thread (the CLI's)."""
    quiet = quiet and threading.current_thread() is threading.main_thread()
    if quiet:
        import sys
        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:    # noqa: B036 - pyo3's PanicException derives from BaseException
        raise ValueError(f"{what}: {_first_line(e)}") from None
    finally:
        if quiet:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(null)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


class _RustBackend:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer
        with _rust_errors(f"cannot read {path}"):
            self.tok = HFTokenizer.from_file(str(path))
        self.tok.no_truncation()   # the python backend never truncates or pads either
        self.tok.no_padding()
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in self.tok.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str, add_special_tokens: bool) -> list:
        with _rust_errors("the tokenizer failed"):
            return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool) -> str:
        with _rust_errors("the tokenizer failed", quiet=False):     # per token: no fd juggling
            return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int):
        return self.tok.id_to_token(i)


class Tokenizer:
    """A tokenizer.json reader; `backend` says which implementation runs it."""

    def __init__(self, impl, backend: str):
        self._impl, self.backend = impl, backend
        self.vocab_size: int = impl.vocab_size   # distinct tokens incl. added ones, as tokenizers counts
        self.special_ids: frozenset = impl.special_ids

    @classmethod
    def from_dir(cls, path, backend: str = "auto") -> "Tokenizer":
        """Read path/tokenizer.json. "auto" picks tokenizers when importable, else python;
        the environment variable EDGERT_TOKENIZER=python (or =tokenizers) overrides "auto"."""
        file = Path(path)
        file = file if file.is_file() else file / "tokenizer.json"
        if backend == "auto":
            backend = os.environ.get("EDGERT_TOKENIZER", "").strip().lower() or "auto"
        if backend == "auto":
            try:
                import tokenizers  # noqa: F401
                backend = "tokenizers"
            except ImportError:
                backend = "python"
        if backend not in ("tokenizers", "python"):
            raise ValueError(f"unknown tokenizer backend {backend!r} (auto, tokenizers or python)")
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        if file.stat().st_size > MAX_TOKENIZER_BYTES:
            raise ValueError(f"{file} is larger than {MAX_TOKENIZER_BYTES >> 20} MB; refused")
        if backend == "tokenizers":
            return cls(_RustBackend(file), "tokenizers")
        try:
            cfg = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{file} is not valid JSON: {_first_line(e)}") from None
        try:
            return cls(_PythonBackend(cfg), "python")
        except (KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
            raise ValueError(f"{file}: malformed tokenizer.json ({type(e).__name__}: {_first_line(e)})") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:          # lone surrogates: bytes that were not UTF-8 (argv, a terminal)
            raise ValueError("the text is not valid UTF-8 (it holds undecodable bytes)") from None
        if self.backend != "python":
            return self._impl.encode(text, add_special_tokens)
        with _time_bound(ENCODE_SECONDS + ENCODE_SECONDS_PER_MB * len(text) / 1e6):
            return self._impl.encode(text, add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._impl.decode(ids, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._impl.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._impl.id_to_token(int(i))


class StreamDecoder:
    """Incremental detokenization for streaming output.

    Each push() decodes a small window of recent ids and returns only what is final. Held back:
    text ending in U+FFFD (an incomplete UTF-8 sequence from byte pieces), and a run of <0xXX>
    byte-fallback tokens (one bad byte later turns the whole run into U+FFFD). The window
    starts with ids whose text was already returned, so decoder rules for the start of the text
    (Metaspace, the leading-space Strip) act on those ids only. flush() re-decodes everything
    once, so the concatenated output equals decode(all ids)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self._all: list = []       # every id pushed since the last flush
        self._emitted = 0          # characters returned since the last flush
        self._window: list = []    # context ids, then ids whose text is not returned yet
        self._context = 0          # how many ids at the start of _window are context
        self._context_text = ""    # decode of the context ids on their own

    def push(self, token_id: int) -> str:
        self._all.append(token_id)
        self._window.append(token_id)
        piece = self.tokenizer.id_to_token(token_id)
        if (piece is None or _BYTE_TOKEN.fullmatch(piece)
                or self.skip_special_tokens and token_id in self.tokenizer.special_ids):
            return ""   # no text of its own, or ByteFallback still decodes its byte run as a whole
        text = self.tokenizer.decode(self._window, self.skip_special_tokens)
        if (len(text) <= len(self._context_text) or text.endswith("\ufffd")
                or not text.startswith(self._context_text)):
            return ""
        new = text[len(self._context_text):]
        self._window = self._window[self._context:]   # the ids just emitted become the context
        self._context = len(self._window)
        self._context_text = self.tokenizer.decode(self._window, self.skip_special_tokens)
        self._emitted += len(new)
        return new

    def flush(self) -> str:
        """Return the held-back rest and start over (the next push begins a new text)."""
        rest = self.tokenizer.decode(self._all, self.skip_special_tokens)[self._emitted:]
        self._all, self._emitted, self._window, self._context, self._context_text = [], 0, [], 0, ""
        return rest
