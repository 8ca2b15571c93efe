"""edgert.chat: template loading, rendering, sandboxing, and agreement with transformers."""
from __future__ import annotations

import json

import pytest

from edgert.chat import load_chat_template, render_chat
from edgert.tokenizer import Tokenizer

# ChatML as the Qwen2/2.5 family writes it: default system prompt, tools block, generation prompt.
CHATML = (
    "{%- if tools %}\n"
    "{{- '<|im_start|>system\\n' }}\n"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}\n"
    "{{- '# Tools\\n<tools>' }}\n"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}\n"
    "{{- '\\n</tools><|im_end|>\\n' }}\n"
    "{%- elif messages[0].role == 'system' %}\n"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "  {%- if message.role == 'system' and loop.first %}{% continue %}{% endif %}\n"
    "  {%- if message.role not in ['user', 'assistant', 'system'] %}"
    "{{ raise_exception('unknown role ' ~ message.role) }}{% endif %}\n"
    "  {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "  {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# An R1-distill-like template: BOS from a variable, namespace state, reasoning cut from history.
R1_STYLE = """{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}
{% set ns = namespace(system='') %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}{% set ns.system = message['content'] %}{% endif %}
{%- endfor %}
{{ bos_token }}{{ ns.system }}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}{{ '<|User|>' + message['content'] }}
    {%- elif message['role'] == 'assistant' %}
        {%- set content = message['content'] %}
        {%- if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}
        {{- '<|Assistant|>' + content + eos_token }}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}{{ '<|Assistant|><think>\\n' }}{% endif %}"""

# Indented block tags (lstrip_blocks/trim_blocks), `is none` tests of tools/documents, and the
# reasoning aliases transformers adds (a "reasoning" key is also readable as "thinking").
WHITESPACE = """{% for message in messages %}
    {% if message.role == 'user' %}
  [U] {{ message.content }}
    {% else %}
  [{{ message.role }}] {% if message.thinking %}({{ message.thinking }}) {% endif %}{{ message.content }}
    {% endif %}
{% endfor %}
{% if tools is not none %}TOOLS{% endif %}{% if documents is none %}NODOCS{% endif %}
{% if add_generation_prompt %}[assistant]{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi! Wie geht's? 你好 😀"},
    {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello!", "reasoning": "greeting"},
    {"role": "user", "content": "2+2?\n  trailing  "},
]


def test_chatml_rendering():
    out = render_chat(CHATML, MESSAGES[1:2])
    assert out == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                   "<|im_start|>user\nHi! Wie geht's? 你好 😀<|im_end|>\n<|im_start|>assistant\n")
    out = render_chat(CHATML, MESSAGES, add_generation_prompt=False)
    assert out.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert out.endswith("<|im_start|>user\n2+2?\n  trailing  <|im_end|>\n")
    tools = [{"type": "function", "function": {"name": "add", "description": "a+b <&>"}}]
    out = render_chat(CHATML, MESSAGES[1:2], tools=tools)
    assert '\n{"type": "function", "function": {"name": "add", "description": "a+b <&>"}}\n' in out


def test_special_variables_pass_through():
    out = render_chat(R1_STYLE, MESSAGES, bos_token="<BOS>", eos_token="<EOS>")
    assert out.startswith("<BOS>Be brief.<|User|>Hi!")
    assert "<|Assistant|>\n\nHello!<EOS><|User|>2+2?" in out
    assert out.endswith("<|Assistant|><think>\n")
    assert render_chat("{{ strftime_now('%Y') | length }}", []) == "4"


def test_raise_exception_becomes_value_error():
    with pytest.raises(ValueError, match="unknown role tool") as info:
        render_chat(CHATML, [{"role": "tool", "content": "x"}])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="syntax"):
        render_chat("{% if %}", MESSAGES)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{% set x = [] %}{{ x.append(1) }}",
    "{% set ns = namespace() %}{% set ns._secret = 1 %}",
])
def test_sandbox_blocks_escapes(template):
    with pytest.raises(ValueError):
        render_chat(template, MESSAGES)


def test_load_chat_template(tmp_path):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A"}))
    assert load_chat_template(tmp_path) == "A"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert load_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J", encoding="utf-8")
    assert load_chat_template(tmp_path) == "J"   # the separate file wins, as in transformers


def test_whitespace_control_and_defaults():
    out = render_chat(WHITESPACE, MESSAGES[1:3])
    assert out == ("  [U] Hi! Wie geht's? 你好 😀\n  [assistant] (greeting) <think>\nThe user greets me.\n"
                   "</think>\n\nHello!\nNODOCS[assistant]")


@pytest.mark.parametrize("template", [CHATML, R1_STYLE, WHITESPACE])
@pytest.mark.parametrize("gen", [True, False])
def test_matches_transformers_apply_chat_template(tmp_path, template, gen):
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    try:
        from test_tokenizer import build_qwen2
    except ImportError:   # tests/ became a package
        from tests.test_tokenizer import build_qwen2

    d = build_qwen2(tmp_path / "tok", legacy_merges=False)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(d / "tokenizer.json"), chat_template=template,
        bos_token="<|endoftext|>", eos_token="<|im_end|>")
    want = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
    got = render_chat(template, MESSAGES, add_generation_prompt=gen,
                      bos_token="<|endoftext|>", eos_token="<|im_end|>")
    assert got == want
    want_ids = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=gen)
    want_ids = want_ids["input_ids"] if not isinstance(want_ids, list) else want_ids
    for backend in ("python", "tokenizers"):
        assert Tokenizer.from_dir(d, backend=backend).encode(got, add_special_tokens=False) == list(want_ids)


def test_load_and_render_stories260k():
    from conftest import STORIES as stories
    assert load_chat_template(stories) is None   # a base model: no template
