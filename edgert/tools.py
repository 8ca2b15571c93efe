"""Tool calls (OpenAI's `tools`) through a model's own chat template.

The template renders the tool definitions (and earlier calls and their results) the way the model
was trained on; the model writes its calls in its family's format, which `ToolFormat.split` takes
out of the answer. Formats, told by the template and the tokenizer's vocabulary:

    hermes  <tool_call>{"name": ..., "arguments": {...}}</tool_call>    Qwen2.5, Qwen3, QwQ, Hermes
            <tool_call><function=name><parameter=key>value</parameter></function></tool_call>
                                                                   Qwen3.5, Qwen3-Coder (the XML form)
    lfm2    <|tool_call_start|>[name(arg=value, ...)]<|tool_call_end|>  LFM2, LFM2.5
    phi4    <|tool_call|>[{"name": ..., "arguments": {...}}, ...]<|/tool_call|>  Phi-4-mini (its template
            reads the tools from the system message: `ToolFormat.place`)
    harmony <|channel|>commentary to=functions.name <|constrain|>json<|message|>{...}<|call|>   gpt-oss
            (a message addressed to the function: read by serve's ChoiceText from Step.header)

A template that never reads `tools`, or whose calls are in no format here, gets no tools: the
server refuses them rather than answer as if the model had seen them.

tool_choice `required` or a named function is kept by forcing the answer's first tokens
(`ToolFormat.forced`): for a named function (or `required` with one function) the text up to its
arguments, in the form the template writes; for `required` with several, the text up to the name,
which the model then writes kept to one of the functions' names (`NameChoice`). The model writes the
rest; a reasoning model thinks first. gpt-oss: the first message on a channel other than analysis
is made a commentary message to the function (its header forced, `generate.Decoding`).
"""
from __future__ import annotations

import ast
import bisect
import json
import re
import uuid
from dataclasses import dataclass

import numpy as np

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
XML_CALL = re.compile(r"<function=([^>\n]*)>(.*?)</function>", re.S)
XML_PARAM = re.compile(r"<parameter=([^>\n]*)>\n?(.*?)\n?</parameter>", re.S)
HARMONY_TO = re.compile(r"\bto=functions\.([A-Za-z0-9_.-]{1,64})")


