"""Chat templates: find a model's Jinja chat template and render it as transformers does.

Callers encode the rendered text with ``Tokenizer.encode(text, add_special_tokens=False)``,
as transformers' ``apply_chat_template`` does: templates already write BOS where the model
wants it, so the tokenizer's own post-processor must not add another.
"""
from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .limits import read_capped

__all__ = ["load_chat_template", "render_chat", "tokenizer_config", "TemplateLimits"]


@dataclass(frozen=True)
class TemplateLimits:
    """What one rendering may cost (README: Security). A template that goes past a limit fails
    in one line naming it; the bound is per call (a ContextVar), so concurrent renders in a
    server's threads each have their own."""
    seconds: float = 5.0              # wall time of one render
    chars: int = 4_000_000            # the output, and any one string or list made on the way
    total_chars: int = 64_000_000     # everything made on the way, added up (bounds memory)
    steps: int = 2_000_000            # loop iterations + calls + filters + operators
    int_bits: int = 1 << 16           # integers made by * and **
    source_chars: int = 1 << 20       # the template itself


LIMITS = TemplateLimits()

# transformers copies a message's reasoning under all these names: templates read one of them
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def load_chat_template(model_dir) -> str | None:
    """The model's chat template, or None.

    A ``chat_template.jinja`` file wins over tokenizer_config.json's "chat_template" (as in
    transformers); the latter is a string or a list of {"name", "template"} ("default" is used).
    """
    model_dir = Path(model_dir)
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return _read_capped(jinja_file, LIMITS.source_chars * 4)
    template = tokenizer_config(model_dir).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def tokenizer_config(model_dir) -> dict:
    """tokenizer_config.json as a dict ({} when absent); ValueError (one line) when it is not one."""
    config_file = Path(model_dir) / "tokenizer_config.json"
    if not config_file.is_file():
        return {}
    try:
        config = json.loads(_read_capped(config_file, 16 << 20))
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(f"{config_file}: not valid JSON") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: not a JSON object")
    return config


