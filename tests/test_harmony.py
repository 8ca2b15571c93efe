"""gpt-oss's harmony format: an answer is messages `<|start|>assistant<|channel|>NAME<|message|>TEXT<|end|>`,
the analysis channel its reasoning. Its headers (`assistant`, `final`, `analysis` are ordinary words of
the vocabulary) must never reach the answer's text, and the analysis must come back as reasoning.

The model is scripted as in test_serve_tools.py: one Llama layer with zero attention and MLP, so the
next token depends on the last one alone: after the generation prompt (`<|start|>assistant`) it writes
`<|channel|>final<|message|> {"city": "Paris"}<|return|>`, or `analysis` for `final` where a
logit_bias forbids `final`, or a call to get_weather (`commentary to=functions.get_weather`) where it
forbids both.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import BUNDLED_STORIES, drive, make_checkpoint
from edgert.generate import Channels, Decoding, Sampling
from test_serve import Server

openai = pytest.importorskip("openai")

START, CHANNEL, MESSAGE, END, RETURN, ANSWER, ANALYSIS, FINAL, ASSISTANT, COMMENTARY = range(512, 522)
TEXT = ' {"city": "Paris"}'
PIECES = {START: ("<|start|>", True), CHANNEL: ("<|channel|>", True), MESSAGE: ("<|message|>", True),
          END: ("<|end|>", True), RETURN: ("<|return|>", True), ANSWER: (TEXT, False), ANALYSIS: ("analysis", False),
          FINAL: ("final", False), ASSISTANT: ("assistant", False),
          COMMENTARY: ("commentary to=functions.get_weather json", False)}
TEMPLATE = ("{%- if tools %}<|start|>developer<|message|># Tools\n{{ tools | tojson }}<|end|>{% endif %}"
            "{%- if reasoning_effort is defined %}<|start|>system<|message|>Reasoning: {{ reasoning_effort }}<|end|>{% endif %}"
            "{%- for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{%- endfor %}"
            "{%- if add_generation_prompt %}<|start|>assistant{%- endif %}")
ASK = [{"role": "user", "content": "Why is the sky blue?"}]


def _script(model):
    for name, p in model.named_parameters():
        p.fill_(1.0) if "norm" in name else p.zero_()
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    emb[:, 5] = 1.0
    head[RETURN, 5] = 10.0                   # anything else -> <|return|>
    links = [(ASSISTANT, {CHANNEL: 10.0}), (CHANNEL, {FINAL: 10.0, ANALYSIS: 5.0, COMMENTARY: 3.0}),
             (FINAL, {MESSAGE: 10.0}), (ANALYSIS, {MESSAGE: 10.0}), (COMMENTARY, {MESSAGE: 10.0}), (MESSAGE, {ANSWER: 10.0}), (ANSWER, {RETURN: 10.0})]
    for k, (t, nxt) in enumerate(links):
        k += k >= 5
        emb[t] = 0.0
        emb[t, k] = 1.0
        for n, v in nxt.items():
            head[n, k] = v


@pytest.fixture(scope="module")
def art(tmp_path_factory, exported):
    src = make_checkpoint(tmp_path_factory.mktemp("harmony") / "hf", "llama", num_hidden_layers=1, vocab_size=522,
                          max_position_embeddings=1024, eos_token_id=RETURN, tweak=_script)
    tok = json.loads((BUNDLED_STORIES / "tokenizer.json").read_text())
    tok["added_tokens"] += [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": special} for i, (c, special) in PIECES.items()]
    (src / "tokenizer.json").write_text(json.dumps(tok))
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [RETURN, 2]}))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("added_tokens_decoder", None)
    (src / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE, "eos_token": "<|return|>"}))
    return exported(src, 32)


def test_the_python_api_and_run_give_the_final_channel_as_the_answer(art):
    from edgert.llm import LLM
    llm = LLM(art)
    assert llm.channels == Channels(START, CHANNEL, MESSAGE, END, (ANALYSIS,), (CHANNEL, FINAL, MESSAGE),
                                    (END, START, ASSISTANT, CHANNEL, FINAL, MESSAGE))
    tokens = list(llm.generate("Why is the sky blue?", max_tokens=20, temperature=0))
    assert [t.id for t in tokens] == [CHANNEL, FINAL, MESSAGE, ANSWER]
    assert [t.hidden for t in tokens] == [True, True, True, False] and not any(t.reasoning for t in tokens)
    assert "".join(t.text for t in tokens) == TEXT.strip()           # (Llama's decoder drops a leading space)
    chat = llm.chat()
    reply = "".join(t.text for t in chat.send("Why is the sky blue?", max_tokens=20, temperature=0))
    assert reply.strip() == TEXT.strip() and chat.messages[-1]["content"] == TEXT.strip()
    assert llm.close_think_ids() == list(llm.channels.close) == [END, START, ASSISTANT, CHANNEL, FINAL, MESSAGE]


def test_votes_count_the_final_channel(art):
    from edgert.llm import LLM
    r = LLM(art, slots=2).vote("Why is the sky blue?", n=2, max_tokens=20, temperature=0.3, seed=0)
    assert [v["answer"] for v in r["votes"]] == [TEXT.strip()] * 2 and r["counts"] == {r["answer"]: 2}
    assert r["answer_text"] == TEXT.strip() and [v["text"].strip() for v in r["votes"]] == [TEXT.strip()] * 2
    out = subprocess.run([sys.executable, "-m", "edgert.cli", "run", str(art), "Why?", "--votes", "2", "--temperature",
                          "0.3", "--seed", "0", "--max-tokens", "20"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == TEXT.strip(), out.stderr        # `run --votes` prints it


@pytest.fixture(scope="module")
def server(art):
    s = Server(art)
    yield s
    s.stop()
    assert "Traceback" not in s.output(), s.output()[-3000:]


def test_the_server_returns_the_analysis_as_reasoning_and_the_final_channel_as_content(server):
    if True:
        client = server.client()
        r = client.chat.completions.create(model="art", messages=ASK, temperature=0)
        m = r.choices[0].message
        assert m.content == TEXT.lstrip() and not getattr(m, "reasoning_content", None)
        assert r.choices[0].finish_reason == "stop"
        # reasoning_effort reaches gpt-oss's template (which tells the model in a system line)
        effort = client.chat.completions.create(model="art", messages=ASK, temperature=0, reasoning_effort="high")
        assert effort.usage.prompt_tokens > r.usage.prompt_tokens and effort.choices[0].message.content == TEXT.lstrip()
        # the analysis channel: reasoning, in a stream too, and never the header's words
        for stream in (False, True):
            r = client.chat.completions.create(model="art", messages=ASK, temperature=0, stream=stream,
                                               logit_bias={str(FINAL): -100})
            if stream:
                deltas = [c.choices[0].delta for c in r if c.choices]
                content = "".join(d.content or "" for d in deltas)
                reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
            else:
                content, reasoning = r.choices[0].message.content or "", r.choices[0].message.reasoning_content
                assert r.usage.completion_tokens_details.reasoning_tokens == 1
            assert content == "" and reasoning == TEXT.lstrip()
        # no reasoning asked for: the final channel although the model would think (its header forced)
        r = client.chat.completions.create(model="art", messages=ASK, temperature=0, reasoning_effort="none",
                                           logit_bias={str(FINAL): -100})
        assert r.choices[0].message.content == TEXT.lstrip() and not r.choices[0].message.reasoning_content
        # a budget of one thinking token: the analysis is cut, the answer follows on the final channel
        r = client.chat.completions.create(model="art", messages=ASK, temperature=0, logit_bias={str(FINAL): -100},
                                           extra_body={"thinking_budget_tokens": 1})
        assert r.choices[0].message.reasoning_content == TEXT.lstrip() == r.choices[0].message.content


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALL = {str(FINAL): -100, str(ANALYSIS): -100}       # the model writes its commentary message to get_weather


def _call_both_ways(client, **kw):
    """The request streamed and not: each time no text, finish_reason tool_calls, get_weather's call."""
    for stream in (False, True):
        r = client.chat.completions.create(model="art", messages=ASK, temperature=0, stream=stream, **kw)
        if stream:
            chunks = list(r)
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            calls = [t for d in deltas for t in d.tool_calls or ()]
            assert "".join(d.content or "" for d in deltas) == ""
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        else:
            assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None, kw
            calls = r.choices[0].message.tool_calls
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]