@dataclass(frozen=True)
class ToolFormat:
    name: str
    open: str
    close: str
    xml: bool = False        # hermes calls in the <function=...> form (the template writes them so)
    in_system: bool = False  # the template reads the tools from the system message (`place`), not `tools`

    def forced(self, function: str | None) -> str:
        """The text an answer is made to begin with: a call of `function`, ending before its
        arguments (no trailing space, which the model's own tokenization would put in front of what
        follows), or with None a call up to its function's name (tool_choice required: `NameChoice`)."""
        if self.name == "harmony":      # the header after <|channel|> (see generate.Decoding): a commentary message to it
            return "commentary to=functions." + (f"{function} <|constrain|>json<|message|>" if function else "")
        if self.name == "lfm2":
            return f"{self.open}[" + (f"{function}(" if function else "")
        if self.name == "phi4":
            return f'{self.open}[{{"name": ' + (f'{json.dumps(function)}, "arguments":' if function else '"')
        if self.xml:
            return f"{self.open}\n<function=" + (f"{function}>\n" if function else "")
        return f'{self.open}\n{{"name": ' + (f'{json.dumps(function)}, "arguments":' if function else '"')

    @property
    def name_ends(self) -> tuple[str, ...]:
        """What follows a function's name where `forced(None)` leaves the model to write it."""
        return {"harmony": (" ", "<|constrain|>", "<|message|>"), "lfm2": ("(",)}.get(
            self.name, (">",) if self.xml else ('"',))

    def split(self, text: str) -> tuple[str, list[dict]] | None:
        """The answer's text from the first `open` on -> (text outside the calls, the calls in
        OpenAI's shape), or None when a call does not parse (the text then stays the answer)."""
        calls, rest, at = [], [], 0
        while at < len(text):
            start = text.find(self.open, at)
            if start < 0:
                rest.append(text[at:])
                break
            rest.append(text[at:start])
            end = text.find(self.close, start)
            body = text[start + len(self.open): end if end >= 0 else len(text)]
            at = end + len(self.close) if end >= 0 else len(text)
            try:
                calls += self._parse(body.strip())
            except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
                return None
        if not calls:
            return None
        return "".join(rest).strip(), openai_calls(calls)

    def _parse(self, body: str) -> list[tuple[str, dict]]:
        if self.name == "hermes" and body.startswith("<function="):     # the XML form: values JSON where they parse
            calls = XML_CALL.fullmatch(body)
            if calls is None:
                raise ValueError("not a <function=...> call")
            return [(_name(calls[1]), {k: _value(v) for k, v in XML_PARAM.findall(calls[2])})]
        if self.name == "hermes":          # one JSON object per call
            return [_json_call(json.loads(body))]
        if self.name == "phi4":            # a JSON list of them (the model sometimes leaves out the brackets)
            calls = json.loads(body if body.startswith("[") else f"[{body}]")
            if not isinstance(calls, list):
                raise ValueError("not a list of calls")
            return [_json_call(c) for c in calls]
        tree = ast.parse(body, mode="eval").body    # lfm2: a Python list of calls with literal keyword arguments
        if not isinstance(tree, ast.List) or not tree.elts:
            raise ValueError("not a list of calls")
        out = []
        for c in tree.elts:
            if not isinstance(c, ast.Call) or c.args or not isinstance(c.func, (ast.Name, ast.Attribute)):
                raise ValueError("not a call with keyword arguments")
            out.append((_name(ast.unparse(c.func)), {k.arg: ast.literal_eval(k.value) for k in c.keywords}))
        return out

    def place(self, messages: list[dict], tools: list[dict] | None) -> list[dict]:
        """For a template that reads the tools from the system message (Phi-4-mini): the functions as
        a JSON string in its `tools` (a system message is opened if there is none), and each earlier
        call in its assistant message's text, as the model writes calls (the template renders content only)."""
        out = [dict(m) for m in messages]
        if tools:
            if not out or out[0]["role"] != "system":
                out.insert(0, {"role": "system", "content": DEFAULT_SYSTEM})
            out[0]["tools"] = json.dumps([t["function"] for t in tools], ensure_ascii=False)
        for m in out:
            if m.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
                m["content"] = (m.get("content") or "") + self.open + json.dumps(calls, ensure_ascii=False) + self.close
        return out


DEFAULT_SYSTEM = "You are a helpful assistant with some tools."     # Phi-4-mini's documented system line for tools


class Pieces:
    """Each token's text, as it reads inside a text (decoded after another token, so a
    SentencePiece word's leading space is kept), sorted for prefix searches."""

    def __init__(self, tokenizer, size: int):
        lead = tokenizer.encode("a", add_special_tokens=False)[-1:]
        base = tokenizer.decode(lead, skip_special_tokens=False)
        self.text = []
        for i in range(size):
            try:
                self.text.append(tokenizer.decode(lead + [i], skip_special_tokens=False)[len(base):])
            except (ValueError, KeyError, IndexError, TypeError):      # an id past the tokenizer's vocabulary
                self.text.append("")
        order = sorted((t, i) for i, t in enumerate(self.text) if t)
        self.sorted, self.ids = [t for t, _ in order], np.array([i for _, i in order], np.int64)
        self.exact: dict[str, list[int]] = {}
        for t, i in order:
            self.exact.setdefault(t, []).append(i)

    def continuing(self, typed: str, targets) -> np.ndarray:
        """The tokens after which `typed` still leads to one of `targets`: their text is a start of
        what a target has left, or holds all of it and goes on."""
        out: set[int] = set()
        for t in targets:
            if not t.startswith(typed):
                continue
            rest = t[len(typed):]
            for k in range(1, len(rest) + 1):
                out.update(self.exact.get(rest[:k], ()))
            lo = bisect.bisect_left(self.sorted, rest)
            hi = bisect.bisect_left(self.sorted, rest + "\U0010ffff")
            out.update(self.ids[lo:hi].tolist())
        return np.fromiter(out, np.int64, len(out))


