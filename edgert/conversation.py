"""A multi-turn chat whose history lives in the KV cache.

    conv = edgert.load("r1-1.5b-int4").chat(system="Be brief.")
    for tok in conv.send("What is 7*6?"):
        print(tok.text, end="", flush=True)
    conv.stats.cached_tokens, conv.stats.prefilled_tokens

Every turn renders the whole conversation through the chat template and encodes it; the cache
keeps the longest common token prefix with what it already holds, and only the rest is prefilled.
That is the reasoning-aware cut by construction: R1/Qwen3 templates drop old reasoning, so the
kept prefix ends where the template's rendering of the last answer departs from what the model
generated (right after the assistant header), and everything before it is reused.
"""
from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .limits import check_prompt_length, write_text_atomic
from .llm import LLM, PromptTooLong, Token

FORMAT = "edgert-chat"
ROLES = ("system", "user", "assistant")
MAX_FILE = 64 << 20          # a saved conversation is text for one context: far below this


def _read_json(path) -> object:
    """A saved conversation's JSON, read within MAX_FILE; ValueError with one line otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None
    if len(raw) > MAX_FILE:
        raise ValueError(f"{path}: not a saved conversation (larger than {MAX_FILE >> 20} MB)")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"{path}: not a saved conversation (not JSON)") from None


def _saved_here(path: Path) -> bool:
    """Whether `path` holds a conversation written by Conversation.save (its "format" field)."""
    try:
        data = _read_json(path)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


@dataclass
class TurnStats:
    prompt_tokens: int = 0        # the whole conversation as rendered for this turn
    cached_tokens: int = 0        # of those, reused from the KV cache
    generated: int = 0
    reasoning_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    stop_reason: str | None = None  # "eos", "length", "context", "interrupted"
    dropped_turns: int = 0        # oldest turns dropped before this one so that it fits the context

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def prefill_tok_s(self) -> float:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0


def _drop_oldest_turn(history: list[dict]) -> list[dict]:
    """Without the first message and whatever follows it up to the next user message."""
    i = 1
    while i < len(history) and history[i]["role"] != "user":
        i += 1
    return history[i:]


class Conversation:
    """Turns of a chat with one model. The model's cache is the conversation's memory: use one
    Conversation per LLM at a time (another generate() on the same LLM only costs a longer prefill)."""

    def __init__(self, llm: LLM, system: str | None = None, think_budget: int | None = None, thinking: bool = True):
        if not llm.chat_template:
            raise ValueError(f"{llm.path}: this model has no chat template, which a conversation needs")
        self.llm = llm
        self.system = system or None
        self.think_budget = think_budget   # reasoning tokens per answer before "</think>" is fed (None: no limit)
        self.thinking = thinking           # False: enable_thinking=False to the template, else the reasoning closed at once
        self.history: list[dict] = []      # user and assistant messages, oldest first
        self.stats = TurnStats()           # of the last turn
        self._answering: Iterator[Token] | None = None   # the turn being streamed, closed by the next call

    @property
    def messages(self) -> list[dict]:
        """The conversation, system message first, as OpenAI-style dicts (assistant reasoning in reasoning_content)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.history]

    def _stop_answering(self) -> None:
        """An answer still being streamed ends here (kept as far as it got) and frees its cache slot."""
        if self._answering is not None:
            self._answering.close()
            self._answering = None

    def clear(self) -> None:
        """Forget the turns (the system message stays; its cached rows are reused by the next turn)."""
        self._stop_answering()
        self.history = []
        self.stats = TurnStats()

    def prompt_ids(self, history: list[dict]) -> list[int]:
        """The token ids of a conversation ending with a user message, ready for the answer."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return self.llm.encode_messages(head + history, thinking=self.thinking)

    def send(self, text: str, max_tokens: int | None = None, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, seed: int | None = None) -> Iterator[Token]:
        """Answer `text`: yields Tokens as llm.generate does (tok.reasoning marks the thinking). The turn is
        kept once the iterator ends or is closed (an interrupted answer is kept as far as it got).
        max_tokens: default, up to the end of the context. Raises PromptTooLong (nothing changed) when even
        the system message and this one do not fit; when the whole conversation does not, the oldest turns
        are dropped (stats.dropped_turns, set at once)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the message is empty")
        context = self.llm.context
        check_prompt_length(text, context)             # before any work on it
        self._stop_answering()
        user = {"role": "user", "content": text}
        room = min(max_tokens or context // 4, context // 2)    # kept free for the answer when dropping turns
        history, dropped = list(self.history), 0
        while True:
            try:
                ids = self.prompt_ids(history + [user])
            except PromptTooLong:           # far too long to tokenize: as good as too many tokens
                if not history:
                    raise
                ids = None
            if not history or (ids is not None and len(ids) + room <= context):
                break
            history = _drop_oldest_turn(history)
            dropped += 1
        if len(ids) >= context:
            raise PromptTooLong(f"the message needs {len(ids)} tokens with the system message; the context holds "
                                f"{context} (raise --context, up to {self.llm.manifest['context_length']})")
        self.history = history
        self.stats = TurnStats(prompt_tokens=len(ids), dropped_turns=dropped)
        options = dict(max_tokens=min(max_tokens or context, context - len(ids)), temperature=temperature,
                       top_p=top_p, top_k=top_k, seed=seed, think_budget=self.think_budget if self.thinking else 0)
        self._answering = self._turn(user, history, ids, options)
        return self._answering

    def _turn(self, user: dict, history: list[dict], ids: list[int], options: dict) -> Iterator[Token]:
        stats = self.stats
        before, tokens, finished = self.llm.stats, [], False
        stream = self.llm.generate(ids, **options,   # the engine reuses the rows of the longest prefix it holds
                                   keep_state_at=self.llm.turn_boundary(history + [user], ids, self.prompt_ids))
        try:
            for tok in stream:
                tokens.append(tok)
                yield tok
            finished = True
        finally:
            stream.close()
            s = self.llm.stats
            if s is not before:                 # generation started
                stats.cached_tokens = s.extra.get("cached_tokens", 0)
                stats.prefill_s, stats.decode_s, stats.decode_steps = s.prefill_s, s.decode_s, s.decode_steps
                stats.generated, stats.reasoning_tokens = s.generated, s.reasoning_tokens
                stats.stop_reason = s.stop_reason if finished else "interrupted"
                if stats.stop_reason == "length" and options["max_tokens"] == self.llm.context - len(ids):
                    stats.stop_reason = "context"       # the answer filled the context, not a max_tokens it was given
            if tokens:
                self.history = history + [user, self._assistant(tokens)]

    def _assistant(self, tokens: list[Token]) -> dict:
        reasoning = "".join(t.text for t in tokens if t.reasoning)
        answer = "".join(t.text for t in tokens if not t.reasoning)
        if not reasoning:
            return {"role": "assistant", "content": answer}
        for tag in self.llm.think:
            if tag is not None:
                reasoning = reasoning.replace(self.llm.tokenizer.decode([tag]), "")
        return {"role": "assistant", "content": answer.lstrip("\n"), "reasoning_content": reasoning.strip("\n")}

    def save(self, path) -> None:
        """Write the conversation as JSON ({"format", "messages"}), atomically. An existing file is
        replaced only when it is itself a conversation saved here (keeping its permissions); any other
        file, a link or a device is refused: /save must never destroy what it did not write."""
        path = Path(path)
        data = json.dumps({"format": FORMAT, "version": 1, "messages": self.messages}, ensure_ascii=False, indent=1)
        mode = None                                # a new file: write_text_atomic's plain one
        try:
            st = path.lstat()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ValueError(f"{path}: cannot write it ({e.strerror or type(e).__name__})") from None
        else:
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{path}: exists and is not a regular file (a link, folder or device); not replaced")
            if not _saved_here(path):
                raise ValueError(f"{path}: exists and is not a conversation saved by edgert; not replaced "
                                 f"(choose another name or remove it)")
            mode = stat.S_IMODE(st.st_mode)
        try:
            write_text_atomic(path, data + "\n", mode)
        except OSError as e:
            raise ValueError(f"{path}: cannot write it ({e.strerror or type(e).__name__})") from None

    def load(self, path) -> None:
        """Replace the conversation with one saved by save() (or a JSON list of messages). Raises
        ValueError with one line, and changes nothing, when the file is unreadable or not a conversation."""
        data = _read_json(path)
        messages = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                and isinstance(m.get("reasoning_content", ""), str) for m in messages):
            raise ValueError(f"{path}: not a saved conversation (expected a list of messages with role "
                             f"system/user/assistant and text content)")
        if any(m["role"] == "system" for m in messages[1:]):
            raise ValueError(f"{path}: a system message may only come first")
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        keep = ("role", "content", "reasoning_content")
        self._stop_answering()
        self.system = system
        self.history = [{k: m[k] for k in keep if k in m} for m in messages[1 if system is not None else 0:]]
        self.stats = TurnStats()