def test_gpt_oss_calls_come_back_as_tool_calls(server):
    client = server.client()
    _call_both_ways(client, tools=TOOLS, logit_bias=CALL)
    # without tools the message is text
    r = client.chat.completions.create(model="art", messages=ASK, temperature=0, logit_bias=CALL)
    assert r.choices[0].message.content == TEXT.lstrip() and not r.choices[0].message.tool_calls


def _calls(r):
    return [(c.function.name, json.loads(c.function.arguments)) for c in r.choices[0].message.tool_calls or ()]


def test_tool_choice_makes_gpt_oss_call_the_function(server, art):
    """The model would answer on the final channel; tool_choice turns that message into a commentary
    message to the function (header forced, arguments the model's), after its analysis if it thinks."""
    client = server.client()
    named = {"type": "function", "function": {"name": "get_weather"}}
    two = TOOLS + [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    r = client.chat.completions.create(model="art", messages=ASK, tools=TOOLS, temperature=0)
    assert r.choices[0].message.content == TEXT.lstrip() and not _calls(r)                    # auto: it answers
    for choice, tools in (("required", TOOLS), (named, TOOLS), (named, two)):     # required with one function: named
        _call_both_ways(client, tools=tools, tool_choice=choice)
    # a thinking budget closes the analysis into the call; reasoning_effort none opens with it
    r = client.chat.completions.create(model="art", messages=ASK, tools=TOOLS, temperature=0, tool_choice=named,
                                       logit_bias={str(FINAL): -100}, extra_body={"thinking_budget_tokens": 1})
    assert r.choices[0].message.reasoning_content == TEXT.lstrip() and _calls(r) == [("get_weather", {"city": "Paris"})]
    r = client.chat.completions.create(model="art", messages=ASK, tools=TOOLS, temperature=0, tool_choice=named,
                                       logit_bias={str(FINAL): -100}, reasoning_effort="none")
    assert not r.choices[0].message.reasoning_content and _calls(r) == [("get_weather", {"city": "Paris"})]
    # required among two: the header up to the function's name is forced, and the model's next tokens are kept
    # to one of the names and what follows a name (`NameChoice`: this model would stop at once, and cannot go
    # on to the arguments after the name either)
    r = client.chat.completions.create(model="art", messages=ASK, tools=two, temperature=0, tool_choice="required")
    assert not _calls(r) and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens >= 1 + len(art_tokens(art, "commentary to=functions.get_time "))


def art_tokens(art, text: str) -> list[int]:
    from edgert.tokenizer import Tokenizer
    return Tokenizer.from_dir(art).encode(text, add_special_tokens=False)


def test_decoding_forces_the_call_header_after_the_analysis():
    """The answer prefix replaces the channel name of the first message that is not analysis; the
    analysis itself is left alone, and a budget's close carries the header instead of final's."""
    c = Channels(START, CHANNEL, MESSAGE, END, (ANALYSIS,), (CHANNEL, FINAL, MESSAGE),
                 (END, START, ASSISTANT, CHANNEL, FINAL, MESSAGE))
    head = [COMMENTARY, 77, MESSAGE]
    dec = Decoding([1, START, ASSISTANT], 30, Sampling(0.0), stop_ids=[RETURN], channels=c, answer_prefix=head)
    seq = [CHANNEL, ANALYSIS, MESSAGE, 40, END, START, ASSISTANT, CHANNEL, FINAL, 9, 9, 42, RETURN]   # (a forced step uses a pick)
    out = [(st.id, st.reasoning, st.forced) for st in drive(dec, seq)]
    assert out == [(CHANNEL, False, False), (ANALYSIS, False, False), (MESSAGE, False, False), (40, True, False),
                   (END, False, False), (START, False, False), (ASSISTANT, False, False), (CHANNEL, False, False),
                   (COMMENTARY, False, True), (77, False, True), (MESSAGE, False, True), (42, False, False)]
    dec = Decoding([1, START, ASSISTANT], 30, Sampling(0.0), stop_ids=[RETURN], channels=c, answer_prefix=head,
                   think_budget=1, close_think_ids=c.close)
    out = [(st.id, st.forced) for st in drive(dec, [CHANNEL, ANALYSIS, MESSAGE, 40, 41] + [42] * 7)]
    assert out == [(CHANNEL, False), (ANALYSIS, False), (MESSAGE, False), (40, False), (END, True), (START, True),
                   (ASSISTANT, True), (CHANNEL, True), (COMMENTARY, True), (77, True), (MESSAGE, True), (42, False)]
    dec = Decoding([1, START, ASSISTANT], 30, Sampling(0.0), stop_ids=[RETURN], channels=c, answer_prefix=head,
                   think_budget=0)
    assert [(st.id, st.forced) for st in drive(dec, [CHANNEL, ANALYSIS, 40, 41, 42])] == \
        [(CHANNEL, True), (COMMENTARY, True), (77, True), (MESSAGE, True), (42, False)]


def test_decoding_follows_the_channels_across_messages():
    """analysis, then a second message on the final channel: the headers hidden, the reasoning counted."""
    c = Channels(START, CHANNEL, MESSAGE, END, (ANALYSIS,))
    dec = Decoding([1, START, ASSISTANT], 30, Sampling(0.0), stop_ids=[RETURN], channels=c)
    seq = [CHANNEL, ANALYSIS, MESSAGE, 40, 41, END, START, ASSISTANT, CHANNEL, FINAL, MESSAGE, 42, RETURN]
    out = [(step.id, step.reasoning, step.hidden) for step in drive(dec, seq)]
    assert out == [(CHANNEL, False, True), (ANALYSIS, False, True), (MESSAGE, False, True), (40, True, False),
                   (41, True, False), (END, False, True), (START, False, True), (ASSISTANT, False, True),
                   (CHANNEL, False, True), (FINAL, False, True), (MESSAGE, False, True), (42, False, False)]
    assert dec.reasoning_tokens == 2 and dec.stop_reason == "eos"
    # a think budget closes the analysis with the final channel's header; a budget of 0 opens with it
    c = Channels(START, CHANNEL, MESSAGE, END, (ANALYSIS,), (CHANNEL, FINAL, MESSAGE),
                 (END, START, ASSISTANT, CHANNEL, FINAL, MESSAGE))
    dec = Decoding([1, START, ASSISTANT], 30, Sampling(0.0), stop_ids=[RETURN], channels=c, think_budget=1,
                   close_think_ids=c.close)
    out = [(step.id, step.reasoning, step.forced) for step in drive(dec, [CHANNEL, ANALYSIS, MESSAGE, 40, 41] + [42] * 6)]
    assert out == [(CHANNEL, False, False), (ANALYSIS, False, False), (MESSAGE, False, False), (40, True, False),
                   (END, False, True), (START, False, True), (ASSISTANT, False, True), (CHANNEL, False, True),
                   (FINAL, False, True), (MESSAGE, False, True), (42, False, False)]
    dec = Decoding([1, START, ASSISTANT], 30, Sampling(0.0), stop_ids=[RETURN], channels=c, think_budget=0)
    assert [(st.id, st.forced) for st in drive(dec, [CHANNEL, ANALYSIS, 40, 41])] == \
        [(CHANNEL, True), (FINAL, True), (MESSAGE, True), (41, False)]
    # a model without harmony's tokens has no channels
    from edgert.tokenizer import Tokenizer
    assert Channels.detect(Tokenizer.from_dir(BUNDLED_STORIES)) is None


def test_harmony_calls_parse_from_either_place_of_the_recipient():
    from edgert.tools import harmony_calls, harmony_recipient
    assert harmony_recipient("assistant<|channel|>commentary to=functions.get_weather <|constrain|>json") == "get_weather"
    assert harmony_recipient("assistant to=functions.lookup.v2<|channel|>commentary json") == "lookup.v2"
    assert harmony_recipient("assistant<|channel|>commentary") is None
    assert harmony_recipient("assistant<|channel|>analysis to=browser.search") is None       # a built-in tool
    calls = harmony_calls([("a", '{"x": 1}'), ("b", "{}")])
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("a", {"x": 1}), ("b", {})]
    for bad in ([("a", '{"x": ')], [("a", "[1]")], [("a b", "{}")]):
        assert harmony_calls(bad) is None, bad
