"""`edgert.load(path)`: an artifact + its tokenizer + chat template, ready to generate text."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .chat import load_chat_template, render_chat, tokenizer_config
from .engine import Engine, common_prefix
from .generate import Channels, Sampling, Stats, Step, generate
from .limits import check_prompt_length
from .model import ContextFull, Model
from .tokenizer import StreamDecoder, Tokenizer

CLOSE_THINKING = "\n</think>\n\n"      # what ends a reasoning block before the answer


class PromptTooLong(Exception):
    pass


@dataclass
class Token(Step):
    text: str = ""                # the text this token completes (may be "" mid-character)


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class LLM:
    def __init__(self, path, context: int | None = None, threads: int | None = None, tokenizer: str = "auto",
                 moe_strategy: str | None = None, max_memory: int | str | None = None, slots: int = 1):
        self.path = Path(path)
        self.model = Model(self.path, context=context, threads=threads, strategy=moe_strategy, max_memory=max_memory,
                           slots=slots)
        self.engine = Engine(self.model)
        self.manifest = self.model.manifest
        self.tokenizer = Tokenizer.from_dir(self.path, backend=tokenizer)
        self.chat_template = load_chat_template(self.path)
        cfg = tokenizer_config(self.path)
        self._template_vars = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        special = self.manifest["special_tokens"]
        self.eos_ids = [i for i in special.get("eos") or [] if i is not None]
        self.think = (special.get("think_start"), special.get("think_end"))
        self.channels = Channels.detect(self.tokenizer)       # gpt-oss: harmony's channels, not <think> tags
        self.stats = Stats()
        self.drafter = None          # a ModelDrafter once use_draft() ran

    def use_draft(self, path, threads: int | None = None, max_memory=None) -> None:
        """Speculate with a smaller model that has the same tokenizer (`run --draft ART`)."""
        from .artifact import ArtifactError
        from .generate import ModelDrafter
        from .artifact import read_manifest
        read_manifest(Path(path))            # a missing or damaged draft says so first
        if _vocabulary(Path(path)) != _vocabulary(self.path):
            raise ArtifactError(f"{path}: the draft model's tokenizer differs from {self.path}'s; speculation needs "
                                f"the same token ids")
        context = min(self.context, read_manifest(Path(path))["context_length"])     # past it, no drafts
        draft = Model(Path(path), context=context, threads=threads or self.model.threads, max_memory=max_memory)
        self.drafter = ModelDrafter(draft)

    @property
    def context(self) -> int:
        return self.model.context

    def encode(self, prompt: str, raw: bool = False, system: str | None = None) -> list[int]:
        """Chat template (when the tokenizer has one) unless raw; raw text gets the tokenizer's own specials (BOS)."""
        check_prompt_length(prompt, self.context)            # before any work on it
        if raw or not self.chat_template:
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.encode_messages(messages)

    def encode_messages(self, messages: list[dict], thinking: bool = True, template_kwargs: dict | None = None) -> list[int]:
        """A conversation through the chat template (sandboxed) with the generation prompt, as token ids.
        template_kwargs (variable name -> value) reach the template, whatever their names. thinking=False: an answer without reasoning. The template
        gets enable_thinking=False (Qwen3 renders an empty think block), and where the rendering still
        opens <think> (R1-style templates do in the generation prompt) the block is closed as text,
        tokenized with the rendering: its last "\n" and the closing's first are one token, as in the
        empty think blocks the model was trained on (fed as tokens, the closing had one more). A text
        that cannot fit the context raises PromptTooLong before it is tokenized."""
        if not self.chat_template:
            raise ValueError(f"{self.path}: this model has no chat template")
        template_kwargs = {**({} if thinking else {"enable_thinking": False}), **(template_kwargs or {})}
        text = render_chat(self.chat_template, messages, add_generation_prompt=True,
                           variables={**self._template_vars, **template_kwargs})
        check_prompt_length(text, self.context)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        start, end = self.think
        if not thinking and start is not None and end is not None:
            opened = max((i for i, t in enumerate(ids) if t in (start, end)), default=None)
            if opened is not None and ids[opened] == start:
                text += CLOSE_THINKING
                check_prompt_length(text, self.context)
                ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ids

    def turn_boundary(self, messages: list[dict], ids: list[int], render=None,
                      template_kwargs: dict | None = None) -> tuple[int, ...]:
        """Recurrent models: where the next turn's prompt will depart from `ids`, the rendering of
        `messages` (the template renders an answer unlike how it was generated, e.g. without its
        reasoning), so the engine keeps the state there (generate's keep_state_at); KV-only models
        reuse any prefix and need nothing. render: messages -> ids (default: encode_messages)."""
        if not self.engine.recurrent:
            return ()
        render = render or (lambda m: self.encode_messages(m, template_kwargs=template_kwargs))
        try:
            after = render(messages + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}])
        except (PromptTooLong, ValueError):
            return ()
        return (common_prefix(ids, after),)

    def sampling(self, temperature=None, top_p=None, top_k=None, seed=None) -> Sampling:
        """Unset options come from the artifact's generation config, as transformers reads it."""
        gen = self.manifest.get("generation", {})
        if temperature is None:
            temperature = gen.get("temperature", 1.0) if gen.get("do_sample") else 0.0
        if top_p is None:
            top_p = gen.get("top_p", 1.0) if gen.get("do_sample") else 1.0
        if top_k is None:
            top_k = gen.get("top_k", 0) if gen.get("do_sample") else 0
        return Sampling(float(temperature), float(top_p), int(top_k or 0), seed)

    def _prompt_ids(self, prompt, raw: bool, system: str | None) -> list[int]:
        ids = list(prompt) if not isinstance(prompt, str) else self.encode(prompt, raw=raw, system=system)
        if len(ids) >= self.context:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens; the context holds {self.context} "
                                f"(raise --context, up to {self.manifest['context_length']})")
        if not ids:
            raise PromptTooLong("the prompt is empty")
        return ids

    @property
    def thinks(self) -> bool:
        """Whether the model's reasoning can be told from its answer (and cut short)."""
        return self.think[1] is not None or self.channels is not None

    def close_think_ids(self) -> list[int]:
        """What a think budget feeds to end the reasoning."""
        if self.channels is not None:
            return list(self.channels.close)
        return self.tokenizer.encode(CLOSE_THINKING, add_special_tokens=False) if self.think[1] is not None else []

    def generate(self, prompt: str | list[int], max_tokens: int = 256, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None, raw: bool = False,
                 ignore_eos: bool = False, think_budget: int | None = None, system: str | None = None,
                 speculate: int = 0, keep_state_at=()) -> Iterator[Token]:
        """Yield Tokens as they are generated; `self.stats` describes the run (complete once exhausted).
        speculate=k: greedy decoding verifies up to k drafted tokens per forward (the same tokens,
        fewer weight reads): from the text so far, or from the draft model of use_draft(); plain decoding
        for recurrent models. keep_state_at: prompt positions where a recurrent model snapshots its
        state for a later prompt to resume from."""
        ids = self._prompt_ids(prompt, raw, system)
        self.stats = Stats()
        decoder = StreamDecoder(self.tokenizer)
        steps = generate(self.engine, ids, max_tokens, self.sampling(temperature, top_p, top_k, seed),
                         stop_ids=() if ignore_eos else self.eos_ids, think=self.think, think_budget=think_budget,
                         close_think_ids=self.close_think_ids(), stats=self.stats, speculate=speculate,
                         drafter=self.drafter, marks=keep_state_at, channels=self.channels)
        for step in steps:
            text = decoder.flush() if step.hidden else decoder.push(step.id)     # (a header is not text)
            yield Token(step.id, step.reasoning, step.forced, step.hidden, text=text)
        tail = decoder.flush()
        if tail:
            yield Token(-1, False, True, text=tail)   # text held back for an incomplete character

    def chat(self, system: str | None = None, think_budget: int | None = None, thinking: bool = True):
        """A multi-turn Conversation whose history stays in this model's KV cache (edgert.conversation)."""
        from .conversation import Conversation
        return Conversation(self, system=system, think_budget=think_budget, thinking=thinking)

    def vote(self, prompt: str | list[int], n: int, max_tokens: int = 256, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, seed: int | None = None, raw: bool = False,
             think_budget: int | None = None, system: str | None = None) -> dict:
        """Self-consistency (cons@n, as in the DeepSeek-R1 report): n answers sampled together, one
        batched forward per step, and the majority answer. Ties go to the larger summed log-probability."""
        from .votes import sample_together
        ids = self._prompt_ids(prompt, raw, system)
        sampling = self.sampling(temperature, top_p, top_k, seed)
        return sample_together(self, ids, n, max_tokens, sampling, think_budget)


def _vocabulary(path: Path):
    """What token ids mean: the tokenizer.json vocabulary and added tokens."""
    try:
        tok = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        return (tok.get("model", {}).get("vocab"),
                sorted((t.get("id"), t.get("content")) for t in tok.get("added_tokens") or []))
    except (OSError, ValueError, AttributeError) as e:
        return f"unreadable: {e}"


def load(path, context: int | None = None, threads: int | None = None, tokenizer: str = "auto",
         moe_strategy: str | None = None, max_memory: int | str | None = None, slots: int = 1) -> LLM:
    """slots: sequences held (and decoded together) at once, for llm.engine, vote() and servers.
    moe_strategy: "qmoe" or "plain" for MoE artifacts (default: the fastest this onnxruntime runs).
    max_memory: memory budget checked before loading, bytes or "2G" (default: what is available; "off": no check)."""
    return LLM(path, context=context, threads=threads, tokenizer=tokenizer, moe_strategy=moe_strategy,
               max_memory=max_memory, slots=slots)


__all__ = ["LLM", "load", "Token", "PromptTooLong", "ContextFull"]
