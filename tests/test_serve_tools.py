"""OpenAI tool calls through `edgert serve`, with the real `openai` client against a real server.

The model is scripted, not trained: a one-layer Llama whose attention and MLP are zero, so its next
token depends on the last token alone (embedding -> lm_head), set so that after the generation
prompt it writes `<tool_call>`, one call, `</tool_call>`, EOS, and EOS after anything else. Its
tokenizer is stories260K's with those pieces as added tokens, its chat template renders `tools` the
way Qwen's does. So every step of the path is real (export, onnxruntime, the batch engine, the
stream decoder, the parser, the HTTP shapes), and the prompts are checked against transformers'
own `apply_chat_template`.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import BUNDLED_STORIES, drive, make_checkpoint
from edgert.tools import FORMATS, ToolFormat, detect
from test_serve import Server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

ASSISTANT, OPEN, CLOSE, ARGS, EOS = 512, 513, 515, 516, 2
CALL = '\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
ARGUMENTS = ' {"city": "Paris", "unit": "celsius"}}\n'
PIECES = {512: ("<|assistant|>", True), 513: ("<tool_call>", False), 514: (CALL, False), 515: ("</tool_call>", False),
          516: (ARGUMENTS, False)}
TEMPLATE = (
    "{%- if tools %}<|system|>You may call these functions:\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}"
    "\n</tools>\nAnswer a call as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>{{ m.content or '' }}"
    "{%- for c in m.tool_calls %}<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "\n</tool_call>{% endfor %}</s>"
    "{%- elif m.role == 'tool' %}<|user|><tool_response>\n{{ m.content }}\n</tool_response>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}{% if m.role == 'assistant' %}</s>{% endif %}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "unit": {"type": "string"}}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
FORCED_NAMED = '<tool_call>\n{"name": "get_time", "arguments":'        # what tool_choice get_time makes the answer begin with


def _script(model, named_last: int):
    """Next token = f(last token): chain ASSISTANT -> OPEN -> CALL -> CLOSE -> EOS; the last token of
    a named call's forced text (tool_choice) -> ARGS -> CLOSE; anything else -> EOS."""
    for name, p in model.named_parameters():
        p.fill_(1.0) if "norm" in name else p.zero_()
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    emb[:, 5] = 1.0
    head[EOS, 5] = 10.0
    links = [(ASSISTANT, OPEN), (OPEN, 514), (514, CLOSE), (CLOSE, EOS), (named_last, ARGS), (ARGS, CLOSE)]
    for k, (t, nxt) in enumerate(links):
        k += k >= 5                          # (dimension 5 is everything else's)
        emb[t] = 0.0
        emb[t, k] = 1.0
        head[nxt, k] = 10.0


