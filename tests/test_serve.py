"""`edgert serve` as a client sees it: a real server process on 127.0.0.1, the real `openai` client,
the bundled reasoning fixture (int4). Expected texts come from the arithmetic task itself (the
steps and the answer of each problem), not from the server."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
psutil = pytest.importorskip("psutil")

sys.path[:0] = [str(ROOT / "fixtures")]
import reasoning_task as task  # noqa: E402

FIXTURE = ROOT / "export" / "data" / "reasoning-qwen2"
PROBLEMS = task.held_out_problems()[:10]
DEMO = next(p for p in task.held_out_problems() if p.prompt == "What is (9-5)*7+2+2?")
KEY = "sk-test-1234"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, art, *args, env=None, wait=True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(art).parent / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgert.cli", "serve", str(art), "--port", str(self.port),
                                      "--threads", "1", *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        if wait:
            self.wait_healthy()

    def wait_healthy(self, seconds=60):
        end = time.time() + seconds
        while time.time() < end:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("server not healthy in time:\n" + self.output())

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30, **kw)

    def metrics(self) -> dict:
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=5, headers=self.headers()).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def headers(self):
        return {}

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def art(exported):
    return exported(FIXTURE, 4)


@pytest.fixture(scope="module")
def server(art):
    s = Server(art, "--parallel", "4")
    yield s
    s.stop()
    assert "Traceback" not in s.output() and "internal error" not in s.output(), s.output()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def ask(client, problem, **kw):
    return client.chat.completions.create(model=MODEL(client), messages=[{"role": "user", "content": problem.prompt}],
                                          temperature=0, **kw)


def MODEL(client):
    return client.models.list().data[0].id


def streamed(client, messages, **kw):
    """(reasoning, content, finish_reasons, usage, chunks) of a streamed chat completion."""
    reasoning, content, finish, usage, chunks = {}, {}, {}, None, []
    for ch in client.chat.completions.create(model=MODEL(client), messages=messages, stream=True, **kw):
        chunks.append(ch)
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            reasoning[c.index] = reasoning.get(c.index, "") + (getattr(c.delta, "reasoning_content", None) or "")
            content[c.index] = content.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return reasoning, content, finish, usage, chunks


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    assert body["error"]["message"]
    return body["error"]


# ----------------------------------------------------------------------------------------------

def test_lists_the_model_and_answers_with_reasoning_split(server, client, art):
    assert [m.id for m in client.models.list().data] == [Path(art).name]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    r = ask(client, DEMO)
    msg = r.choices[0].message
    assert msg.reasoning_content == DEMO.reasoning.strip()          # the steps, without the tags
    assert msg.content == f"The answer is {DEMO.answer}."            # only the answer
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"


def test_streamed_equals_non_streamed_and_follows_the_openai_stream(server, client):
    for p in PROBLEMS[:4]:
        whole = ask(client, p)
        reasoning, content, finish, usage, chunks = streamed(client, [{"role": "user", "content": p.prompt}],
                                                             temperature=0, stream_options={"include_usage": True})
        assert reasoning[0] == whole.choices[0].message.reasoning_content
        assert content[0] == whole.choices[0].message.content
        assert finish == {0: "stop"}
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None     # the usage chunk comes last
        assert all(ch.usage is None for ch in chunks[:-1])
        assert usage.completion_tokens == whole.usage.completion_tokens
        assert usage.prompt_tokens == whole.usage.prompt_tokens
    # the raw bytes: data lines only (or comment pings), a finish chunk, then [DONE]
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": DEMO.prompt}], "stream": True, "temperature": 0}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") or e.startswith(":") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "stop" and last["choices"][0]["delta"] == {}
    assert "usage" not in last


def test_usage_counts_tokens(server, client):
    from edgert.chat import load_chat_template, render_chat
    from edgert.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(FIXTURE)
    cfg = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    prompt = render_chat(load_chat_template(FIXTURE), [{"role": "user", "content": DEMO.prompt}], bos_token=cfg["bos_token"])
    r = ask(client, DEMO)
    u = r.usage
    assert u.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    # the reasoning, "</think>", then the answer; EOS ends it and is not counted
    target = DEMO.target                                   # "steps\n</think>\n\nThe answer is N."
    assert u.completion_tokens == len(tok.encode(target, add_special_tokens=False))
    assert u.completion_tokens_details.reasoning_tokens == len(tok.encode(DEMO.reasoning + "</think>", add_special_tokens=False))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    t = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": DEMO.prompt}]}).json()
    assert t["count"] == u.prompt_tokens
    assert httpx.post(server.url + "/detokenize", json={"tokens": t["tokens"]}).json()["content"] == prompt
    long = httpx.post(server.url + "/tokenize", json={"content": "1+" * 300}).json()      # past the context: counted
    assert long["count"] == 600
    r = httpx.post(server.url + "/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400 and error_of(r)["param"] == "tokens"


def test_stop_strings_max_tokens_and_completions(server, client):
    r = ask(client, DEMO, stop=[" is"])
    assert r.choices[0].message.content == "The answer" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.reasoning_content == DEMO.reasoning.strip()   # stop strings apply to the answer
    _, content, finish, _, _ = streamed(client, [{"role": "user", "content": DEMO.prompt}], temperature=0, stop="wer")
    assert content[0] == "The ans" and finish[0] == "stop"
    r = ask(client, DEMO, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.choices[0].message.reasoning_content == DEMO.reasoning[:5] and r.choices[0].message.content == ""
    # /v1/completions: raw text; the stop applies to everything generated
    prompt = "<｜begin▁of▁sentence｜><｜User｜>" + DEMO.prompt + "<｜Assistant｜><think>\n"
    c = client.completions.create(model=MODEL(client), prompt=prompt, temperature=0, max_tokens=100)
    assert c.choices[0].text == DEMO.target and c.choices[0].finish_reason == "stop"
    c = client.completions.create(model=MODEL(client), prompt=prompt, temperature=0, stop=["\n"])
    assert c.choices[0].text == DEMO.reasoning.split("\n")[0]
    c = client.completions.create(model=MODEL(client), prompt=prompt, temperature=0, max_tokens=3, stream=True)
    assert "".join(ch.choices[0].text for ch in c) == DEMO.target[:3]


def test_seed_and_sampling(server, client):
    msgs = [{"role": "user", "content": DEMO.prompt}]

    def sample(seed):
        return client.chat.completions.create(model=MODEL(client), messages=msgs, temperature=1.5, seed=seed, extra_body={"top_k": 50},
                                              max_tokens=30).choices[0].message
    a, b = sample(7), sample(7)
    assert (a.content, a.reasoning_content) == (b.content, b.reasoning_content)
    others = [sample(s) for s in (8, 9, -1, 2**70)]
    assert any((o.content, o.reasoning_content) != (a.content, a.reasoning_content) for o in others)


def test_n_choices_decoded_together(server, client):
    slots = httpx.get(server.url + "/v1/models").json()["data"][0]["parallel"]
    if slots < 3:
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 3})
        assert r.status_code == 400 and error_of(r)["param"] == "n"
        pytest.skip(f"this runtime decodes {slots} sequence(s) at a time (no batched engine yet): n>1 is refused in one line")
    before = server.metrics()["edgert_prompt_tokens_cached_total"]
    r = ask(client, DEMO, n=3)
    assert [c.message.content for c in r.choices] == [f"The answer is {DEMO.answer}."] * 3
    # the prompt is prefilled once: choices 1 and 2 copy all but its last token's rows from choice 0
    cached = server.metrics()["edgert_prompt_tokens_cached_total"] - before
    assert cached >= 2 * (r.usage.prompt_tokens - 1), cached
    assert [c.index for c in r.choices] == [0, 1, 2]
    r = client.chat.completions.create(model=MODEL(client), messages=[{"role": "user", "content": DEMO.prompt}], n=3,
                                       temperature=1.5, seed=3, max_tokens=30)
    texts = [(c.message.reasoning_content, c.message.content) for c in r.choices]
    assert len(set(texts)) > 1
    _, content, finish, usage, _ = streamed(client, [{"role": "user", "content": DEMO.prompt}], n=2, temperature=0,
                                            stream_options={"include_usage": True})
    assert content == {0: f"The answer is {DEMO.answer}.", 1: f"The answer is {DEMO.answer}."}
    assert usage.completion_tokens == 2 * ask(client, DEMO).usage.completion_tokens


def test_thinking_budget_effort_and_deadline(server, client):
    from edgert.tokenizer import Tokenizer
    close = len(Tokenizer.from_dir(FIXTURE).encode("\n</think>\n\n", add_special_tokens=False))
    r = ask(client, DEMO, extra_body={"thinking_budget_tokens": 4})
    m = r.choices[0].message
    assert m.reasoning_content == DEMO.reasoning[:4]                    # four digit/operator tokens, then </think>
    assert r.usage.completion_tokens_details.reasoning_tokens == 4 + close - 1   # the close's "\n\n" is the answer's
    assert m.content.startswith("The answer is")
    r = ask(client, DEMO, reasoning_effort="none")
    assert not r.choices[0].message.reasoning_content and r.choices[0].message.content.startswith("The answer is")
    high = ask(client, DEMO, reasoning_effort="high")
    assert high.choices[0].message.content == f"The answer is {DEMO.answer}."
    # no reasoning: the prompt closes the think block as text, as `edgert chat` with /think off does (the
    # template's last "\n" and the closing's first are one token); nothing of it is generated
    assert r.usage.prompt_tokens == high.usage.prompt_tokens + close - 1
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    # a budget keeps room for the answer inside max_tokens; without one, reasoning is never cut
    r = ask(client, DEMO, max_tokens=24, extra_body={"thinking_budget_tokens": 1000})
    assert r.choices[0].message.content.startswith("The answer is") and r.usage.completion_tokens <= 24
    r = ask(client, DEMO, max_tokens=24)
    assert r.choices[0].message.content == "" and r.choices[0].finish_reason == "length"
    # a wall-clock budget: 0 ms closes the reasoning at once; a minute changes nothing here
    r = ask(client, DEMO, extra_body={"thinking_deadline_ms": 0})
    assert not r.choices[0].message.reasoning_content and r.choices[0].message.content.startswith("The answer is")
    r = ask(client, DEMO, extra_body={"thinking_deadline_ms": 60000})
    assert r.choices[0].message.reasoning_content == DEMO.reasoning.strip()
    # chat_template_kwargs reach the template (this one ignores unknown variables); bad ones are refused
    r = ask(client, DEMO, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content == f"The answer is {DEMO.answer}."
    bad = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                                "chat_template_kwargs": {"messages": []}})
    assert bad.status_code == 400 and error_of(bad)["param"] == "chat_template_kwargs"


def test_logprobs(server, client):
    r = ask(client, DEMO, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert "".join(e.token for e in lp).strip() == r.choices[0].message.content
    for e in lp:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-9   # greedy
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert bytes(e.bytes).decode() == e.token
    c = server.client().completions.create(model=MODEL(client), prompt="1+2=", max_tokens=4, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == 4 and all(len(t) == 2 for t in c.choices[0].logprobs.top_logprobs)


def test_logprobs_are_the_models_log_softmax(server, client, art):
    """Each token's logprob and its top_logprobs are log softmax of the model's logits at that
    position: edgert in this process feeds the same prompt ids, then each greedy token one at a
    time, as the server decodes (int4 kernels round alike; 1e-3 leaves room for a batch's rows)."""
    import numpy as np
    import edgert
    llm = edgert.load(art)
    ids = llm.tokenizer.encode("1+2=", add_special_tokens=True)
    c = server.client().completions.create(model=MODEL(client), prompt=ids, max_tokens=5, temperature=0, logprobs=3)
    got = c.choices[0].logprobs
    logits = llm.model.forward(ids)[-1].astype(np.float64)
    for text, lp, tops in zip(got.tokens, got.token_logprobs, got.top_logprobs):
        ref = logits - logits.max()
        ref -= np.log(np.exp(ref).sum())
        token = int(np.argmax(ref))
        assert text == llm.tokenizer.decode([token])
        assert lp == pytest.approx(ref[token], abs=1e-3)
        assert sorted(tops.values(), reverse=True) == pytest.approx(np.sort(ref)[::-1][:len(tops)], abs=1e-3)
        logits = llm.model.forward([token])[-1].astype(np.float64)
    assert len(got.tokens) == 5


def test_multi_turn_reuses_the_cached_prefix(server, client):
    first = [{"role": "user", "content": PROBLEMS[5].prompt}]
    a = ask(client, PROBLEMS[5])
    second = first + [{"role": "assistant", "content": a.choices[0].message.content,
                       "reasoning": a.choices[0].message.reasoning_content},             # either name is accepted
                      {"role": "user", "content": PROBLEMS[6].prompt}]
    b = client.chat.completions.create(model=MODEL(client), messages=second, temperature=0)
    ids1 = httpx.post(server.url + "/tokenize", json={"messages": first}).json()["tokens"]
    ids2 = httpx.post(server.url + "/tokenize", json={"messages": second}).json()["tokens"]
    common = next(i for i, (x, y) in enumerate(zip(ids1 + [None], ids2)) if x != y)
    assert common > 10
    assert b.usage.prompt_tokens_details.cached_tokens == common
    assert b.usage.prompt_tokens == len(ids2)


def test_errors_have_openai_shape_and_status(server, client):
    url = server.url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": DEMO.prompt}]
    cases = [
        (b"{not json", "invalid_json", None),
        (b"[1, 2]", "invalid_json", None),
        (json.dumps({"messages": "hi"}).encode(), None, "messages"),
        (json.dumps({"messages": []}).encode(), None, "messages"),
        (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), None, "messages"),
        (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), None, "messages"),
        (json.dumps({"messages": msgs, "temperature": "hot"}).encode(), None, "temperature"),
        (json.dumps({"messages": msgs, "temperature": 9}).encode(), None, "temperature"),
        (json.dumps({"messages": msgs, "max_tokens": 0}).encode(), None, "max_tokens"),
        (json.dumps({"messages": msgs, "max_tokens": True}).encode(), None, "max_tokens"),
        (json.dumps({"messages": msgs, "n": 0}).encode(), None, "n"),
        (json.dumps({"messages": msgs, "stop": [1]}).encode(), None, "stop"),
        (json.dumps({"messages": msgs, "top_logprobs": 30, "logprobs": True}).encode(), None, "top_logprobs"),
        (json.dumps({"messages": msgs, "reasoning_effort": "extreme"}).encode(), None, "reasoning_effort"),
        (json.dumps({"messages": msgs, "thinking_budget_tokens": -1}).encode(), None, "thinking_budget_tokens"),
        (json.dumps({"messages": msgs, "stream": "yes"}).encode(), None, "stream"),
        (b'{"messages": ' * 5000, "invalid_json", None),
        (b'{"messages": [{"role": "user", "content": "\\ud800 lone surrogate"}]}', None, "messages"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1' + b"0" * 400 + b"}", None, "temperature"),
        (b'{"messages": [{"role": "user", "content": "x"}], "top_p": -1' + b"0" * 400 + b"}", None, "top_p"),
        (json.dumps({"messages": msgs, "max_tokens": -5, "max_completion_tokens": 5}).encode(), None, "max_tokens"),
        (json.dumps({"messages": [{"role": "user", "content": "x", "name": 5}]}).encode(), None, "messages"),
        (json.dumps({"messages": msgs, "user": 5}).encode(), None, "user"),
        (json.dumps({"messages": msgs, "response_format": "x"}).encode(), None, "response_format"),
        (json.dumps({"messages": msgs, "response_format": {"type": "bogus"}}).encode(), None, "response_format"),
        (json.dumps({"messages": msgs, "tools": "x"}).encode(), None, "tools"),
        (json.dumps({"messages": msgs, "tool_choice": {"x": 1}}).encode(), None, "tool_choice"),
        (json.dumps({"messages": msgs, "logit_bias": "x"}).encode(), None, "logit_bias"),
        (json.dumps({"messages": msgs, "logit_bias": {"abc": 5}}).encode(), None, "logit_bias"),
        (json.dumps({"messages": msgs, "logit_bias": {"-1": 10}}).encode(), None, "logit_bias"),
        (json.dumps({"messages": msgs, "logit_bias": {"5": 1000}}).encode(), None, "logit_bias"),
        (json.dumps({"messages": msgs, "logit_bias": {"99999999": 1}}).encode(), None, "logit_bias"),
    ]
    for body, code, param in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 400, (body[:80], r.text)
        e = error_of(r)
        assert e["type"] == "invalid_request_error"
        if code:
            assert e["code"] == code
        if param:
            assert e["param"] == param, (body[:80], e)
    # the openai client raises its own errors with the code
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL(client), messages=[{"role": "user", "content": "1+" * 300}])
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:              # refused by its length before tokenizing
        client.chat.completions.create(model=MODEL(client), messages=[{"role": "user", "content": "x" * 3_000_000}])
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=msgs)
    assert err.value.code == "model_not_found"
    r = httpx.post(url, content=b'{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}')
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"         # echoed, not a 500
    # what this server cannot do is refused in one line, not answered as if done
    for extra, param in (({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
                         ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
                          "tools")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL(client), messages=msgs, **extra)
        assert err.value.code == "unsupported_parameter" and err.value.param == param
    ok = client.chat.completions.create(model=MODEL(client), messages=msgs, temperature=0, response_format={"type": "text"},
                                        tools=[], tool_choice="none", max_tokens=3)
    assert ok.choices[0].finish_reason == "length"
    # null is unset; template variables of any name reach the template (never a 500 for a Python parameter's name)
    r = httpx.post(url, json={"messages": msgs, "max_tokens": None, "max_completion_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    for kw in ({"thinking": 1}, {"self": 1}, {"template": "x"}, {"limits": 1}, {"render": 1}, {"ids": 1}):
        r = httpx.post(url, json={"messages": msgs, "max_tokens": 2, "chat_template_kwargs": kw})
        assert r.status_code == 200, (kw, r.text)
        r = httpx.post(server.url + "/tokenize", json={"messages": msgs, "chat_template_kwargs": kw})
        assert r.status_code == 200 and r.json()["count"] > 5, (kw, r.text)
    r = httpx.post(server.url + "/tokenize", json={"content": "a" * 3_000_000})    # the prompts' cap, before tokenizing
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    # a temperature so small that 1/T overflows is as greedy
    tiny = httpx.post(url, json={"messages": msgs, "temperature": 1e-310, "seed": 1}, timeout=60)
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"]["content"] == f"The answer is {DEMO.answer}."
    # the model is retrievable by id (openai's models.retrieve)
    assert client.models.retrieve(MODEL(client)).id == MODEL(client)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "\\ud800"}')
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"
    r = httpx.get(url)
    assert r.status_code == 405 and error_of(r) and "POST" in r.headers.get("allow", "")
    r = httpx.post(url, content=b"x" * (5 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    r = httpx.get(server.url + "/v1/models", headers={"Host": "evil.example:8080"})   # DNS rebinding
    assert r.status_code == 403 and error_of(r)["code"] == "host_not_allowed"
    assert "access-control-allow-origin" not in httpx.get(server.url + "/v1/models", headers={"Origin": "http://x.example"}).headers
    assert ask(client, DEMO).choices[0].message.content == f"The answer is {DEMO.answer}."   # still serving


def test_key_queue_limit_loading_and_cors(art):
    s = Server(art, "--parallel", "1", "--queue", "0", "--cors-origin", "http://app.example",
               env={"EDGERT_API_KEY": KEY, "EDGERT_SERVE_LOAD_DELAY": "1.5"},
               wait=False)
    try:
        seen = None
        for _ in range(200):                          # 503 while loading (no key needed for /health)
            try:
                r = httpx.get(s.url + "/health", timeout=2)
                seen = r.status_code
                break
            except httpx.TransportError:
                time.sleep(0.02)
        assert seen == 503
        r = httpx.post(s.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and error_of(r)["code"] == "model_loading" and "retry-after" in r.headers
        s.wait_healthy()
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 401 and error_of(r)["type"] == "authentication_error"
        good = s.client(KEY)
        assert ask(good, DEMO).choices[0].message.content == f"The answer is {DEMO.answer}."

        r = httpx.options(s.url + "/v1/chat/completions", headers={"Origin": "http://app.example",
                                                                   "Access-Control-Request-Method": "POST"})
        assert r.headers.get("access-control-allow-origin") == "http://app.example"
        # the OpenAI SDKs' own headers pass the preflight; a refused key is readable by the page
        r = httpx.options(s.url + "/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,x-stainless-lang"})
        assert r.status_code == 200 and r.headers.get("access-control-allow-origin") == "http://app.example", r.text
        r = httpx.get(s.url + "/v1/models", headers={"Origin": "http://app.example"})
        assert r.status_code == 401 and r.headers.get("access-control-allow-origin") == "http://app.example"
        r = httpx.get(s.url + "/v1/models", headers={"Origin": "http://evil.example"})
        assert r.status_code == 401 and "access-control-allow-origin" not in r.headers
        # a queue of 0 past one slot: concurrent requests beyond it get 429 + Retry-After, and nothing breaks
        body = {"prompt": "<｜begin▁of▁sentence｜>1", "max_tokens": 200, "temperature": 0}

        def one(_):
            return httpx.post(s.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        statuses = []
        for _ in range(5):
            with cf.ThreadPoolExecutor(12) as pool:
                rs = list(pool.map(one, range(24)))
            statuses += [r.status_code for r in rs]
            if 429 in statuses:
                break
        assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses
        busy = next(r for r in rs if r.status_code == 429) if 429 in [r.status_code for r in rs] else None
        if busy is not None:
            assert busy.headers["retry-after"] and error_of(busy)["type"] == "rate_limit_error"
        assert ask(good, DEMO).choices[0].message.content == f"The answer is {DEMO.answer}."
    finally:
        s.stop()


def test_a_silent_stream_sends_comment_pings(art):
    """In process: a stream whose request has not produced anything yet (queued, long prefill)
    sends an SSE comment every ping interval after the role chunk."""
    import asyncio
    from edgert.serve import ChoiceText, Server, Work
    srv = Server(art, threads=1, ping_seconds=0.05)
    srv.load()

    async def run():
        work = Work(asyncio.get_running_loop(), [1, 2], [], None)      # never submitted: nothing comes
        texts = [ChoiceText(srv.llm.tokenizer, srv.llm.think, True, [])]
        state = {"finish": [None], "cached": 0, "first": None}
        meta = dict(id="x", created=0, model="m", prompt_tokens=2, chat=True, include_usage=False, logprobs=None)
        srv.inflight += 1
        sse = srv._sse(srv._events(work, texts, state), work, texts, state, meta, asyncio.ensure_future(asyncio.sleep(60)))
        t0 = time.monotonic()
        out = [await sse.__anext__() for _ in range(3)]
        await sse.aclose()
        return out, time.monotonic() - t0, work
    out, seconds, work = asyncio.run(run())
    srv.scheduler.close()
    assert json.loads(out[0][6:])["choices"][0]["delta"]["role"] == "assistant"
    assert out[1:] == [": ping\n\n", ": ping\n\n"] and 0.09 < seconds < 2
    assert work.cancelled and srv.inflight == 0                  # closing the stream released the request


def test_disconnect_frees_the_slot_and_metrics(server, client):
    before = server.metrics()
    for _ in range(3):      # drop streams after two chunks
        with httpx.stream("POST", server.url + "/v1/completions", timeout=30, json={
                "prompt": "<｜begin▁of▁sentence｜>1", "max_tokens": 200, "temperature": 0, "stream": True}) as r:
            it = r.iter_lines()
            next(it), next(it)
    end = time.time() + 5
    while time.time() < end:
        m = server.metrics()
        if m["edgert_slots_busy"] == 0 and m["edgert_requests_in_flight"] == 0:
            break
        time.sleep(0.05)
    assert m["edgert_slots_busy"] == 0 and m["edgert_requests_in_flight"] == 0 and m["edgert_queue_depth"] == 0
    assert m["edgert_generated_tokens_total"] > before["edgert_generated_tokens_total"]
    assert m['edgert_requests_total{endpoint="/v1/completions",status="200"}'] >= 3
    for _ in range(2):      # a client that leaves mid-body is not a server error
        half = socket.create_connection(("127.0.0.1", server.port))
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        time.sleep(0.2)
        half.close()
    time.sleep(0.5)
    m = server.metrics()
    assert not [k for k in m if 'status="500"' in k], m
    assert m["edgert_model_loaded"] == 1
    assert ask(client, DEMO).choices[0].message.content == f"The answer is {DEMO.answer}."


def test_cancel_stops_generation_within_one_step(art):
    """In process, the scheduler itself: once a request is cancelled, at most the step in flight
    generates for it (the events reach the client later; the scheduler's count is what matters)."""
    import asyncio
    import edgert
    from edgert.generate import Sampling
    from edgert.generate import Decoding
    from edgert.serve import Scheduler, Work
    llm = edgert.load(art, threads=1)
    sched = Scheduler(llm.engine, 4)
    ids = llm.tokenizer.encode("<｜begin▁of▁sentence｜>1", add_special_tokens=False)

    async def run():
        work = Work(asyncio.get_running_loop(), ids, [Decoding(ids, llm.context - len(ids), Sampling(0.0))], None)
        sched.submit(work)
        tokens, at_cancel = 0, None
        while True:
            ev = await asyncio.wait_for(work.events.get(), 10)
            if ev[0] == "token":
                tokens += 1
                if tokens == 3:
                    work.cancelled = True
                    at_cancel = sched.stats["generated_tokens"]
                    sched.wake()
            if ev[0] == "done":
                return tokens, at_cancel, ev[2]
    tokens, at_cancel, reason = asyncio.run(run())
    sched.close()
    assert reason is None and at_cancel < llm.context - len(ids)           # cancelled, not run to the end
    assert sched.stats["generated_tokens"] - at_cancel <= 1 and tokens == sched.stats["generated_tokens"]


def test_a_request_whose_sampling_fails_ends_alone(art):
    """In process, the scheduler itself: a sequence whose sampler raises ends its own request with
    an error; the request beside it in the same batch runs to its end, and the thread lives on."""
    import asyncio
    import edgert
    from edgert.generate import Decoding, Sampling
    from edgert.serve import Scheduler, Work

    class Broken(Sampling):
        def __call__(self, logits):
            raise ValueError("broken on purpose")
    llm = edgert.load(art, threads=1, slots=2)
    sched = Scheduler(llm.engine, 4)
    ids = llm.tokenizer.encode("<｜begin▁of▁sentence｜>1", add_special_tokens=False)

    async def collect(work):
        out = []
        while not out or out[-1][0] != "done":
            out.append(await asyncio.wait_for(work.events.get(), 20))
        return out

    async def run():
        loop = asyncio.get_running_loop()
        bad = Work(loop, ids, [Decoding(ids, 5, Broken(0.0))], None)
        good = Work(loop, ids, [Decoding(ids, 5, Sampling(0.0))], None)
        with sched.cond:                    # admitted together: one batch, sampled in the same turn
            sched.submit(bad)
            sched.submit(good)
        return await collect(bad), await collect(good)
    try:
        bad, good = asyncio.run(run())
        assert any(e[0] == "error" and "broken on purpose" in e[1] for e in bad), bad
        assert [e[0] for e in good].count("token") == 5 and good[-1][2] == "length"
        assert sched.thread.is_alive() and not sched.active
    finally:
        sched.close()


def test_logit_bias_moves_the_choice(server, client):
    """logit_bias {id: 100} makes greedy decoding pick that token every step; -100 keeps it out."""
    seven = httpx.post(server.url + "/tokenize", json={"content": "7"}).json()["tokens"]
    assert len(seven) == 1
    body = {"prompt": "<｜begin▁of▁sentence｜>1", "max_tokens": 3, "temperature": 0}
    forced = httpx.post(server.url + "/v1/completions", json={**body, "logit_bias": {str(seven[0]): 100}}, timeout=30)
    assert forced.status_code == 200 and forced.json()["choices"][0]["text"] == "777", forced.text
    plain = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
    first = httpx.post(server.url + "/tokenize", json={"content": plain}).json()["tokens"][0]
    banned = httpx.post(server.url + "/v1/completions", json={**body, "logit_bias": {str(first): -100}}, timeout=30)
    assert banned.status_code == 200
    assert httpx.post(server.url + "/tokenize", json={"content": banned.json()["choices"][0]["text"]}).json()["tokens"][0] != first


def test_concurrent_clients_lose_nothing_and_answer_as_alone(server):
    """8 clients x 25 requests, streamed and not, some dropping mid-stream: every completed greedy
    answer equals the same request run alone; no errors; the server's memory stays flat."""
    url = server.url + "/v1/chat/completions"
    problems = PROBLEMS

    def body(p, stream):
        return {"messages": [{"role": "user", "content": p.prompt}], "temperature": 0, "max_tokens": 40, "stream": stream}

    def run(p, stream, drop=False):
        if not stream:
            r = httpx.post(url, json=body(p, False), timeout=60)
            assert r.status_code == 200, r.text
            m = r.json()["choices"][0]["message"]
            return m.get("reasoning_content"), m["content"]
        reasoning = content = ""
        with httpx.stream("POST", url, json=body(p, True), timeout=60) as r:
            assert r.status_code == 200
            for i, line in enumerate(r.iter_lines()):
                if drop and i == 6:
                    return None
                if line.startswith("data: {"):
                    d = json.loads(line[6:])["choices"][0]["delta"]
                    reasoning += d.get("reasoning_content") or ""
                    content += d.get("content") or ""
        return reasoning or None, content
    alone = {p.prompt: run(p, False) for p in problems}
    assert sum(a[1] == f"The answer is {p.answer}." for p, a in zip(problems, alone.values())) >= 8

    def client_(c, rounds):
        out = []
        for k in range(rounds):
            p = problems[(c * 7 + k) % len(problems)]
            drop = (c + k) % 9 == 4
            out.append((p.prompt, drop, run(p, stream=(c + k) % 2 == 0, drop=drop)))
        return out
    with cf.ThreadPoolExecutor(8) as pool:                       # warm-up: the allocator reaches its working size
        list(pool.map(lambda c: client_(c, 4), range(8)))
    rss0 = server.rss()
    t0 = time.time()
    with cf.ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(lambda c: client_(c, 25), range(8)) for r in rs]
    elapsed = time.time() - t0
    assert len(results) == 200
    dropped = sum(drop for _, drop, _ in results)
    assert dropped >= 10
    for prompt, drop, got in results:
        if not drop:
            assert got == alone[prompt], prompt
    m = server.metrics()
    assert m["edgert_slots_busy"] == 0 and m["edgert_queue_depth"] == 0
    growth = (server.rss() - rss0) / 2**20
    assert growth < 16, f"server RSS grew {growth:.1f} MiB over 200 requests"
    print(f"\n200 requests from 8 clients in {elapsed:.1f} s; server RSS {rss0 / 2**20:.0f} MiB, growth {growth:+.1f} MiB")


def test_hostile_clients_do_not_disturb_others(server, client):
    # a slow client sends half a body and stalls; a flood of idle connections; others are served meanwhile
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"messages\": [")
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
    try:
        for s in idle[:20]:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")        # headers never finished
        t0 = time.time()
        assert ask(client, DEMO).choices[0].message.content == f"The answer is {DEMO.answer}."
        assert time.time() - t0 < 10
        # garbage on the wire gets an HTTP error, not a crash
        raw = socket.create_connection(("127.0.0.1", server.port))
        raw.sendall(b"\x00\xff GARBAGE\r\n\r\n")
        raw.settimeout(5)
        assert raw.recv(100).startswith(b"HTTP/1.1 4")
        raw.close()
        # a burst of 64 concurrent requests: each is answered (200 or 429), none is lost
        with cf.ThreadPoolExecutor(16) as pool:
            rs = list(pool.map(lambda _: httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": DEMO.prompt}], "temperature": 0, "max_tokens": 8}), range(64)))
        assert {r.status_code for r in rs} <= {200, 429}
    finally:
        slow.close()
        for s in idle:
            s.close()
    assert ask(client, DEMO).choices[0].message.content == f"The answer is {DEMO.answer}."
    assert server.proc.poll() is None


def test_idle_connections_are_dropped(server):
    """A connection that never completes its first request's headers is closed after 10 s, so idle
    floods cannot hold the connection limit; so is a kept-alive one whose next request's headers
    trickle in a byte at a time (each byte would restart uvicorn's keep-alive timer), and one whose
    body, which the route never reads, trickles."""
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
    idle[0].sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0")
    kept = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    kept[0].sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    kept[1].sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n")
    try:
        t0 = time.time()
        for k in kept:
            k.settimeout(5)
            assert k.recv(1000).startswith(b"HTTP/1.1 200")
        closed, end = set(), time.time() + 25
        while len(closed) < 2 and time.time() < end:
            for i, k in enumerate(kept):
                if i in closed:
                    continue
                try:
                    k.sendall(b"G" if i == 0 else b"x")
                    k.settimeout(0.05)
                    if k.recv(100) == b"":
                        closed.add(i)
                except socket.timeout:
                    pass
                except OSError:
                    closed.add(i)
            time.sleep(1)
        assert closed == {0, 1} and time.time() - t0 < 15
        for s in idle:
            s.settimeout(20)
            assert s.recv(100) == b""            # closed by the server
        assert 9 < time.time() - t0 < 15
    finally:
        for s in idle + kept:
            s.close()


# ----------------------------------------------------------------------------------------------
# the chat page in headless Chromium, driven over the DevTools protocol (a pipe, no extra package)

def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it)")


class DevTools:
    def __init__(self, binary, profile):
        r_cmd, w_cmd = os.pipe()
        r_out, w_out = os.pipe()

        def fds():          # the browser reads commands on fd 3 and writes answers on fd 4
            a, b = os.dup(r_cmd), os.dup(w_out)
            os.dup2(a, 3)
            os.dup2(b, 4)
        self.proc = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                                      f"--user-data-dir={profile}", "--window-size=1000,760", "--no-first-run",
                                      "about:blank"], preexec_fn=fds, pass_fds=(3, 4),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(r_cmd)
        os.close(w_out)
        self.w, self.r = os.fdopen(w_cmd, "wb"), os.fdopen(r_out, "rb")
        self.next_id, self.buf = 0, b""

    def call(self, method, session=None, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self.w.write(json.dumps(msg).encode() + b"\0")
        self.w.flush()
        while True:
            while b"\0" not in self.buf:
                chunk = os.read(self.r.fileno(), 1 << 16)
                if not chunk:
                    raise AssertionError("Chromium closed the DevTools pipe")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply["result"]

    def close(self):
        try:
            self.call("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_chat_page_streams_an_answer_with_reasoning_collapsed(server, tmp_path):
    browser = DevTools(_chromium(), tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", url=server.url + "/")["targetId"]
        page = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

        def js(expr):
            r = browser.call("Runtime.evaluate", page, expression=expr, returnByValue=True, awaitPromise=True)
            return r["result"].get("value")
        end = time.time() + 20
        while time.time() < end and " · context" not in (js("document.getElementById('model').textContent") or ""):
            time.sleep(0.1)                                            # the page asked /v1/models
        js("window.updates = 0; new MutationObserver(rs => window.updates += rs.length).observe(document.getElementById('log'), "
           "{subtree: true, childList: true, characterData: true})")        # counts the page's partial updates
        js("document.getElementById('input').focus()")
        browser.call("Input.insertText", page, text=DEMO.prompt)         # typed, as a person would
        enter = dict(key="Enter", code="Enter", windowsVirtualKeyCode=13, nativeVirtualKeyCode=13)
        browser.call("Input.dispatchKeyEvent", page, type="keyDown", text="\r", **enter)
        browser.call("Input.dispatchKeyEvent", page, type="keyUp", **enter)
        end = time.time() + 30
        state = None
        while time.time() < end:
            state = js("""(() => { const m = document.querySelectorAll('.msg'); const a = m[m.length - 1];
                if (!a || !a.querySelector('.stats')) return null;
                const d = a.querySelector('details.reasoning');
                return {user: m[0].textContent, stats: a.querySelector('.stats').textContent,
                        content: a.querySelector('.content').textContent, open: d.open, hidden: d.hidden,
                        reasoning: d.querySelector('.text').textContent, summary: d.querySelector('summary').textContent,
                        stopDisabled: document.getElementById('stop').disabled}; })()""")
            if state and "stop" in state["stats"].split("·")[-1] and state["stopDisabled"]:
                break
            time.sleep(0.1)
        shot = tmp_path / "chat-page.png"
        shot.write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", page, format="png")["data"]))
        print(f"\nchat page screenshot: {shot}")
        assert state, "no answer appeared"
        assert state["user"] == DEMO.prompt
        assert state["content"] == f"The answer is {DEMO.answer}."
        assert state["reasoning"] == DEMO.reasoning.strip()
        assert not state["open"] and not state["hidden"]           # there, and collapsed
        assert "TTFT" in state["stats"] and "tok/s" in state["stats"], state["stats"]
        assert shot.stat().st_size > 5000
        assert js("window.updates") > 20                            # streamed: many partial renders, not one
    finally:
        browser.close()


def test_reasoning_the_model_opens_itself_is_split_too():
    """Qwen3 style: the prompt does not open <think>, the model writes it; the text per token, as the
    server splits it, gives the same fields as an R1 prompt does."""
    from edgert.generate import Step
    from edgert.serve import ChoiceText
    from edgert.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(FIXTURE)
    think = (tok.token_to_id("<think>"), tok.token_to_id("</think>"))
    ids = tok.encode("<think>\n" + DEMO.target, add_special_tokens=False)
    for stops in ([], ["zzz"]):
        text, inside, out = ChoiceText(tok, think, True, stops), False, ["", ""]
        for t in ids:
            inside = inside or t == think[0]
            r, c = text.push(Step(t, inside))
            inside = inside and t != think[1]
            out = [out[0] + r, out[1] + c]
        r, c = text.finish()
        assert [out[0] + r, out[1] + c] == [DEMO.reasoning.strip(), f"The answer is {DEMO.answer}."]
        assert text.reasoning_tokens == len(tok.encode("<think>\n" + DEMO.reasoning + "</think>", add_special_tokens=False))


def test_bad_artifact_port_in_use_and_failed_load_are_one_line(art, tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgert.cli", "serve", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"edgert: error: {tmp_path / 'nope'}: no such artifact folder"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        r = subprocess.run([sys.executable, "-m", "edgert.cli", "serve", str(art), "--port", str(busy.getsockname()[1])],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "cannot listen" in r.stderr
    r = subprocess.run([sys.executable, "-m", "edgert.cli", "serve", str(art), "--port", "0", "--max-memory", "1K"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "--max-memory" in r.stderr
