"""`edgert serve`: an OpenAI-compatible HTTP server (Starlette + uvicorn, `pip install 'edgert[serve]'`).

One scheduler thread owns the model. It admits queued requests into the engine's slots and steps
every active sequence together: a decoding sequence feeds its last token, a prefilling one its
next prompt chunk (so a long prompt never stalls the others for long). The HTTP side (asyncio)
turns the tokens it receives into OpenAI responses: text per choice, the reasoning split into
`reasoning_content`, stop strings, logprobs, usage. A request whose client goes away, or whose
stop string matched, is dropped from the next step and its slot freed.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .generate import Decoding, Step
from .limits import check_prompt_length
from .llm import PromptTooLong
from .tokenizer import StreamDecoder
from .tools import NAME, NameChoice, Pieces, ToolFormat, detect as detect_tools, harmony_calls, harmony_recipient, template_calls

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as e:   # the CLI turns this into one line
    raise ImportError(f"edgert serve needs the [serve] extra ({e.name} is missing): pip install 'edgert[serve]'") from e

MAX_BODY = 4 << 20             # bytes of a request body
BODY_SECONDS = 30              # to send it
HEADER_SECONDS = 10            # for a new connection to send its first request's headers (slowloris)
MAX_HEADERS = 64 << 10         # bytes of a request's line and headers (h11's limit)
LINGER_SECONDS, LINGER_BYTES = 2, 1 << 20    # after malformed HTTP: what is still read (and dropped) before closing
PING_SECONDS = 10              # an SSE comment after this long without a chunk (queue, long prefill)
PREFILL_CHUNK = 128            # prompt tokens a sequence feeds per step while others decode
EFFORT = {"none": 0, "minimal": 0, "low": 256, "medium": 1024, "high": 4096}   # reasoning_effort -> thinking tokens
ANSWER_ROOM = 16               # tokens kept for the answer when a thinking budget applies (or a quarter of max_tokens)
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
PAGE = Path(__file__).parent / "web" / "chat.html"


# ----------------------------------------------------------------------------------------------
# errors in OpenAI's shape

class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        message = message.encode("utf-8", "replace").decode("utf-8")     # (a lone surrogate cannot be sent)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, self.status, headers=self.headers)


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


_MISSING = object()


def field_(body: dict, name: str, kind, default=None, lo=None, hi=None, choices=None):
    """body[name] checked against a JSON type and range; None/absent -> default."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    names = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", list: "an array", dict: "an object"}
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value, ok = float(value), True
        except OverflowError:
            raise bad(f"'{name}' must be a finite number", name) from None
    if not ok:
        raise bad(f"'{name}' must be {names[kind]}, not {type(value).__name__ if value is not None else 'null'}", name)
    if kind is float and not np.isfinite(value):
        raise bad(f"'{name}' must be a finite number", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad(f"'{name}' must be between {lo} and {hi}, not {value}" if hi is not None
                  else f"'{name}' must be >= {lo}, not {value}", name)
    if choices is not None and value not in choices:
        raise bad(f"'{name}' must be one of {', '.join(map(str, choices))}, not {value!r}", name)
    return value


# ----------------------------------------------------------------------------------------------
# requests and the scheduler thread

@dataclass(eq=False)
class Job:
    """One choice of one request: a sequence in a slot."""
    req: "Work"
    index: int
    dec: object
    seq: object = None
    feed: list = field(default_factory=list)
    prefilled: bool = False


class Work:
    """A request as the scheduler sees it; events go back to the request's asyncio queue."""

    def __init__(self, loop, prompt_ids, decodings, logprobs: int | None):
        self.loop, self.events = loop, asyncio.Queue()
        self.prompt_ids, self.decodings, self.logprobs = prompt_ids, decodings, logprobs
        self.marks: tuple = ()              # recurrent models: turn boundaries to keep the state at
        self.cancelled = self.finished = False
        self.ended: set = set()             # choices the HTTP side finished (stop string)
        self.arrived = time.monotonic()
        self.jobs: list = []

    def emit(self, *event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:                    # the event loop is gone (shutting down)
            pass


def _top_logprobs(sampling, logits: np.ndarray, token: int, k: int):
    """The token's log-probability and the k likeliest (id, log-probability), best first: log softmax
    at those ids only, in the sampler's scratch arrays (no vocabulary-sized array per token)."""
    top = np.argpartition(logits, -k)[-k:] if 0 < k < logits.size else np.arange(logits.size if k else 0)
    lp = sampling.log_softmax_at(logits, np.concatenate([[token], top]).astype(np.int64))
    order = np.argsort(-lp[1:], kind="stable")
    return float(lp[0]), [(int(top[i]), float(lp[1 + i])) for i in order]


class Scheduler:
    def __init__(self, engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.waiting: collections.deque = collections.deque()
        self.active: list[Job] = []
        self.cond = threading.Condition()
        self.closing = False
        self.stats = collections.Counter()      # for /metrics
        self.recent = collections.deque()       # (time, tokens) of recent steps, for tok/s
        self.thread = threading.Thread(target=self._run, name="edgert-scheduler", daemon=True)
        self.thread.start()

    def submit(self, work: Work):
        with self.cond:
            free = max(0, self.engine.slots - len(self.active))
            if len(self.waiting) >= self.max_queue + free:
                raise APIError(429, f"the server is busy: {len(self.waiting)} requests are queued; retry shortly",
                               "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
            self.waiting.append(work)
            self.cond.notify()

    def wake(self):
        with self.cond:
            self.cond.notify()

    def close(self):
        with self.cond:
            self.closing = True
            self.cond.notify()

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= window]
        return sum(n for _, n in recent) / window

    def _admit(self):
        while self.waiting:
            work = self.waiting[0]
            if work.cancelled:
                self.waiting.popleft()
                continue
            if self.engine.slots - len(self.active) < len(work.decodings):
                return                          # first come, first served: never skip the head
            self.waiting.popleft()
            work.jobs = [Job(work, i, dec) for i, dec in enumerate(work.decodings)]
            self.active += work.jobs            # their slots are reserved now
            self.stats["prompt_tokens"] += len(work.prompt_ids)
            self._open(work.jobs[0])            # the other choices copy its rows once it has prefilled

    def _fail(self, work: Work, e: Exception):
        """End one request with an error (its other choices too); the others go on."""
        work.emit("error", f"{type(e).__name__}: {e}")
        for j in [j for j in self.active if j.req is work]:
            self._finish(j, None)

    def _open(self, job: Job):
        try:
            job.seq = self.engine.open(job.req.prompt_ids)
        except Exception as e:                  # fail this request only
            self._fail(job.req, e)
            return
        self.engine.mark(job.seq, job.req.marks)
        if job.index == 0 and len(job.req.decodings) > 1:     # a recurrent model keeps its state there for the others
            self.engine.mark(job.seq, [len(job.req.prompt_ids) - 1])
        job.feed = list(job.req.prompt_ids[job.seq.cached:])
        self.stats["cached_tokens"] += job.seq.cached
        if job.index == 0:
            job.req.emit("open", 0, job.seq.cached)

    def _finish(self, job: Job, reason: str | None):
        if job in self.active:
            self.active.remove(job)
        if job.seq is not None:
            self.engine.close(job.seq)
        job.req.emit("done", job.index, reason)

    def _run(self):
        while True:
            try:
                if self._turn():
                    return
            except Exception as e:              # a bug: fail what is running, keep serving
                with self.cond:
                    for work in {j.req for j in self.active}:
                        try:
                            self._fail(work, e)
                        except Exception:
                            pass
                    self.active.clear()

    def _turn(self) -> bool:
        """One scheduling turn: admit, one batched forward, sample each sequence. True: closing."""
        with self.cond:
            while not self.closing and not self.active and not any(not w.cancelled for w in self.waiting):
                self.waiting.clear()
                self.cond.wait()
            if self.closing:
                return True
            for job in [j for j in self.active if j.req.cancelled or j.index in j.req.ended]:
                self._finish(job, None)
            self._admit()
        feed = {job.seq: job.feed[:PREFILL_CHUNK] for job in self.active if job.seq is not None}
        if not feed:
            return False
        t0 = time.monotonic()
        try:
            logits = self.engine.step(feed)
        except Exception as e:              # ContextFull cannot happen (checked below); anything else ends the step's requests
            for job in list(self.active):
                job.req.emit("error", f"{type(e).__name__}: {e}")
                self._finish(job, None)
            return False
        decoded = 0
        for job in list(self.active):
            if job.seq not in feed:
                continue
            fed = len(feed[job.seq])
            del job.feed[:fed]
            if job.feed:
                continue                    # still prefilling
            if not job.prefilled:
                job.prefilled = True
            else:
                decoded += 1
            lg = logits[job.seq]
            try:
                step = job.dec.next(lg)
                lp = None if step is None or job.req.logprobs is None else \
                    _top_logprobs(job.dec.sampling, lg, step.id, job.req.logprobs)
            except Exception as e:          # a request's own sampling fails: that request only
                self._fail(job.req, e)
                continue
            if step is None:
                self._finish(job, job.dec.stop_reason)
                continue
            job.req.emit("token", job.index, step, lp)
            self.stats["generated_tokens"] += 1
            if job.dec.stop_reason is not None:
                self._finish(job, job.dec.stop_reason)
            elif len(job.seq.ids) >= self.engine.context:
                self._finish(job, "context")
            else:
                job.feed = [step.id]
        for job in [j for j in self.active if j.seq is None]:     # more choices: copy the first one's rows
            first = job.req.jobs[0]
            if first.prefilled or first not in self.active:
                self._open(job)
        now = time.monotonic()
        self.recent.append((now, decoded))
        while self.recent and now - self.recent[0][0] > 60:
            self.recent.popleft()
        self.stats["steps"] += 1
        self.stats["step_seconds"] += now - t0
        return False


# ----------------------------------------------------------------------------------------------
# per-choice text: tokens -> reasoning/content deltas, stop strings, logprobs

class ChoiceText:
    def __init__(self, tokenizer, think: tuple, split: bool, stops: list[str], tools: ToolFormat | None = None,
                 parallel_calls: bool = True):
        self.tokenizer, self.think, self.split, self.stops = tokenizer, think, split, stops
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
        self.harmony = tools is not None and tools.name == "harmony"     # gpt-oss: a call is a message to a function
        tools = None if self.harmony else tools
        self.h_calls: list = []                  # harmony: [function, message body] of each call
        self.h_call = None                       # the one being written
        self.tools, self.parallel_calls = tools, parallel_calls
        # a call's markers as text, also where they are special tokens (which the decoder skips)
        self.marks = {i: m for m in (tools.open, tools.close) if (i := tokenizer.token_to_id(m)) is not None} \
            if tools else {}
        self.calls = None                        # the answer from the first call on (held until the end)
        self.tool_calls: list = []
        self.kind = None                         # what the decoder's pending text belongs to
        self.reasoning, self.content = [], []
        self.r_started = self.c_started = False
        self.r_hold = ""                         # reasoning's trailing whitespace (dropped before </think>)
        self.c_hold = ""                         # content that may begin a stop string
        self.stopped = False
        self.tokens = 0
        self.reasoning_tokens = 0
        self.logprobs: list = []

    def _out(self, kind, text, final=False) -> tuple[str, str]:
        if kind == "reasoning":
            if not self.r_started:
                text = text.lstrip()
                self.r_started = bool(text)
            text, self.r_hold = self.r_hold + text, ""
            if not final:
                body = text.rstrip()
                text, self.r_hold = body, text[len(body):]
            self.reasoning.append(text)
            return text, ""
        if self.stopped:
            return "", ""
        if not self.c_started:
            text = text.lstrip() if self.split else text
            self.c_started = bool(text)
        text, self.c_hold = self.c_hold + text, ""
        if self.calls is not None:               # inside the tool calls: read at the end
            self.calls += text
            return "", ""
        if self.tools and (at := text.find(self.tools.open)) >= 0:
            text, self.calls = text[:at], text[at:]
        for s in self.stops:
            at = text.find(s)
            if at >= 0:
                text, self.stopped = text[:at], True
                break
        held = self.stops + ([self.tools.open] if self.tools and self.calls is None else [])
        if held and not self.stopped and not final:
            keep = max(len(s) for s in held) - 1
            cut = len(text) - keep
            for i in range(max(cut, 0), len(text)):    # hold back only a possible start of a stop string or call
                if any(s.startswith(text[i:]) for s in held):
                    cut = i
                    break
            else:
                cut = len(text)
            text, self.c_hold = text[:cut], text[cut:]
        self.content.append(text)
        return "", text

    def push(self, step: Step, lp=None) -> tuple[str, str]:
        """-> (reasoning delta, content delta)."""
        self.tokens += 1
        kind = "reasoning" if self.split and step.reasoning else "content"
        self.reasoning_tokens += step.reasoning
        if self.harmony and step.hidden:
            self._end_call()
            name = harmony_recipient(self.tokenizer.decode(list(step.header))) if step.header else None
            if name is not None:                         # a message to a function: a call, read at the end
                self.h_call = [name, ""]
                self.h_calls.append(self.h_call)
        elif self.h_call is not None:
            self.h_call[1] += self.decoder.push(step.id)
            if lp is not None:
                self.logprobs.append((step.id, kind, lp))
            return "", ""
        r = c = ""
        if self.split and (step.id in self.think or step.hidden):     # the tags and harmony's headers are not text
            r, c = self._flush(final=False)
            self.decoder.flush()
            if step.id == self.think[1]:
                self.r_hold = ""
            if lp is not None:
                self.logprobs.append((step.id, kind, lp))
            return r, c
        if kind != self.kind and self.kind is not None:
            r, c = self._flush(final=False)
        self.kind = kind
        mark = self.marks.get(step.id) if kind == "content" else None
        text = self.decoder.flush() + mark if mark is not None else self.decoder.push(step.id)
        if lp is not None:
            self.logprobs.append((step.id, kind, lp))
        if text:
            r2, c2 = self._out(kind, text)
            r, c = r + r2, c + c2
        return r, c

    def _end_call(self) -> None:
        """A harmony call's message ends: the decoder's held-back text is its body's."""
        if self.h_call is not None:
            self.h_call[1] += self.decoder.flush()
            self.h_call = None

    def _flush(self, final: bool):
        rest = self.decoder.flush()
        if self.kind is None or (not rest and not final):
            return "", ""
        if self.kind == "reasoning" and not final:
            return self._out("reasoning", rest)
        if self.kind == "reasoning":
            return "", ""                                   # trailing whitespace of unfinished reasoning
        return self._out("content", rest, final)

    def finish(self, complete: bool = False) -> tuple[str, str]:
        """The rest of the text; the tool calls are read here, from an answer that ended by itself
        (complete), else their text is the answer's."""
        self._end_call()                                 # (ended by <|call|>, a stop token)
        r, c = self._flush(final=True)
        if self.c_hold and not self.stopped:
            text = self.c_hold
            self.c_hold = ""
            self.content.append(text)
            c += text
        if self.calls is not None:
            found = self.tools.split(self.calls) if complete else None
            text = self.calls if found is None else found[0]
            if found is not None:
                self.tool_calls = found[1] if self.parallel_calls else found[1][:1]
            self.calls = None
            if text:
                self.content.append(text)
                c += text
        if self.h_calls:
            found = harmony_calls(self.h_calls) if complete else None
            if found is not None:
                self.tool_calls = found if self.parallel_calls else found[:1]
            else:
                text = "".join(body for _, body in self.h_calls)
                self.content.append(text)
                c += text
            self.h_calls = []
        return r, c


# ----------------------------------------------------------------------------------------------
# the HTTP application

def _tokens_json(tokenizer, entries, top: int, chat: bool):
    def one(t, lp):
        s = tokenizer.decode([t])
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    if chat:
        out = {"content": [], "reasoning_content": []}
        for t, kind, (lp, tops) in entries:
            e = one(t, lp)
            e["top_logprobs"] = [one(u, v) for u, v in tops[:top]]
            out[kind if kind == "content" else "reasoning_content"].append(e)
        return out
    return {"tokens": [tokenizer.decode([t]) for t, _, _ in entries],
            "token_logprobs": [lp for _, _, (lp, _) in entries],
            "top_logprobs": [{tokenizer.decode([u]): v for u, v in tops[:top]} for _, _, (_, tops) in entries]}


class Server:
    def __init__(self, artifact, *, context=None, threads=None, parallel=1, max_memory=None, api_key=None,
                 host="127.0.0.1", cors_origins=(), max_queue=None, max_body=MAX_BODY, timeout=600.0,
                 ping_seconds=PING_SECONDS):
        self.artifact, self.model_id = Path(artifact), Path(artifact).resolve().name
        self.load_args = dict(context=context, threads=threads, max_memory=max_memory)
        self.parallel = parallel
        self.api_key, self.cors_origins = api_key or None, list(cors_origins)
        self.max_queue = max_queue if max_queue is not None else 8 * parallel
        self.max_body, self.timeout, self.ping_seconds = max_body, timeout, ping_seconds
        self.loopback = _is_loopback(host)
        self.llm = self.scheduler = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.counts = collections.Counter()     # (endpoint, status) -> requests
        self.inflight = 0
        self.ttft = [0.0, 0]                     # seconds summed, requests
        self.app = self._app()

    # -- loading ---------------------------------------------------------------------------------
    def load(self):
        import edgert
        time.sleep(float(os.environ.get("EDGERT_SERVE_LOAD_DELAY", 0)))   # tests: observe /health while loading
        try:
            kw = dict(self.load_args)
            llm = edgert.load(self.artifact, slots=self.parallel, **kw)
            self.close_ids = llm.close_think_ids()
            self.tool_format = detect_tools(llm.chat_template, llm.tokenizer.token_to_id)
            self.pieces = None      # every token's text (tools.Pieces), made for the first request whose call's name is kept
            self.scheduler = Scheduler(llm.engine, self.max_queue)
            self.llm = llm
        except Exception as e:
            self.load_error = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise

    # -- guards ----------------------------------------------------------------------------------
    def _ready(self):
        if self.llm is None:
            raise APIError(503, "the model is loading" if not self.load_error else f"the model failed to load: "
                           f"{self.load_error}", "server_error", code="model_loading", headers={"Retry-After": "1"})

    async def _json(self, request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            raise APIError(413, f"the request body is larger than {self.max_body} bytes", code="request_too_large")
        body = bytearray()

        async def read():
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > self.max_body:
                    raise APIError(413, f"the request body is larger than {self.max_body} bytes", code="request_too_large")
        try:
            await asyncio.wait_for(read(), BODY_SECONDS)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body took longer than {BODY_SECONDS} s to arrive", code="timeout") from None
        try:
            data = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise bad(f"the body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise bad("the body must be a JSON object", code="invalid_json")
        return data

    def _check_model(self, body):
        model = field_(body, "model", str)
        if model and model != self.model_id:
            raise APIError(404, f"the model {model[:100]!r} does not exist; this server has '{self.model_id}'",
                           param="model", code="model_not_found")

    # -- request parsing -------------------------------------------------------------------------
    def _messages(self, body) -> list[dict]:
        messages = field_(body, "messages", list)
        if not messages:
            raise bad("'messages' must be a non-empty array", "messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise bad(f"messages[{i}] must be an object", "messages")
            role = m.get("role")
            if role not in ("system", "developer", "user", "assistant", "tool"):
                raise bad(f"messages[{i}].role must be system, developer, user, assistant or tool, not {role!r}", "messages")
            content = m.get("content")
            if isinstance(content, list):
                parts = []
                for p in content:
                    if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                        raise bad(f"messages[{i}].content: only text parts are supported", "messages")
                    parts.append(p["text"])
                content = "".join(parts)
            if content is None and role == "assistant":
                content = ""
            if not isinstance(content, str):
                raise bad(f"messages[{i}].content must be a string or an array of text parts", "messages")
            msg = {"role": "system" if role == "developer" else role, "content": content}
            for k in ("reasoning_content", "reasoning", "thinking"):
                if m.get(k) is not None:
                    if not isinstance(m[k], str):
                        raise bad(f"messages[{i}].{k} must be a string", "messages")
                    msg["reasoning_content"] = m[k]
            for k in ("name", "tool_call_id"):
                if m.get(k) is not None:
                    if not isinstance(m[k], str):
                        raise bad(f"messages[{i}].{k} must be a string", "messages")
                    msg[k] = m[k]
            calls = m.get("tool_calls")
            if calls is not None:
                if role != "assistant" or not isinstance(calls, list) or not all(
                        isinstance(c, dict) and isinstance(c.get("function"), dict)
                        and isinstance(c["function"].get("name"), str)
                        and isinstance(c["function"].get("arguments", ""), str) for c in calls):
                    raise bad(f"messages[{i}].tool_calls must be an assistant's array of {{\"id\", \"type\": "
                              f"\"function\", \"function\": {{\"name\", \"arguments\"}}}}", "messages")
                msg["tool_calls"] = template_calls(calls)
            out.append(msg)
        return out

    def _chat_inputs(self, body) -> tuple[list[dict], dict, tuple]:
        """A chat request's (messages, template kwargs, `_tools`): what its prompt, and the turn
        boundary a recurrent model keeps for the next turn, are both rendered from."""
        messages = self._messages(body)
        kwargs = field_(body, "chat_template_kwargs", dict, {})
        for k in kwargs:
            if not k.isidentifier() or k in ("messages", "add_generation_prompt"):
                raise bad(f"chat_template_kwargs: {k!r} cannot be set", "chat_template_kwargs")
        if not self.llm.chat_template:
            raise bad("this model has no chat template: use /v1/completions", "messages")
        tooling = self._tools(body)
        if self.tool_format is not None and self.tool_format.in_system:     # Phi-4-mini: in the system message
            messages = self.tool_format.place(messages, tooling[0])
        elif tooling[0]:
            kwargs = {**kwargs, "tools": tooling[0]}
        effort = field_(body, "reasoning_effort", str, choices=tuple(EFFORT))
        if self.llm.channels is not None and effort in ("low", "medium", "high"):    # gpt-oss: its template tells
            kwargs = {"reasoning_effort": effort, **kwargs}                           # the model (a system line)
        return messages, kwargs, tooling

    def _prompt(self, body, chat: bool, fit: bool = True, inputs: tuple | None = None) -> list[int]:
        llm = self.llm
        if chat:
            messages, kwargs, _ = inputs or self._chat_inputs(body)
            try:       # no reasoning asked for: the prompt closes the think block (see encode_messages)
                ids = llm.encode_messages(messages, thinking=not self._no_thinking(body), template_kwargs=kwargs)
            except PromptTooLong as e:
                raise bad(str(e), "messages", "context_length_exceeded") from None
            except ValueError as e:                     # the template failed (syntax, raise_exception, sandbox)
                raise bad(str(e), "messages") from None
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
            if isinstance(prompt, str):
                try:
                    check_prompt_length(prompt, llm.context)
                except PromptTooLong as e:
                    raise bad(str(e), "prompt", "context_length_exceeded") from None
                ids = self._encode(prompt, True, "prompt")
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                if not all(0 <= t < llm.model.vocab for t in prompt):
                    raise bad(f"'prompt' token ids must be between 0 and {llm.model.vocab - 1}", "prompt")
                ids = list(prompt)
            else:
                raise bad("'prompt' must be a string, one string in an array, or an array of token ids", "prompt")
        if not ids:
            raise bad("the prompt is empty", "prompt")
        if fit and len(ids) >= llm.context:
            raise bad(f"this model's context holds {llm.context} tokens; the prompt has {len(ids)} "
                      f"(start the server with a larger --context, up to {llm.manifest['context_length']})",
                      "messages" if chat else "prompt", "context_length_exceeded")
        return ids

    def _encode(self, text: str, special: bool, param: str) -> list[int]:
        try:
            return self.llm.tokenizer.encode(text, add_special_tokens=special)
        except ValueError as e:                         # text the tokenizer refuses (e.g. lone surrogates)
            raise bad(str(e), param) from None

    def _options(self, body, chat: bool, prompt_len: int) -> dict:
        llm = self.llm
        newer, older = field_(body, "max_completion_tokens", int, lo=1), field_(body, "max_tokens", int, lo=1)
        if newer is not None and older is not None and newer != older:
            raise bad("give max_tokens or max_completion_tokens, not two different values", "max_tokens")
        max_tokens = newer or older
        room = llm.context - prompt_len
        limit = min(max_tokens or room, room)
        temperature = field_(body, "temperature", float, lo=0.0, hi=2.0)
        top_p = field_(body, "top_p", float, lo=0.0, hi=1.0)
        top_k = field_(body, "top_k", int, lo=0)
        seed = field_(body, "seed", int)
        seed = None if seed is None else seed % 2**64          # any integer; numpy's generator wants one >= 0
        n = field_(body, "n", int, 1, lo=1, hi=16)
        if n > self.scheduler.engine.slots:
            raise bad(f"n={n} needs {n} slots decoded together; this server has {self.scheduler.engine.slots} "
                      f"(start it with --parallel {n} or more)", "n")
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 16:
            raise bad("'stop' must be a non-empty string or an array of up to 16 of them", "stop")
        field_(body, "frequency_penalty", float, lo=-2.0, hi=2.0)
        field_(body, "presence_penalty", float, lo=-2.0, hi=2.0)
        field_(body, "user", str)
        self._unsupported(body)
        bias = self._logit_bias(body)
        if chat:
            want = field_(body, "logprobs", bool, False)
            top = field_(body, "top_logprobs", int, 0, lo=0, hi=20)
            if top and not want:
                raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        else:
            top = field_(body, "logprobs", int, None, lo=0, hi=5)
            want = top is not None
            if field_(body, "echo", bool, False) or field_(body, "suffix", str):
                raise bad("'echo' and 'suffix' are not supported", "echo")
        stream = field_(body, "stream", bool, False)
        stream_options = field_(body, "stream_options", dict, {})
        include_usage = field_(stream_options, "include_usage", bool, False)
        budget = self._thinking_budget(body)
        deadline_ms = field_(body, "thinking_deadline_ms", float, lo=0.0)
        thinking = llm.thinks
        if thinking and (budget is not None or deadline_ms is not None):
            room_for_answer = min(limit, len(self.close_ids) + max(ANSWER_ROOM, limit // 4))
            budget = min(limit - room_for_answer, budget if budget is not None else limit)
        sampling = [llm.sampling(temperature, top_p, top_k,
                                 seed if seed is None or i == 0 else [seed, i]) for i in range(n)]
        for smp in sampling:
            smp.bias = bias
        return dict(limit=limit, sampling=sampling, n=n, stops=stops, logprobs=top if want else None,
                    stream=stream, include_usage=include_usage, budget=budget if thinking else None,
                    deadline_ms=deadline_ms if thinking else None)

    @staticmethod
    def _unsupported(body) -> None:
        """response_format beyond text: this server cannot constrain its output to a schema, so it
        says so (400) rather than answer as if it had."""
        fmt = field_(body, "response_format", dict)
        if fmt is not None:
            kind = fmt.get("type")
            if kind not in ("text", "json_object", "json_schema"):
                raise bad("'response_format.type' must be text, json_object or json_schema", "response_format")
            if kind != "text":
                raise bad(f"response_format {kind} is not supported by this server (plain text only)", "response_format",
                          "unsupported_parameter")

    def _tools(self, body) -> tuple[list | None, ToolFormat | None, str | None, list | None]:
        """tools, tool_choice, parallel_tool_calls -> (the tools the template renders, the format the
        model writes its calls in, the text its answer is made to begin with: a call for tool_choice
        required, a call of the named function, else None; the names the call's name is kept to: tool_choice
        required with several functions, whose forced text stops before the name, else None). With tool_choice none the model is not
        told of them. Tools for a template without them are refused."""
        tools = field_(body, "tools", list)
        choice = body.get("tool_choice")
        named = None
        if isinstance(choice, dict):
            fn = choice.get("function")
            if choice.get("type", "function") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad("'tool_choice' as an object must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                          "tool_choice")
            named = fn["name"]
        elif choice is not None and choice not in ("none", "auto", "required"):
            raise bad("'tool_choice' must be none, auto, required or an object naming a function", "tool_choice")
        field_(body, "parallel_tool_calls", bool)
        if not tools:
            if choice == "required" or named is not None:
                raise bad("tool_choice required or a named function needs 'tools'", "tool_choice")
            return None, None, None, None
        if len(tools) > 128:
            raise bad("'tools' holds at most 128 functions", "tools")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or t.get("type", "function") != "function":
                raise bad(f"tools[{i}] must be an object {{\"type\": \"function\", \"function\": {{...}}}}", "tools")
            if not isinstance(fn.get("name"), str) or not NAME.fullmatch(fn["name"]):
                raise bad(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_', '.' or '-'", "tools")
            for k, kind in (("description", str), ("parameters", dict), ("strict", bool)):
                if fn.get(k) is not None and not isinstance(fn[k], kind):
                    raise bad(f"tools[{i}].function.{k} must be {'a string' if kind is str else 'an object' if kind is dict else 'a boolean'}", "tools")
        if named is not None and named not in (t["function"]["name"] for t in tools):
            raise bad(f"tool_choice names {named[:64]!r}, which is not in 'tools'", "tool_choice")
        if choice == "none":
            return None, None, None, None
        if self.tool_format is None:
            raise bad("this model's chat template does not render tools, or writes calls in a form this server does not "
                      "read (it reads <tool_call> JSON, LFM2's <|tool_call_start|>, Phi-4-mini's <|tool_call|> and gpt-oss's harmony)", "tools",
                      "unsupported_parameter")
        if choice == "required" and len(tools) == 1:        # the one function it may call
            named = tools[0]["function"]["name"]
        forced = self.tool_format.forced(named) if choice == "required" or named is not None else None
        keep = [t["function"]["name"] for t in tools] if choice == "required" and named is None else None
        return tools, self.tool_format, forced, keep

    def _logit_bias(self, body):
        """logit_bias {token id (a string): bias in [-100, 100]} -> (ids, biases) added to every step's logits."""
        raw = field_(body, "logit_bias", dict)
        if not raw:
            return None
        if len(raw) > 1024:
            raise bad("'logit_bias' holds at most 1024 token ids", "logit_bias")
        vocab = self.llm.model.vocab
        ids, values = [], []
        for k, v in raw.items():
            if not (k.isascii() and k.isdigit()) or int(k) >= vocab:
                raise bad(f"'logit_bias' keys must be token ids between 0 and {vocab - 1}, not {k[:20]!r}", "logit_bias")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise bad(f"'logit_bias' values must be numbers between -100 and 100 (token {k})", "logit_bias")
            ids.append(int(k))
            values.append(float(v))
        return np.array(ids, np.int64), np.array(values, np.float32)

    def _thinking_budget(self, body) -> int | None:
        """thinking_budget_tokens and reasoning_effort, the smaller (None: no limit). gpt-oss's
        template takes low/medium/high itself (_prompt): for it only none/minimal is a budget (0)."""
        budget = field_(body, "thinking_budget_tokens", int, lo=0)
        effort = field_(body, "reasoning_effort", str, choices=tuple(EFFORT))
        if effort is not None and (self.llm.channels is None or EFFORT[effort] == 0):
            budget = EFFORT[effort] if budget is None else min(budget, EFFORT[effort])
        return budget

    def _no_thinking(self, body) -> bool:
        return self.llm.thinks and self._thinking_budget(body) == 0

    # -- generation ------------------------------------------------------------------------------
    async def _generate(self, request: Request, chat: bool):
        self._ready()
        body = await self._json(request)
        self._check_model(body)
        inputs = self._chat_inputs(body) if chat else None
        ids = await asyncio.to_thread(self._prompt, body, chat, True, inputs)     # a long text must not stall the streams
        o = self._options(body, chat, len(ids))
        llm = self.llm
        loop = asyncio.get_running_loop()
        work = Work(loop, ids, [], o["logprobs"])
        if chat and llm.engine.recurrent:       # where the next turn will depart from this prompt (tools and all)
            work.marks = await asyncio.to_thread(llm.turn_boundary, inputs[0], ids, template_kwargs=inputs[1])
        deadline = None if o["deadline_ms"] is None else work.arrived + o["deadline_ms"] / 1000
        _, tools, forced, names = inputs[2] if chat else (None, None, None, None)
        prefix = llm.tokenizer.encode(forced, add_special_tokens=False) if forced else ()
        if names and self.pieces is None:
            self.pieces = await asyncio.to_thread(Pieces, llm.tokenizer, llm.model.vocab)
        work.decodings = [Decoding(ids, o["limit"], s, stop_ids=llm.eos_ids, think=llm.think, think_budget=o["budget"],
                                   close_think_ids=self.close_ids, deadline=deadline, answer_prefix=prefix,
                                   channels=llm.channels, choice=NameChoice(names, tools, self.pieces) if names else None)
                          for s in o["sampling"]]
        if o["budget"] == 0:                # (a chat prompt closed it already: _prompt)
            for dec in work.decodings:      # no thinking at all: </think> before the first token
                dec.close_thinking()
        self.scheduler.submit(work)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        texts = [ChoiceText(llm.tokenizer, llm.think if chat else (), chat, o["stops"], tools,
                            body.get("parallel_tool_calls") is not False) for _ in range(o["n"])]
        state = {"finish": [None] * o["n"], "cached": 0, "first": None}
        watcher = asyncio.ensure_future(self._watch_disconnect(request, work))
        meta = dict(id=rid, created=int(time.time()), model=self.model_id, prompt_tokens=len(ids), chat=chat,
                    include_usage=o["include_usage"], logprobs=o["logprobs"])
        self.inflight += 1
        events = self._events(work, texts, state)
        if o["stream"]:
            return StreamingResponse(self._sse(events, work, texts, state, meta, watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async for _ in events:
                pass
        finally:
            self._end(work, watcher)
        if work.cancelled and None in state["finish"]:
            return Response(status_code=499)
        return JSONResponse(self._body(texts, state, meta))

    def _end(self, work, watcher=None):
        if not work.finished:
            work.finished = work.cancelled = True      # the scheduler frees any slot still held
            self.scheduler.wake()
            self.inflight -= 1
        if watcher is not None:
            watcher.cancel()

    async def _watch_disconnect(self, request, work):
        """The client went away: end the request (even a stream whose body never started)."""
        try:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    break
        except Exception:
            pass
        self._end(work)

    async def _events(self, work: Work, texts: list[ChoiceText], state: dict):
        """Yield (choice, reasoning delta, content delta, finish_reason or None, logprob entries), or None as a ping."""
        end = work.arrived + self.timeout
        while None in state["finish"]:
            if work.cancelled:
                return
            try:
                event = await asyncio.wait_for(work.events.get(), min(self.ping_seconds, max(end - time.monotonic(), 0.01)))
            except asyncio.TimeoutError:
                if time.monotonic() >= end:        # the server's time limit: end every open choice
                    work.cancelled = True
                    self.scheduler.wake()
                    for i, t in enumerate(texts):
                        if state["finish"][i] is None:
                            r, c = t.finish()
                            state["finish"][i] = "length"
                            yield i, r, c, "length", []
                    return
                yield None
                continue
            kind, i = event[0], event[1] if len(event) > 1 else None
            if kind == "error":
                raise APIError(500, f"generation failed: {event[1]}", "server_error")
            if kind == "open":
                state["cached"] = state["cached"] or event[2]
                continue
            if state["finish"][i] is not None:
                continue
            t = texts[i]
            if kind == "token":
                if state["first"] is None:
                    state["first"] = time.monotonic() - work.arrived
                    self.ttft[0] += state["first"]
                    self.ttft[1] += 1
                step, lp = event[2], event[3]
                before = len(t.logprobs)
                r, c = t.push(step, lp)
                entries = t.logprobs[before:] if lp is not None else []
                if t.stopped:
                    work.ended.add(i)
                    self.scheduler.wake()
                    state["finish"][i] = "stop"
                    yield i, r, c, "stop", entries
                elif r or c or entries:
                    yield i, r, c, None, entries
            elif kind == "done":
                r, c = t.finish(complete=event[2] == "eos")
                state["finish"][i] = "tool_calls" if t.tool_calls else "stop" if event[2] == "eos" or t.stopped else "length"
                yield i, r, c, state["finish"][i], []

    def _usage(self, texts, state, meta) -> dict:
        completion = sum(t.tokens for t in texts)
        return {"prompt_tokens": meta["prompt_tokens"], "completion_tokens": completion,
                "total_tokens": meta["prompt_tokens"] + completion,
                "prompt_tokens_details": {"cached_tokens": state["cached"]},
                "completion_tokens_details": {"reasoning_tokens": sum(t.reasoning_tokens for t in texts)}}

    def _body(self, texts, state, meta) -> dict:
        tok, top = self.llm.tokenizer, meta["logprobs"]
        choices = []
        for i, t in enumerate(texts):
            reasoning, content = "".join(t.reasoning), "".join(t.content)
            lp = _tokens_json(tok, t.logprobs, top or 0, meta["chat"]) if top is not None else None
            if meta["chat"]:
                message = {"role": "assistant", "content": content, "reasoning_content": reasoning or None}
                if t.tool_calls:
                    message.update(content=content or None, tool_calls=t.tool_calls)
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": state["finish"][i]})
            else:
                choices.append({"index": i, "text": content, "logprobs": lp, "finish_reason": state["finish"][i]})
        return {"id": meta["id"], "object": "chat.completion" if meta["chat"] else "text_completion",
                "created": meta["created"], "model": meta["model"], "system_fingerprint": "edgert",
                "choices": choices, "usage": self._usage(texts, state, meta)}

    async def _sse(self, events, work, texts, state, meta, watcher):
        """OpenAI's stream: the role, deltas, a finish chunk per choice, [usage], [DONE]; comment pings."""
        chat = meta["chat"]
        head = {"id": meta["id"], "object": "chat.completion.chunk" if chat else "text_completion", "created": meta["created"],
                "model": meta["model"], "system_fingerprint": "edgert"}
        extra = {"usage": None} if meta["include_usage"] else {}
        top = meta["logprobs"]
        tok = self.llm.tokenizer

        def chunk(choices):
            return "data: " + json.dumps({**head, "choices": choices, **extra}, ensure_ascii=False) + "\n\n"
        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(texts))])
            try:
                async for ev in events:
                    if ev is None:
                        yield ": ping\n\n"
                        continue
                    i, r, c, finish, entries = ev
                    lp = _tokens_json(tok, entries, top or 0, chat) if top is not None and entries else None
                    if chat:
                        if r or c or lp:
                            delta = {"reasoning_content": r} if r else {}
                            if c or not r:
                                delta["content"] = c
                            yield chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": None}])
                        if texts[i].tool_calls and finish:
                            yield chunk([{"index": i, "delta": {"tool_calls": [{"index": k, **call} for k, call in
                                                                               enumerate(texts[i].tool_calls)]},
                                          "logprobs": None, "finish_reason": None}])
                        if finish:
                            yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}])
                    elif c or lp or finish:
                        yield chunk([{"index": i, "text": c, "logprobs": lp, "finish_reason": finish}])
            except APIError as e:
                yield "data: " + json.dumps({"error": {"message": e.message, "type": e.type, "param": e.param,
                                                       "code": e.code}}) + "\n\n"
            else:
                if work.cancelled and None in state["finish"]:
                    return
                if meta["include_usage"]:
                    yield "data: " + json.dumps({**head, "choices": [], "usage": self._usage(texts, state, meta)}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self._end(work, watcher)

    # -- the app ---------------------------------------------------------------------------------
    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "edgert",
                "context_length": self.llm.context, "max_context_length": self.llm.manifest["context_length"],
                "parallel": self.scheduler.engine.slots}

    def _app(self) -> Starlette:
        s = self

        async def chat(request):
            return await s._generate(request, chat=True)

        async def completions(request):
            return await s._generate(request, chat=False)

        async def models(request):
            s._ready()
            return JSONResponse({"object": "list", "data": [s._model_card()]})

        async def model(request):
            s._ready()
            if request.path_params["model"] != s.model_id:
                raise APIError(404, f"the model {request.path_params['model'][:100]!r} does not exist; this server has "
                               f"'{s.model_id}'", param="model", code="model_not_found")
            return JSONResponse(s._model_card())

        async def health(request):
            if s.llm is None:
                return JSONResponse({"status": "error" if s.load_error else "loading",
                                     **({"error": s.load_error} if s.load_error else {})}, 503)
            if not s.scheduler.thread.is_alive():
                return JSONResponse({"status": "error", "error": "the scheduler thread stopped"}, 503)
            return JSONResponse({"status": "ok", "slots_busy": len(s.scheduler.active),
                                 "slots": s.scheduler.engine.slots, "queue": len(s.scheduler.waiting)})

        async def metrics(request):
            return PlainTextResponse(s.metrics(), media_type="text/plain; version=0.0.4")

        async def tokenize(request):
            s._ready()
            body = await s._json(request)
            if "messages" in body:
                ids = await asyncio.to_thread(s._prompt, {"messages": body["messages"],
                                                          "chat_template_kwargs": body.get("chat_template_kwargs")},
                                            True, False)
            else:
                content = field_(body, "content", str)
                if content is None:
                    raise bad("give 'content' (a string) or 'messages'", "content")
                special = field_(body, "add_special", bool, False)
                try:
                    check_prompt_length(content, s.llm.context)
                except PromptTooLong as e:
                    raise bad(str(e), "content", "context_length_exceeded") from None
                ids = await asyncio.to_thread(s._encode, content, special, "content")
            return JSONResponse({"tokens": ids, "count": len(ids)})

        async def detokenize(request):
            s._ready()
            body = await s._json(request)
            ids = body.get("tokens")
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                    and 0 <= t < s.llm.model.vocab for t in ids):
                raise bad(f"'tokens' must be an array of token ids between 0 and {s.llm.model.vocab - 1}", "tokens")
            return JSONResponse({"content": await asyncio.to_thread(s.llm.tokenizer.decode, ids)})

        async def page(request):
            return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={
                "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                           "connect-src 'self'; img-src data:", "X-Frame-Options": "DENY"})

        async def api_error(request, exc):
            return exc.response()

        async def http_error(request, exc):
            kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
            msg = f"{request.method} {request.url.path}: " + ("no such endpoint" if exc.status_code == 404 else exc.detail)
            return APIError(exc.status_code, msg, kind, code=str(exc.status_code),
                            headers=getattr(exc, "headers", None)).response()     # 405: its Allow header

        async def server_error(request, exc):
            if isinstance(exc, ClientDisconnect):
                return Response(status_code=499)
            return APIError(500, f"internal error: {type(exc).__name__}: {exc}"[:300], "server_error").response()

        routes = [Route("/", page), Route("/health", health), Route("/metrics", metrics),
                  Route("/v1/models", models), Route("/v1/models/{model:path}", model),
                  Route("/v1/chat/completions", chat, methods=["POST"]),
                  Route("/v1/completions", completions, methods=["POST"]),
                  Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"])]
        app = Starlette(routes=routes, exception_handlers={APIError: api_error, HTTPException: http_error,
                                                           Exception: server_error})
        if self.cors_origins:
            app.add_middleware(_CORS, allow_origins=self.cors_origins, allow_methods=["GET", "POST"],
                               allow_headers=["*"])
        return _Guard(app, self)

    def metrics(self) -> str:
        lines = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP edgert_{name} {help_}")
            lines.append(f"# TYPE edgert_{name} {kind}")
            for labels, value in samples:
                lines.append(f"edgert_{name}{labels} {value}")
        metric("requests_total", "counter", "HTTP requests answered, by endpoint and status.",
               [(f'{{endpoint="{e}",status="{c}"}}', n) for (e, c), n in sorted(self.counts.items())])
        sch = self.scheduler
        st = sch.stats if sch else collections.Counter()
        metric("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", [("", st["prompt_tokens"])])
        metric("prompt_tokens_cached_total", "counter", "Prompt tokens reused from the KV cache.", [("", st["cached_tokens"])])
        metric("generated_tokens_total", "counter", "Tokens generated.", [("", st["generated_tokens"])])
        metric("decode_tokens_per_second", "gauge", "Decoded tokens per second over the last 10 s.",
               [("", round(sch.tokens_per_second(), 3) if sch else 0)])
        metric("queue_depth", "gauge", "Requests waiting for a slot.", [("", len(sch.waiting) if sch else 0)])
        metric("slots_busy", "gauge", "Slots decoding or prefilling.", [("", len(sch.active) if sch else 0)])
        metric("slots", "gauge", "Slots (--parallel).", [("", sch.engine.slots if sch else self.parallel)])
        metric("requests_in_flight", "gauge", "Generation requests not finished.", [("", self.inflight)])
        metric("time_to_first_token_seconds", "summary", "From arrival to the first generated token.",
               [("_sum", round(self.ttft[0], 6)), ("_count", self.ttft[1])])
        metric("model_loaded", "gauge", "1 once the model is loaded.", [("", int(self.llm is not None))])
        return "\n".join(lines) + "\n"




class _CORS(CORSMiddleware):
    """Starlette's CORS, its refused preflights in OpenAI's shape (same status, same CORS headers)."""

    def preflight_response(self, request_headers):
        r = super().preflight_response(request_headers)
        if r.status_code == 200:
            return r
        headers = {k: v for k, v in r.headers.items() if k.startswith("access-control-") or k == "vary"}
        return APIError(r.status_code, r.body.decode("utf-8", "replace"), code="cors_not_allowed",
                        headers=headers).response()


class _Guard:
    """ASGI middleware: Host check on loopback (DNS rebinding), the API key, request counts."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s = self.server
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        status = [0]

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            if s.loopback and _host_name(headers.get("host", "")) not in LOOPBACK_HOSTS:
                raise APIError(403, "this server only answers requests addressed to localhost (Host header check)",
                               "permission_error", code="host_not_allowed")
            if s.api_key and path not in ("/", "/health") and scope["method"] != "OPTIONS":
                auth = headers.get("authorization", "")
                given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
                if not hmac.compare_digest(given.encode(), s.api_key.encode()):
                    raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                   "authentication_error", code="invalid_api_key")
        except APIError as e:
            origin = headers.get("origin")
            if origin and (origin in s.cors_origins or "*" in s.cors_origins):    # a browser may read why
                e.headers = {**(e.headers or {}), "Access-Control-Allow-Origin": "*" if "*" in s.cors_origins else origin,
                             "Vary": "Origin"}
            await e.response()(scope, receive, counted)
        else:
            try:
                await self.app(scope, receive, counted)
            except ClientDisconnect:  # the client left mid-body or mid-stream: nothing to answer
                pass
            except Exception as e:    # a bug: the client got a 500 in OpenAI's shape; the log gets one line
                print(f"edgert: internal error on {scope['method']} {path}: {type(e).__name__}: {e}"[:500],
                      file=sys.stderr, flush=True)
        finally:
            endpoint = path if path in ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions",
                                        "/v1/completions", "/tokenize", "/detokenize") else "other"
            s.counts[(endpoint, status[0] or 499)] += 1


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(artifact, host="127.0.0.1", port=8080, api_key=None, parallel=1, context=None, threads=None,
          max_memory=None, cors_origins=(), max_queue=None, timeout=600.0) -> int:
    """Run the server until interrupted; returns the exit code."""
    import socket
    import uvicorn
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        print(f"edgert: error: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    server = Server(artifact, context=context, threads=threads, parallel=parallel, max_memory=max_memory,
                    api_key=api_key, host=host, cors_origins=cors_origins, max_queue=max_queue, timeout=timeout)
    config = uvicorn.Config(server.app, host=host, port=port, http=_protocol(server.counts), log_level="warning", access_log=False,
                            lifespan="off", server_header=False, timeout_keep_alive=5,
                            limit_concurrency=64 + 16 * parallel, h11_max_incomplete_event_size=MAX_HEADERS)
    http = uvicorn.Server(config)
    failed = []

    def load():
        t0 = time.time()
        try:
            server.load()
        except Exception:
            failed.append(1)
            print(f"edgert: error: {server.load_error}", file=sys.stderr, flush=True)
            http.should_exit = True
            return
        print(f"edgert: serving {server.model_id} on http://{_url_host(host)}:{port} (loaded in {time.time() - t0:.1f} s, "
              f"{server.scheduler.engine.slots} slot(s), context {server.llm.context})", file=sys.stderr, flush=True)

    if not _is_loopback(host) and not api_key:
        print(f"edgert: warning: listening on {host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr, flush=True)
    threading.Thread(target=load, name="edgert-load", daemon=True).start()
    try:
        http.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    if server.scheduler:
        server.scheduler.close()
    if failed:
        return 1
    return 0 if http.started or not failed else 1


def _protocol(counts: collections.Counter):
    """uvicorn's h11 protocol, plus a deadline for each request's headers: HEADER_SECONDS from a new
    connection, and from the end of the previous response on a kept-alive one (uvicorn's keep-alive
    timer starts again at every byte, so a byte every few seconds would hold the connection, and its
    place in the connection limit, forever; so would a body the route never reads, trickled).
    Malformed HTTP gets an error in OpenAI's shape, not uvicorn's plain text, and is counted in
    `counts` as endpoint "invalid" (/metrics), not logged a line each (a flood would fill the log)."""
    import logging
    from http import HTTPStatus

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        dropped = None                  # bytes read and dropped after an error response (None: no error yet)

        def connection_made(self, transport):
            super().connection_made(transport)
            self.loop.call_later(HEADER_SECONDS, self._drop_if_still, None)

        def send_400_response(self, msg):
            """uvicorn calls this while handling h11's RemoteProtocolError: 400, or 431 for headers
            past MAX_HEADERS (h11's hint). Then a half-close, and what the client still sends is read and
            dropped (bounded): closing with unread data would send a reset, which can destroy the answer."""
            e = sys.exc_info()[1]
            if self.cycle and not self.cycle.response_complete:     # a bad body: its route sees a disconnect
                self.cycle.disconnected = True                        # (its own answer would be an h11 error)
                self.cycle.message_event.set()
            if getattr(e, "error_status_hint", None) == 431:
                err = APIError(431, f"the request's headers exceed {MAX_HEADERS >> 10} KiB", code="headers_too_large")
            else:
                err = APIError(400, f"malformed HTTP request: {str(e or msg).split(': ')[0]}"[:200],
                               code="invalid_http")     # (h11's reason, without the bytes it quotes)
            counts[("invalid", err.status)] += 1
            r = err.response()
            try:
                self.transport.write(self.conn.send(h11.Response(
                    status_code=r.status_code, headers=[*r.raw_headers, (b"connection", b"close")],
                    reason=HTTPStatus(r.status_code).phrase.encode())))
            except h11.LocalProtocolError:     # a response has begun: nothing more can be said
                self.transport.close()
                return
            self.transport.write(self.conn.send(h11.Data(data=r.body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
            self.dropped = 0
            self.flow.resume_reading()          # (paused under a large body)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)

        def data_received(self, data):
            if self.dropped is None:
                return super().data_received(data)
            self.dropped += len(data)
            if self.dropped > LINGER_BYTES:
                self.transport.close()

        def on_response_complete(self):
            super().on_response_complete()
            self.loop.call_later(HEADER_SECONDS, self._drop_if_still, self.cycle)

        def _drop_if_still(self, cycle):
            """No new request has begun since `cycle` (None: since the connection opened)."""
            if self.cycle is cycle and not self.transport.is_closing():
                self.transport.close()

    logging.getLogger("uvicorn.error").addFilter(_not_each_malformed_request)     # (the same filter once)
    return Protocol


def _not_each_malformed_request(record) -> bool:
    """uvicorn logs a warning for each malformed request; send_400_response counts them instead."""
    return record.getMessage() != "Invalid HTTP request received."


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