def _scripted_checkpoint(folder, pieces: dict, forced_named: str, template: str):
    """The scripted one-layer checkpoint with stories260K's tokenizer plus `pieces` (id -> (text, special))
    and `template`; the token that ends `forced_named` (tool_choice's forced text) leads to ARGS."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = json.loads((BUNDLED_STORIES / "tokenizer.json").read_text())
    tok["added_tokens"] += [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": special} for i, (c, special) in pieces.items()]
    named = tokenizers.Tokenizer.from_str(json.dumps(tok)).encode(forced_named, add_special_tokens=False).ids
    assert named[0] == OPEN and named[-1] not in pieces
    src = make_checkpoint(folder, "llama", num_hidden_layers=1, vocab_size=max(pieces) + 1,
                          max_position_embeddings=1024, tweak=lambda m: _script(m, named[-1]))
    (src / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("added_tokens_decoder", None)
    (src / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    return src


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, exported):
    src = _scripted_checkpoint(tmp_path_factory.mktemp("tools") / "hf", PIECES, FORCED_NAMED, TEMPLATE)
    return src, exported(src, 32)


@pytest.fixture(scope="module")
def server(scripted):
    s = Server(scripted[1], "--parallel", "2")
    yield s
    s.stop()
    assert "Traceback" not in s.output(), s.output()[-3000:]


def hf_prompt_tokens(src, messages, tools=None) -> int:
    """The prompt as transformers renders it, in tokens of the `tokenizers` library (the reference for
    tokenizer.json; transformers 5 rebuilds a Llama tokenizer's pre-tokenizer its own way)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    text = transformers.AutoTokenizer.from_pretrained(src).apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return len(tokenizers.Tokenizer.from_file(str(src / "tokenizer.json")).encode(text, add_special_tokens=False).ids)


def test_a_call_comes_back_as_tool_calls(server, scripted):
    client = server.client()
    r = client.chat.completions.create(model="art", messages=ASK, tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    # the tools were rendered by the template, as transformers renders them
    assert r.usage.prompt_tokens == hf_prompt_tokens(scripted[0], ASK, TOOLS)
    assert r.usage.completion_tokens == 3                 # <tool_call>, the call, </tool_call> (then EOS)

    # streamed: the same call, in one tool_calls delta before the finish chunk
    chunks = list(client.chat.completions.create(model="art", messages=ASK, tools=TOOLS, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""
    streamed = [t for d in deltas for t in d.tool_calls or ()]
    assert len(streamed) == 1 and streamed[0].index == 0 and streamed[0].function.name == "get_weather"
    assert json.loads(streamed[0].function.arguments) == json.loads(call.function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    # n=2: both choices of the batch come back as calls
    r = client.chat.completions.create(model="art", messages=ASK, tools=TOOLS, temperature=0, n=2)
    assert [c.finish_reason for c in r.choices] == ["tool_calls"] * 2


def test_without_tools_the_text_is_the_answer(server, scripted):
    client = server.client()
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):    # none: the model is not told of them
        r = client.chat.completions.create(model="art", messages=ASK, temperature=0, **extra)
        assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
        assert r.choices[0].message.content == "<tool_call>" + CALL + "</tool_call>"
        assert r.usage.prompt_tokens == hf_prompt_tokens(scripted[0], ASK)
    # cut inside the call (max_tokens): no call, its text is the answer
    r = client.chat.completions.create(model="art", messages=ASK, tools=TOOLS, temperature=0, max_tokens=2)
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == "<tool_call>" + CALL


def test_the_next_turn_renders_the_call_and_its_result(server, scripted):
    client = server.client()
    first = client.chat.completions.create(model="art", messages=ASK, tools=TOOLS, temperature=0).choices[0].message
    turn = ASK + [first.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": '{"temperature": 21}'}]
    r = client.chat.completions.create(model="art", messages=turn, tools=TOOLS, temperature=0)
    # transformers' templates read the arguments as an object (OpenAI sends a JSON string)
    calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                             "arguments": json.loads(c.function.arguments)}}
             for c in first.tool_calls]
    expect = ASK + [{"role": "assistant", "content": None, "tool_calls": calls}, turn[-1]]
    assert r.usage.prompt_tokens == hf_prompt_tokens(scripted[0], expect, TOOLS)


def test_tool_choice_forces_a_call(server, scripted):
    """required: the answer begins with a call although the model would answer in text (its call
    marker biased away); a named function: the call is to that function, whatever the model prefers."""
    client = server.client()
    never = {"logit_bias": {str(OPEN): -100}}
    r = client.chat.completions.create(model="art", messages=ASK, tools=TOOLS, temperature=0, **never)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls     # auto: no call
    for stream in (False, True):
        r = client.chat.completions.create(model="art", messages=ASK, tools=TOOLS, temperature=0, tool_choice="required",
                                           stream=stream, **never)
        if stream:
            deltas = [c.choices[0].delta for c in r if c.choices]
            calls = [t for d in deltas for t in d.tool_calls or ()]
            assert "".join(d.content or "" for d in deltas) == ""
        else:
            assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
            calls = r.choices[0].message.tool_calls
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
            [("get_weather", {"city": "Paris", "unit": "celsius"})]
    two = TOOLS + [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    r = client.chat.completions.create(model="art", messages=ASK, tools=two, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert r.usage.completion_tokens == len(server_tokens(scripted[0], FORCED_NAMED)) + 2     # + ARGS, </tool_call>


def server_tokens(src, text: str) -> list[int]:
    from edgert.tokenizer import Tokenizer
    return Tokenizer.from_dir(src).encode(text, add_special_tokens=False)


def test_tool_requests_that_cannot_be_done_are_400s(server):
    url = server.url + "/v1/chat/completions"
    for body, param, code in (
            ({"tool_choice": "required"}, "tool_choice", None),                        # required, but no tools
            ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice", None),
            ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"nom": "get_weather"}}}, "tool_choice", None),
            ({"tools": TOOLS, "tool_choice": {"type": "function", "function": "get_weather"}}, "tool_choice", None),
            ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", None),
            ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools", None),
            ({"tools": [{"type": "retrieval"}]}, "tools", None),
            ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools", None),
            ({"tools": TOOLS * 129}, "tools", None),
            ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", None),
            ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"function": {"name": 5}}]}]}, "messages", None),
            ({"messages": ASK + [{"role": "user", "tool_calls": []}]}, "messages", None)):
        r = httpx.post(url, json={"messages": ASK, **body}, timeout=10)
        assert r.status_code == 400, (body, r.text)
        e = r.json()["error"]
        assert e["param"] == param and (code is None or e["code"] == code), (body, e)