def _read_capped(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return read_capped(f, limit, str(path))


class _Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %} marks assistant text for training masks in
    transformers; rendering just keeps the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore names, so templates cannot reach CPython internals."""

    def __init__(*args, **kwargs):   # same signature trick as jinja's Namespace
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; chat templates want plain JSON
    if indent is not None and not (isinstance(indent, int) and 0 <= indent <= 16):
        raise jinja2.exceptions.SecurityError("tojson indent must be 0..16")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# ---- the bound ---------------------------------------------------------------------------------
class TemplateLimit(jinja2.exceptions.SecurityError):
    """A rendering went past one of TemplateLimits."""


class _Budget:
    def __init__(self, limits: TemplateLimits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.steps = self.made = 0


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("edgert_template_budget", default=None)


def _budget() -> _Budget:
    b = _BUDGET.get()
    if b is None:                   # outside render_chat (compile time): sizes still bounded
        b = _Budget(LIMITS)
    return b


def _step() -> _Budget:
    b = _budget()
    b.steps += 1
    if b.steps > b.limits.steps:
        raise TemplateLimit(f"the template took more than {b.limits.steps} steps (loops, calls, operators)")
    if time.monotonic() > b.deadline:
        raise TemplateLimit(f"rendering took longer than {b.limits.seconds:g} s")
    return b


def _check_chars(n: int, what: str) -> None:
    b = _budget()
    if n > b.limits.chars:
        raise TemplateLimit(f"{what} would hold more than {b.limits.chars} characters")


def _made(value) -> None:
    """Account for a new string or list (its size and the running total)."""
    if isinstance(value, (str, list, tuple, dict, bytes)):
        b = _budget()
        _check_chars(len(value), "a value")
        b.made += len(value)
        if b.made > b.limits.total_chars:
            raise TemplateLimit(f"the template made more than {b.limits.total_chars} characters of strings and lists")


def _size(value, limit: int) -> int:
    """A value's printed size, estimated without printing it; stops counting past `limit`."""
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(v)
            stack.extend(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            total += v.bit_length() // 3 + 1
        else:
            total += 8
    return total


def _check_value(value, what="a value") -> None:
    limit = _budget().limits.chars
    if _size(value, limit) > limit:
        raise TemplateLimit(f"{what} would print as more than {limit} characters")


_AMPLIFIERS = {"center", "ljust", "rjust", "zfill", "indent", "format", "format_map", "replace", "expandtabs",
               "join", "wordwrap", "batch", "slice", "truncate"}


def _estimate(name: str, obj, args: tuple, kwargs: dict) -> int:
    """Upper bound of what a filter or str method named `name` returns for these arguments."""
    base = _size(obj, _budget().limits.chars + 1)
    rest = [*args, *kwargs.values()]
    biggest = max((_size(a, _budget().limits.chars + 1) for a in rest), default=0)
    ints = [a for a in rest if isinstance(a, int) and not isinstance(a, bool)]
    width = max([abs(i) for i in ints] + [0])
    if name in ("format", "format_map") or name == "%":
        text = obj if isinstance(obj, str) else ""
        widths = [int(d) for d in re.findall(r"\d+", text)] or [0]
        refs = text.count("{") + text.count("%") + 1
        return len(text) + refs * (max(widths) + biggest)
    if name == "indent":
        lines = obj.count("\n") + 1 if isinstance(obj, str) else 1
        return base + lines * (max(width, biggest))
    if name == "replace":
        old = args[0] if args else kwargs.get("old", "")
        new = args[1] if len(args) > 1 else kwargs.get("new", "")
        count = (obj.count(old) if isinstance(old, str) and old else base) + 1 if isinstance(obj, str) else 1
        return base + count * (len(new) if isinstance(new, str) else 0)
    if name == "expandtabs":
        return base + (obj.count("\t") if isinstance(obj, str) else 0) * width
    if name == "join":
        seq = obj if not isinstance(obj, str) else args[0] if args else ()
        sep = obj if isinstance(obj, str) else args[0] if args and isinstance(args[0], str) else ""
        n = len(seq) if hasattr(seq, "__len__") else 0
        return _size(seq, _budget().limits.chars + 1) + n * len(sep)
    return base + width + biggest


def _guard_call(name: str, fn, obj, args, kwargs):
    _step()
    limit = _budget().limits.chars
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > limit:
            raise TemplateLimit(f"{name}() got {a}, more than the {limit}-character limit")
        _check_value(a, f"an argument of {name}()")
    if name in _AMPLIFIERS:
        _check_chars(_estimate(name, obj, args, kwargs), f"the result of {name}()")
    result = fn()
    _made(result)
    return result


def _wrap_filter(name: str, f):
    passes = getattr(f, "jinja_pass_arg", None) is not None

    @functools.wraps(f)
    def guarded(*args, **kwargs):
        lead, rest = (args[:2], args[2:]) if passes else (args[:1], args[1:])
        value = lead[-1] if lead else None
        if value is not None:
            _check_value(value, f"the input of |{name}")
        return _guard_call(name, lambda: f(*args, **kwargs), value, rest, kwargs)
    return guarded


def _loop(iterable):
    """Every {% for %} iterates through this: a step per iteration."""
    for item in iterable:
        _step()
        yield item


def _piece(value):
    """Every part of a ~ concatenation: printed size checked before it is made into a string."""
    _step()
    _check_value(value, "a ~ operand")
    return value


def _finalize(value):
    """Every {{ value }}: printed size checked before it is made into a string."""
    if not isinstance(value, str):
        _check_value(value, "a printed value")
    return value


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus bounds on time, sizes and steps (TemplateLimits)."""

    intercepted_binops = frozenset(["*", "**", "+", "%", "//", "/"])

    def _parse(self, source, name, filename):
        tree = super()._parse(source, name, filename)
        for node in tree.find_all(jinja2.nodes.For):
            node.iter = jinja2.nodes.Call(jinja2.nodes.ImportedName("edgert.chat._loop"), [node.iter], [], None, None,
                                          lineno=node.lineno)
        for node in tree.find_all(jinja2.nodes.Concat):
            node.nodes = [jinja2.nodes.Call(jinja2.nodes.ImportedName("edgert.chat._piece"), [n], [], None, None,
                                            lineno=node.lineno) for n in node.nodes]
        return tree

    def call_binop(self, context, operator, left, right):
        b = _step()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple, bytes)) and isinstance(n, int):
                    _check_chars(len(seq) * max(n, 0), "a repeated string or list")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > b.limits.int_bits:
                raise TemplateLimit(f"an integer product would have more than {b.limits.int_bits} bits")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 \
                    and right * left.bit_length() > b.limits.int_bits:
                raise TemplateLimit(f"a power would have more than {b.limits.int_bits} bits")
        elif operator == "%" and isinstance(left, str):
            _check_value(right, "a % operand")
            _check_chars(_estimate("%", left, right if isinstance(right, tuple) else (right,), {}), "a % formatting")
        result = super().call_binop(context, operator, left, right)
        _made(result)
        return result

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text, name = value.__self__, value.__name__

        def guarded(*args, **kwargs):
            _check_chars(_estimate(name, text, args, kwargs), f"the result of {name}()")
            result = wrapped(*args, **kwargs)
            _made(result)
            return result
        return guarded

    def call(self, context, obj, /, *args, **kwargs):
        owner = getattr(obj, "__self__", None)
        name = getattr(obj, "__name__", "call") if isinstance(owner, (str, list, dict, tuple)) else "call"
        return _guard_call(name, lambda: super(_BoundedEnvironment, self).call(context, obj, *args, **kwargs),
                           owner, args, kwargs)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, optimized=False, finalize=_finalize,
                              extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _wrap_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    return env


_ENV = _environment()


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    return _ENV.from_string(template)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True,
                limits: TemplateLimits | None = None, variables: dict | None = None, **special) -> str:
    """Render `messages` with a chat template, in a sandbox, as transformers' apply_chat_template.

    `special` passes extra variables such as bos_token="<s>", eos_token="</s>", tools=[...] or
    enable_thinking=False (tools and documents default to None, as in transformers); `variables`
    the same as a dict, whose names may be anything (a request's chat_template_kwargs) but
    `messages` and `add_generation_prompt`, which the rendering sets itself.
    Encode the result with add_special_tokens=False: the template already holds any BOS.
    Rendering is bounded by `limits` (default LIMITS: time, sizes, steps; per call, thread-safe).
    Any failure (syntax, raise_exception, sandbox violation, a limit, recursion, overflow,
    memory) raises ValueError with one line.
    """
    limits = limits or LIMITS
    chat = []
    for message in messages:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    variables = {"tools": None, "documents": None, **special, **(variables or {})}
    for name in ("messages", "add_generation_prompt"):
        if name in variables:
            raise ValueError(f"chat template variable {name!r} cannot be set")
    if not isinstance(template, str) or len(template) > limits.source_chars:
        raise ValueError(f"chat template refused: longer than {limits.source_chars} characters")
    token = _BUDGET.set(_Budget(limits))
    try:
        out, size = [], 0
        for chunk in _compile(template).generate({**variables, "messages": chat,      # (a dict: any names, "self" too)
                                                  "add_generation_prompt": add_generation_prompt}):
            size += len(chunk)
            if size > limits.chars:
                raise TemplateLimit(f"the output would be longer than {limits.chars} characters")
            out.append(chunk)
        return "".join(out)
    except TemplateLimit as e:
        raise ValueError(f"chat template stopped: {e} (limit)") from None
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template syntax error, line {e.lineno}: {e.message}".splitlines()[0]) from None
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template error: {type(e).__name__}: {e}".splitlines()[0][:300]) from None
    except RecursionError:
        raise ValueError("chat template failed: recursion too deep (a macro or recursive loop calls itself without end)") from None
    except MemoryError:
        raise ValueError("chat template failed: out of memory") from None
    except OverflowError as e:
        raise ValueError(f"chat template failed: a number too large ({e})".splitlines()[0][:300]) from None
    except Exception as e:     # anything a method called from the template raises
        raise ValueError(f"chat template failed: {type(e).__name__}: {e}".splitlines()[0][:300]) from None
    finally:
        _BUDGET.reset(token)
