"""Chat templates: find a model's Jinja chat template and render it as transformers does.

Callers encode the rendered text with ``Tokenizer.encode(text, add_special_tokens=False)``,
as transformers' ``apply_chat_template`` does: templates already write BOS where the model
wants it, so the tokenizer's own post-processor must not add another.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["load_chat_template", "render_chat"]

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
        return jinja_file.read_text(encoding="utf-8")
    config_file = model_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


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
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    return env


_ENV = _environment()


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    return _ENV.from_string(template)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **special) -> str:
    """Render `messages` with a chat template, in a sandbox, as transformers' apply_chat_template.

    `special` passes extra variables such as bos_token="<s>", eos_token="</s>", tools=[...] or
    enable_thinking=False (tools and documents default to None, as in transformers).
    Encode the result with add_special_tokens=False: the template already holds any BOS.
    A template error (syntax, raise_exception, sandbox violation...) raises ValueError.
    """
    chat = []
    for message in messages:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    variables = {"tools": None, "documents": None, **special}
    try:
        return _compile(template).render(messages=chat, add_generation_prompt=add_generation_prompt,
                                         **variables)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template syntax error, line {e.lineno}: {e.message}") from None
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template error: {type(e).__name__}: {e}".splitlines()[0]) from None
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"chat template failed: {type(e).__name__}: {e}".splitlines()[0]) from None