# -- the parser and the format's detection (no server) ---------------------------------------------

HERMES, LFM2 = FORMATS


def test_hermes_calls_parse_and_what_is_not_a_call_stays_text():
    text = ('<tool_call>\n{"name": "a", "arguments": {"x": [1, {"y": "z"}]}}\n</tool_call>\n'
            '<tool_call>{"name": "b.c", "arguments": "{\\"k\\": 2}"}</tool_call> and so')
    rest, calls = HERMES.split(text)
    assert rest == "and so"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("a", {"x": [1, {"y": "z"}]}), ("b.c", {"k": 2})]
    assert len({c["id"] for c in calls}) == 2
    assert HERMES.split('<tool_call>{"name": "a", "arguments": {"x": 1}}') is not None     # EOS before the close
    rest, calls = HERMES.split("<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
                               "<parameter=days>\n3\n</parameter>\n<parameter=opts>\n{\"a\": [1]}\n</parameter>\n"
                               "</function>\n</tool_call>")                          # Qwen3.5's XML form
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "New York", "days": 3, "opts": {"a": [1]}}
    assert calls[0]["function"]["name"] == "get_weather" and rest == ""
    for bad in ('<tool_call>{"name": "a", "arguments": {"x": 1}</tool_call>',          # broken JSON
                '<tool_call>{"arguments": {}}</tool_call>',                                # no name
                '<tool_call>{"name": "a b", "arguments": {}}</tool_call>',                  # not a function name
                '<tool_call>{"name": "a", "arguments": [1]}</tool_call>',                  # arguments not an object
                '<tool_call>["a"]</tool_call>', '<tool_call></tool_call>', "no call at all",
                '<tool_call><function=a b><parameter=x>1</parameter></function></tool_call>',
                '<tool_call><function=a><parameter=x>1</parameter></tool_call>'):      # XML: a bad name, unclosed
        assert HERMES.split(bad) is None, bad


def test_lfm2_calls_are_python_calls_with_literal_arguments():
    rest, calls = LFM2.split('<|tool_call_start|>[get_weather(city="Paris", days=[1, 2]), now()]<|tool_call_end|>')
    assert rest == ""
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris", "days": [1, 2]}), ("now", {})]
    for bad in ('<|tool_call_start|>[f(__import__("os"))]<|tool_call_end|>',       # positional, not literal
                '<|tool_call_start|>[f(x=open("/etc/passwd"))]<|tool_call_end|>',  # not a literal
                '<|tool_call_start|>f(x=1)<|tool_call_end|>',                        # not a list
                '<|tool_call_start|>[f(x=1]<|tool_call_end|>', "<|tool_call_start|>[" + "(" * 500):
        assert LFM2.split(bad) is None, bad


def test_the_format_comes_from_the_template_and_vocabulary():
    none = {}.get
    assert detect(TEMPLATE, none) is HERMES
    assert detect("{% for m in messages %}{{ m.content }}{% endfor %}<tool_call>", none) is None      # no tools
    assert detect("{% if tools %}{{ tools | tojson }}{% endif %}", {"<|tool_call_start|>": 9}.get) is LFM2
    assert detect("{% if tools %}{{ tools | tojson }}{% endif %}", none) is None        # calls in no known form
    assert detect(None, none) is None
    assert isinstance(HERMES, ToolFormat)


def test_a_call_split_over_many_tokens_never_leaks_into_the_streamed_answer():
    """The stream holds back what may begin a call; markers that are special tokens (skipped by the
    decoder) still count as text; the answer's own text before the call streams."""
    from edgert.generate import Step
    from edgert.serve import ChoiceText
    from edgert.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(BUNDLED_STORIES)                # no added tokens: the markers are many pieces
    text = 'Sure thing.<tool_call>{"name": "f", "arguments": {"k": "<v>"}}</tool_call>'
    t = ChoiceText(tok, (), True, [], HERMES)
    streamed = "".join(t.push(Step(i, False))[1] for i in tok.encode(text, add_special_tokens=False))
    assert streamed == "Sure thing."[:len(streamed)] and "<" not in streamed
    assert streamed + t.finish(complete=True)[1] == "Sure thing."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in t.tool_calls] == [("f", {"k": "<v>"})]

    marked = ToolFormat("hermes", "<s>", "</s>")             # markers that are special tokens: BOS and EOS here
    t = ChoiceText(tok, (), True, [], marked)
    ids = [1] + tok.encode('{"name": "g", "arguments": {}}', add_special_tokens=False) + [2]
    assert "".join(t.push(Step(i, False))[1] for i in ids) + t.finish(complete=True)[1] == ""
    assert t.tool_calls[0]["function"]["name"] == "g"