class NameChoice:
    """tool_choice required with several functions: the forced text stops where the function's name
    begins (`ToolFormat.forced(None)`), and each token the model writes next is kept to those that
    continue one of the names, or complete one with what follows a name in this format. Once a
    name and its end are written, the model is free again (it writes the arguments)."""

    def __init__(self, names, fmt: ToolFormat, pieces: Pieces):
        self.targets = [n + end for n in names for end in fmt.name_ends]
        self.pieces, self.typed = pieces, ""

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every token that cannot continue a name at -inf."""
        ids = self.pieces.continuing(self.typed, self.targets)
        if not ids.size:                 # (no token of this vocabulary goes on: leave the model be)
            return logits
        out = np.full(logits.size, -np.inf, np.float32)
        out[ids] = logits.reshape(-1)[ids]
        return out

    def take(self, token: int) -> bool:
        """Follow the token just picked; True once a whole name and its end are written."""
        self.typed += self.pieces.text[token] if token < len(self.pieces.text) else ""
        return any(self.typed.startswith(t) for t in self.targets) or not any(t.startswith(self.typed) for t in self.targets)


def _json_call(call) -> tuple[str, dict]:
    """{"name", "arguments" (an object, or a JSON string of one)} -> (name, arguments)."""
    if not isinstance(call, dict):
        raise ValueError("a call is a JSON object")
    args = call.get("arguments", call.get("parameters", {}))
    if isinstance(args, str):
        args = json.loads(args)
    return _name(call.get("name")), _object(args)


def openai_calls(calls: list[tuple[str, dict]]) -> list[dict]:
    """(name, arguments) pairs -> OpenAI's tool_calls (arguments as a JSON string)."""
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": n, "arguments": json.dumps(a, ensure_ascii=False)}} for n, a in calls]


def harmony_recipient(header: str) -> str | None:
    """The function a harmony message is addressed to (`to=functions.NAME` in its header), or None."""
    m = HARMONY_TO.search(header)
    return m[1] if m else None


def harmony_calls(messages: list[tuple[str, str]]) -> list[dict] | None:
    """gpt-oss's calls, (function, message body) each, the body a JSON object -> OpenAI's tool_calls,
    or None when one does not parse."""
    try:
        return openai_calls([(_name(n), _object(json.loads(body))) for n, body in messages])
    except (ValueError, RecursionError):
        return None


def _name(name) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError("a call needs a function name")
    return name


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _object(args) -> dict:
    if not isinstance(args, dict):
        raise ValueError("a call's arguments must be an object")
    return args


FORMATS = (ToolFormat("hermes", "<tool_call>", "</tool_call>"),
           ToolFormat("lfm2", "<|tool_call_start|>", "<|tool_call_end|>"))
HARMONY = ToolFormat("harmony", "<|channel|>", "<|call|>")   # gpt-oss: calls are messages (see harmony_calls)
PHI4 = ToolFormat("phi4", "<|tool_call|>", "<|/tool_call|>", in_system=True)
PHI4_TOOLS = re.compile(r"""message\s*\[\s*['"]tools['"]\s*\]|message\.tools\b""")    # the template reads them there


def detect(template: str | None, token_id) -> ToolFormat | None:
    """The format of a model whose template renders `tools`; token_id(text) -> id or None (the
    tokenizer's vocabulary: a marker can be a token the template itself never writes)."""
    if not template or not re.search(r"\btools\b", template):
        return None
    if token_id("<|channel|>") is not None and token_id("<|message|>") is not None:
        return HARMONY
    if token_id(PHI4.open) is not None and PHI4_TOOLS.search(template):
        return PHI4
    for f in FORMATS:
        if f.open in template or token_id(f.open) is not None:
            return ToolFormat(f.name, f.open, f.close, xml=True) if f.name == "hermes" and "<function=" in template else f
    return None


def template_calls(calls) -> list[dict]:
    """An assistant message's `tool_calls` as templates read them: arguments as an object (OpenAI
    sends a JSON string; Hugging Face templates write `arguments | tojson`)."""
    out = []
    for c in calls:
        fn = dict(c["function"])
        try:
            args = json.loads(fn.get("arguments") or "{}")
            if isinstance(args, dict):
                fn["arguments"] = args
        except ValueError:
            pass
        out.append({**c, "function": fn})
    return out