def test_a_forced_call_begins_in_each_format_and_parses_once_the_model_completes_it():
    xml = detect("{% if tools %}{{ tools | tojson }}<tool_call>\n<function=...>{% endif %}", {}.get)
    assert xml.xml and not HERMES.xml
    for fmt, rest in ((HERMES, ' {"x": 1}}\n</tool_call>'), (xml, "<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>"),
                      (LFM2, "x=1)]<|tool_call_end|>")):
        assert fmt.forced("get_time").startswith(fmt.forced(None)) and fmt.forced(None).startswith(fmt.open)
        assert fmt.forced("get_time")[len(fmt.forced(None)):].startswith("get_time" + fmt.name_ends[0])  # required: up to the name
        text = fmt.forced("get_time") + rest
        assert not fmt.forced("get_time").endswith(" ")
        _, calls = fmt.split(text)
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("get_time", {"x": 1})]


def test_a_forced_answer_prefix_waits_for_the_reasoning():
    """Decoding's answer_prefix replaces the answer's first sampled token; a reasoning model may still
    open its reasoning with its first token, and the prefix follows </think>."""
    from edgert.generate import Decoding, Sampling
    THINK, END, WORD, P1, P2 = 10, 11, 12, 20, 21

    def run(prompt, picks, **kw):
        dec = Decoding(prompt, 20, Sampling(0.0), stop_ids=[EOS], think=(THINK, END), answer_prefix=[P1, P2], **kw)
        return [(step.id, step.forced) for step in drive(dec, picks, 32)]
    # no reasoning: the prefix first (even in place of EOS), then the model
    assert run([1, 5], [WORD, WORD, WORD]) == [(P1, True), (P2, True), (WORD, False)]
    assert run([1, 5], [EOS, EOS, EOS]) == [(P1, True), (P2, True)]
    # the model opens its reasoning: it thinks, then the answer begins with the prefix
    assert run([1, 5], [THINK, WORD, END, WORD, WORD, WORD]) == \
        [(THINK, False), (WORD, False), (END, False), (P1, True), (P2, True), (WORD, False)]
    # the prompt opened it (R1's templates); a think budget closes it with forced tokens first
    assert run([1, THINK], [WORD, WORD, WORD, WORD, WORD], think_budget=1, close_think_ids=[END]) == \
        [(WORD, False), (END, True), (P1, True), (P2, True), (WORD, False)]


def test_required_keeps_the_call_to_one_of_the_functions():
    """tool_choice required with several functions: the forced text stops where the name begins, and
    the model's name is kept to the tools' (it would write get_wether; it writes get_weather); each
    token's text is read inside a text (a SentencePiece word keeps its space)."""
    from edgert.generate import Decoding, Sampling
    from edgert.tokenizer import Tokenizer
    from edgert.tools import PHI4, NameChoice, Pieces
    tok = Tokenizer.from_dir(BUNDLED_STORIES)
    pieces = Pieces(tok, 512)
    word = tok.encode("a the", add_special_tokens=False)[-1]
    assert pieces.text[word] == " the" and tok.decode([word]) == "the"
    for fmt in (HERMES, LFM2, PHI4):
        wrong = tok.encode(fmt.forced("get_wether") + ' {"x": 1}}', add_special_tokens=False)
        for choice in (None, NameChoice(["get_time", "get_weather"], fmt, pieces)):
            prefix = tok.encode(fmt.forced(None), add_special_tokens=False)
            dec = Decoding([1, 5], 40, Sampling(0.0), stop_ids=[EOS], choice=choice, answer_prefix=prefix)
            assert wrong[:len(prefix)] == prefix
            picks = [7] * len(prefix) + wrong[len(prefix):]          # (the prefix's places: any token)
            text = tok.decode([step.id for step in drive(dec, picks, 512)])
            name = text[len(fmt.forced(None)):].split(fmt.name_ends[0])[0]
            assert text.startswith(fmt.forced(None)) and name == ("get_wether" if choice is None else "get_weather"), text
            assert choice is None or not choice.mask(np.zeros(512, np.float32)).min() == -np.inf   # free again after it


# -- Phi-4-mini: the tools in the system message, calls as a JSON list ------------------------------

PHI_TEMPLATE = (     # Phi-4-mini-instruct's: the tools are a JSON string in the system message, nothing else reads them
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
PHI_CALL = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
PHI_PIECES = {512: ("<|assistant|>", True), 513: ("<|tool_call|>", True), 514: (PHI_CALL, False),
              515: ("<|/tool_call|>", True), 516: (' {"city": "Paris"}}]', False), 517: ("<|tool|>", True),
              518: ("<|/tool|>", True), 519: ("<|end|>", True), 520: ("<|system|>", True), 521: ("<|user|>", True)}
PHI_NAMED = '<|tool_call|>[{"name": "get_time", "arguments":'


@pytest.fixture(scope="module")
def phi(tmp_path_factory, exported):
    """The scripted model (ASSISTANT -> <|tool_call|> -> the call -> <|/tool_call|> -> EOS) with
    Phi-4-mini's template and markers; a server on it."""
    src = _scripted_checkpoint(tmp_path_factory.mktemp("phi4") / "hf", PHI_PIECES, PHI_NAMED, PHI_TEMPLATE)
    s = Server(exported(src, 32))
    yield src, s
    s.stop()
    assert "Traceback" not in s.output(), s.output()[-3000:]


def test_phi4_reads_its_tools_from_the_system_message_and_writes_calls_as_a_list(phi):
    from edgert.tools import DEFAULT_SYSTEM
    src, server = phi
    client = server.client()
    spec = json.dumps([t["function"] for t in TOOLS])
    r = client.chat.completions.create(model="art", messages=ASK, tools=TOOLS, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    (call,) = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    # the prompt: the template's own system message with the tools (opened with Phi-4's line when the request has none)
    assert r.usage.prompt_tokens == hf_prompt_tokens(src, [{"role": "system", "content": DEFAULT_SYSTEM, "tools": spec}] + ASK)
    mine = [{"role": "system", "content": "Be brief."}] + ASK
    r2 = client.chat.completions.create(model="art", messages=mine, tools=TOOLS, temperature=0)
    assert r2.usage.prompt_tokens == hf_prompt_tokens(src, [{**mine[0], "tools": spec}] + ASK)
    # the next turn: the earlier call in the assistant's text, as the model wrote it (the template reads content only)
    turn = ASK + [r.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    r3 = client.chat.completions.create(model="art", messages=turn, tools=TOOLS, temperature=0)
    written = "<|tool_call|>" + json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}}]) + "<|/tool_call|>"
    assert r3.usage.prompt_tokens == hf_prompt_tokens(src, [{"role": "system", "content": DEFAULT_SYSTEM, "tools": spec}] + ASK + [
        {"role": "assistant", "content": written}, turn[-1]])
    # tool_choice naming the other function: forced up to its arguments, the model writes them
    two = TOOLS + [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    for stream in (False, True):
        r = client.chat.completions.create(model="art", messages=ASK, tools=two, temperature=0, stream=stream,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
        calls = [t for c in r for t in c.choices[0].delta.tool_calls or ()] if stream else r.choices[0].message.tool_calls
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_time", {"city": "Paris"})]


def test_phi4_calls_parse_with_or_without_the_list_brackets():
    from edgert.tools import PHI4
    assert detect(PHI_TEMPLATE, {"<|tool_call|>": 513}.get) is PHI4
    assert detect(PHI_TEMPLATE, {}.get) is None                       # no <|tool_call|> in the vocabulary
    for text in ('<|tool_call|>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": "{}"}]<|/tool_call|>',
                 '<|tool_call|>{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}'):   # no brackets, no close
        rest, calls = PHI4.split(text)
        assert rest == "" and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
            [("a", {"x": 1}), ("b", {})]
    _, calls = PHI4.split(PHI4.forced("get_time") + ' {"x": 1}}]<|/tool_call|>')
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("get_time", {"x": 1})]
    for bad in ('<|tool_call|>[{"name": "a", "arguments": [1]}]<|/tool_call|>', '<|tool_call|>["a"]<|/tool_call|>',
                '<|tool_call|>[]<|/tool_call|>', '<|tool_call|>{"name": "a b", "arguments": {}}<|/tool_call|>'):
        assert PHI4.split(bad) is None, bad
