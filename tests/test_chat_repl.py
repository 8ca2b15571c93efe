"""Multi-turn chat: llm.chat() (edgert.conversation) and `edgert chat` in a pseudo-terminal.

The reference for every answer is a fresh run (a second LLM, its cache reset) of the whole
conversation rendered independently here with the fixture's chat template; the reference for the
cache is closed-form: a turn reuses exactly the longest common token prefix of what the cache
holds (the previous prompt + the tokens generated after it) and the new prompt, and prefills the
rest, which for R1's template is the last answer without its reasoning + the new question.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

FIXTURE = ROOT / "export" / "data" / "reasoning-qwen2"
QUESTIONS = ["What is (9-5)*7+2+2?", "What is 3+4*2?", "What is 8-3+1?"]
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def artifact(exported):
    # int4 at blocks of 32: the chat's cached prefix is compared token for token with a fresh run's one
    # prefill, which holds bitwise where onnxruntime's one-row and many-row int4 kernels agree (32; at
    # the default's 64 and 128 they differ by float rounding, enough to flip a near-tie)
    return exported(FIXTURE, 4, block_size=32)


@pytest.fixture(scope="module")
def fresh(artifact):
    """run(messages) -> the generated ids and text of a fresh greedy run of the rendered conversation."""
    import edgert
    from edgert.chat import load_chat_template, render_chat
    ref = edgert.load(artifact, threads=1)
    cfg = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    template = load_chat_template(FIXTURE)

    def prompt(messages, close_thinking=False):
        text = render_chat(template, messages, bos_token=cfg["bos_token"], eos_token=cfg["eos_token"])
        if close_thinking:
            text += "\n</think>\n\n"
        return ref.tokenizer.encode(text, add_special_tokens=False)

    def run(messages, close_thinking=False):
        ids = prompt(messages, close_thinking)
        ref.engine.forget()                   # nothing reused: the whole prompt prefilled at once
        toks = list(ref.generate(ids, max_tokens=ref.context - len(ids), temperature=0.0))
        assert ref.stats.extra["cached_tokens"] == 0
        return ids, [t.id for t in toks if t.id >= 0], "".join(t.text for t in toks)
    run.prompt, run.tokenizer, run.eos = prompt, ref.tokenizer, cfg["eos_token"]
    return run


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b) - 1) and a[n] == b[n]:
        n += 1
    return n


def test_turns_equal_fresh_runs_and_prefill_only_the_new_tokens(artifact, fresh):
    import edgert
    llm = edgert.load(artifact, threads=1)
    conv = llm.chat()
    messages, held, previous_answer = [], [], None
    for q in QUESTIONS:
        messages.append({"role": "user", "content": q})
        prompt, gen, text = fresh(messages)
        got = list(conv.send(q, temperature=0))
        assert [t.id for t in got if t.id >= 0] == gen and "".join(t.text for t in got) == text
        s = conv.stats
        assert (s.prompt_tokens, s.generated, s.stop_reason) == (len(prompt), len(gen), "eos")
        assert s.cached_tokens == common_prefix(held, prompt)
        assert s.prefilled_tokens == len(prompt) - s.cached_tokens
        if previous_answer is not None:
            # the cut is reasoning-aware: the cache keeps everything up to the old answer's header, and
            # the template's shorter rendering of that answer (reasoning dropped) + the question are prefilled
            assert fresh.tokenizer.decode(prompt[s.cached_tokens:]) == \
                f"{previous_answer}{fresh.eos}<｜User｜>{q}<｜Assistant｜><think>\n"
            assert s.cached_tokens == len(held) - len(gen_before) - 2        # all of it but "<think>", "\n"
        held, gen_before = prompt + gen, gen         # ended at EOS: every generated token was fed
        reasoning, _, answer = text.partition("</think>")
        previous_answer = answer.strip()
        assert conv.messages[-1] == {"role": "assistant", "content": previous_answer,
                                     "reasoning_content": reasoning.strip("\n")}
        messages.append({"role": "assistant", "content": text})   # the template drops the reasoning itself
    assert [m["content"] for m in conv.messages if m["role"] == "user"] == QUESTIONS


def test_thinking_off_closes_the_reasoning_in_the_prompt(artifact, fresh):
    import edgert
    conv = edgert.load(artifact, threads=1).chat(thinking=False)
    got = list(conv.send(QUESTIONS[0], temperature=0))
    prompt, gen, text = fresh([{"role": "user", "content": QUESTIONS[0]}], close_thinking=True)
    # the closing is tokenized with the rendering: "<think>\n" + "\n</think>" meet in one "\n\n" token
    assert conv.prompt_ids([{"role": "user", "content": QUESTIONS[0]}]) == prompt
    assert conv.stats.prompt_tokens == len(prompt)
    assert [t.id for t in got] == gen and not any(t.reasoning for t in got)
    assert conv.messages[-1] == {"role": "assistant", "content": text}


def test_a_new_message_ends_an_answer_left_unfinished(artifact, fresh):
    import edgert
    conv = edgert.load(artifact, threads=1).chat()
    stream = conv.send(QUESTIONS[0], temperature=0)
    first = [next(stream) for _ in range(3)]
    got = [t.id for t in conv.send(QUESTIONS[1], temperature=0)]       # the one-slot engine is free again
    partial = "".join(t.text for t in first)
    assert conv.history[1] == {"role": "assistant", "content": "", "reasoning_content": partial.strip("\n")}
    assert conv.stats.cached_tokens > 0
    _, gen, _ = fresh(conv.messages[:3])
    assert got == gen


def test_full_context_drops_the_oldest_turns(artifact, fresh):
    import edgert
    conv = edgert.load(artifact, threads=1, context=100).chat(system="Be brief.")
    for q in QUESTIONS + ["What is 2*3+4?"]:
        list(conv.send(q, temperature=0))
    s = conv.stats
    assert s.dropped_turns == 1 and s.stop_reason == "eos"
    kept = conv.messages[:-1]
    assert kept[0] == {"role": "system", "content": "Be brief."} and kept[1]["content"] == QUESTIONS[1]
    prompt, gen, _ = fresh(kept)
    assert s.prompt_tokens == len(prompt) and s.generated == len(gen)
    assert s.prompt_tokens + 100 // 4 <= 100                              # room was kept for the answer
    # an old turn far too long to even tokenize for this context is dropped the same way
    conv.history[-2]["content"] = "1+" * 4000
    list(conv.send(QUESTIONS[0], temperature=0))
    assert conv.stats.dropped_turns == 3 and [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
    with pytest.raises(edgert.llm.PromptTooLong):
        conv.send("1+" * 4000)


def test_an_answer_that_fills_the_context_stops_there(artifact, fresh):
    import edgert
    conv = edgert.load(artifact, threads=1, context=40).chat()
    got = list(conv.send(QUESTIONS[0], temperature=0))
    prompt, gen, _ = fresh([{"role": "user", "content": QUESTIONS[0]}])
    assert len(prompt) + len(gen) > 40                                    # the answer needs more room
    assert [t.id for t in got] == gen[:40 - len(prompt)] and conv.stats.stop_reason == "context"
    assert conv.messages[-1]["content"] == "" and conv.messages[-1]["reasoning_content"]   # cut while reasoning
    got = [t.id for t in conv.send(QUESTIONS[1], temperature=0)]    # fits: the template drops that reasoning
    prompt, gen, _ = fresh(conv.messages[:3])
    assert conv.stats.dropped_turns == 0 and conv.stats.prompt_tokens == len(prompt) <= 40 - 40 // 4
    assert got == gen[:40 - len(prompt)]


def test_save_and_load_restore_the_conversation(artifact, fresh, tmp_path):
    import edgert
    llm = edgert.load(artifact, threads=1)
    conv = llm.chat(system="Be brief.")
    for q in QUESTIONS[:2]:
        list(conv.send(q, temperature=0))
    conv.save(tmp_path / "chat.json")
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]
    other = edgert.load(artifact, threads=1).chat()
    other.load(tmp_path / "chat.json")
    assert other.messages == conv.messages and other.system == "Be brief."
    got = [t.id for t in other.send(QUESTIONS[2], temperature=0)]
    _, gen, _ = fresh(conv.messages + [{"role": "user", "content": QUESTIONS[2]}])
    assert got == gen and other.stats.cached_tokens == 0       # a fresh model: everything prefilled once
    before = other.messages
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "robot", "content": "hi"}]}')
    (tmp_path / "text.json").write_text("hello")
    for path, fragment in [(tmp_path / "nope.json", "cannot read"), (tmp_path / "bad.json", "not a saved"),
                           (tmp_path / "text.json", "not JSON"), (tmp_path, "cannot read")]:
        with pytest.raises(ValueError, match=fragment):
            other.load(path)
    assert other.messages == before
    with pytest.raises(ValueError, match="cannot write"):
        other.save(tmp_path / "missing" / "chat.json")
    # /save never destroys what it did not write: another file, a link, a folder; its own file is replaced
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    precious.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "chat.json")
    for path, fragment in [(precious, "not a conversation saved by edgert"), (link, "not a regular file"),
                           (tmp_path, "not a regular file"), (tmp_path / "bad.json", "not a conversation saved")]:
        with pytest.raises(ValueError, match=fragment):
            other.save(path)
    assert precious.read_text() == "keep me" and link.is_symlink()
    (tmp_path / "chat.json").chmod(0o640)
    other.save(tmp_path / "chat.json")
    assert json.loads((tmp_path / "chat.json").read_text())["messages"] == other.messages
    assert (tmp_path / "chat.json").stat().st_mode & 0o777 == 0o640
    other.save(tmp_path / "new.json")
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# ---- `edgert chat` in a pseudo-terminal ----

def default_sigint():
    """In the chat's process before exec: Ctrl+C must raise there. A suite started in the background by a
    non-interactive shell (`nohup ... &`, as CI scripts do) runs with SIGINT ignored, and an ignored
    signal stays ignored across exec, so Python would never see the Ctrl+C."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Chat:
    def __init__(self, artifact, *args):
        pexpect = pytest.importorskip("pexpect")
        env = {**os.environ, "TERM": "dumb"}
        env.pop("NO_COLOR", None)
        # echo off: readline then writes nothing while reading a line, so the terminal can be paused
        # (XOFF) before an answer starts, making "Ctrl+C mid-answer" deterministic
        self.p = pexpect.spawn(sys.executable, ["-m", "edgert.cli", "chat", str(artifact), "--temperature", "0",
                                                "--threads", "1", *args], encoding="utf-8", timeout=120, echo=False,
                               env=env, dimensions=(40, 400), preexec_fn=default_sigint)
        self.banner = self.wait()

    def wait(self) -> str:
        self.p.expect_exact(">>> ")
        return self.p.before.replace("\r\n", "\n")

    def say(self, line: str) -> str:
        self.p.send(line + "\r")
        return self.wait()

    def stats(self) -> dict:
        out = self.say("/stats")
        m = re.search(r"prompt (\d+) tokens, (\d+) reused from the cache, (\d+) prefilled .* \| (\d+) generated "
                      r".*tok/s \| stop: (\w+)", out)
        assert m, out
        return dict(zip(("prompt", "cached", "prefilled", "generated"), map(int, m.groups()[:4])), stop=m.group(5))


WRITES = {"x86_64": ("1", "20"), "aarch64": ("64", "66")}     # write, writev syscall numbers


def wait_blocked_on_terminal(pid: int) -> None:
    """Until the process sleeps writing to its paused terminal: in write(2) by /proc/PID/syscall (a
    process waiting to read its input sleeps in the same kernel wait channel, wait_woken) and still
    there 50 ms later (not a quick write elsewhere caught in passing); else by the wait channel."""
    deadline = time.monotonic() + 120
    writes = WRITES.get(__import__("platform").machine())
    held = 0
    while time.monotonic() < deadline:
        try:
            call = Path(f"/proc/{pid}/syscall").read_text().split()
        except OSError:
            call = []
        if writes and call:
            held = held + 1 if call[0] in writes else 0
            if held >= 6:
                return
            time.sleep(0.01)          # reading, running, or not blocked long enough yet
            continue
        try:
            wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
        except OSError:
            wchan = ""
        if wchan in ("", "0"):          # the kernel hides it: give the chat ample time to start answering
            time.sleep(3)
            return
        if wchan in ("wait_woken", "n_tty_write"):
            return
        time.sleep(0.01)
    raise AssertionError("the chat never started writing its answer")


def test_chat_in_a_terminal(artifact, fresh, tmp_path):
    chat = Chat(artifact)
    assert "256-token context" in chat.banner
    messages, held = [], []
    for q in QUESTIONS:                                          # three turns
        messages.append({"role": "user", "content": q})
        prompt, gen, text = fresh(messages)
        shown = chat.say(q)
        assert ESCAPES.sub("", shown) == text + "\n"             # the answer equals a fresh run
        assert shown.startswith("\x1b[2m") and "</think>\x1b[0m" in shown    # the reasoning dimmed
        s = chat.stats()
        assert s == {"prompt": len(prompt), "cached": common_prefix(held, prompt),
                     "prefilled": len(prompt) - common_prefix(held, prompt), "generated": len(gen), "stop": "eos"}
        if held:       # turns 2 and 3 prefill only the new text: the last answer as the template keeps it + the question
            new = f"{text_before.partition('</think>')[2].strip()}{fresh.eos}<｜User｜>{q}<｜Assistant｜><think>\n"
            assert fresh.tokenizer.decode(prompt[s["cached"]:]) == new
        held, text_before = prompt + gen, text
        messages.append({"role": "assistant", "content": text})

    # Ctrl+C mid-answer: XOFF pauses the terminal, so the answer blocks on its first write until Ctrl+C
    chat.p.send("What is 2*3+4?\r\x13")
    wait_blocked_on_terminal(chat.p.pid)
    chat.p.sendintr()
    after = chat.wait()
    assert "[stopped]" in after and "Traceback" not in after
    s = chat.stats()
    assert s["stop"] == "interrupted" and 1 <= s["generated"] < 5
    # the program goes on, the interrupted turn kept as far as it got; /save, then /clear and /load
    # restore the conversation: the next answer is the fresh run's
    out = chat.say(f"/save {tmp_path / 'chat.json'}")
    assert "messages saved" in out
    saved = json.loads((tmp_path / "chat.json").read_text())["messages"]
    assert [m["content"] for m in saved if m["role"] == "user"] == QUESTIONS + ["What is 2*3+4?"]
    assert saved[-1]["role"] == "assistant" and saved[-1]["content"] == ""   # stopped while reasoning
    chat.say("/clear")
    out = chat.say(f"/load {tmp_path / 'chat.json'}")
    assert "8 messages loaded" in out
    prompt, gen, text = fresh(saved + [{"role": "user", "content": "What is 1+2?"}])
    assert ESCAPES.sub("", chat.say("What is 1+2?")) == text + "\n"
    s = chat.stats()
    assert (s["prompt"], s["generated"]) == (len(prompt), len(gen)) and s["cached"] > 0

    # bad input: one line each, the chat goes on
    for line, fragment in [("/bogus", "unknown command /bogus"), (f"/load {tmp_path / 'nope.json'}", "cannot read"),
                           ("/think maybe", "/think takes on, off"), ("/save", "needs a file name")]:
        out = chat.say(line).strip()
        assert fragment in out and len(out.splitlines()) == 1, out
    # /system and /think off reach the template
    chat.say("/clear")
    chat.say("/system Be brief.")
    chat.say("/think off")
    _, gen, text = fresh([{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[0]}],
                         close_thinking=True)
    assert ESCAPES.sub("", chat.say(QUESTIONS[0])) == text + "\n"
    # Ctrl+C at the prompt asks; a second one leaves cleanly
    chat.p.sendintr()
    chat.p.expect_exact("Ctrl+C again")
    chat.p.sendintr()
    chat.p.expect(pytest.importorskip("pexpect").EOF)
    chat.p.close()
    assert chat.p.exitstatus == 0 and "Traceback" not in chat.p.before


def test_chat_leaves_on_ctrl_d(artifact):
    chat = Chat(artifact)
    chat.p.sendeof()
    chat.p.expect(pytest.importorskip("pexpect").EOF)
    chat.p.close()
    assert chat.p.exitstatus == 0 and "Traceback" not in chat.p.before


def test_chat_reads_lines_from_a_pipe(artifact, fresh):
    lines = "\n".join([QUESTIONS[0], "/stats", QUESTIONS[1], "/nonsense"]) + "\n"
    r = subprocess.run([sys.executable, "-m", "edgert.cli", "chat", str(artifact), "--temperature", "0",
                        "--threads", "1"], input=lines, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr        # a line failed: a script learns it
    from edgert.cli import CHAT_COMMANDS
    _, _, first = fresh([{"role": "user", "content": QUESTIONS[0]}])
    assert r.stdout.startswith(first + "\nlast turn: prompt 18 tokens, 0 reused")
    assert "\x1b[" not in r.stdout                               # no colour on a pipe
    assert r.stderr.strip().splitlines() == ["edgert: unknown command /nonsense; the commands are " + CHAT_COMMANDS]


def test_chat_refuses_a_model_without_a_chat_template(exported):
    from conftest import BUNDLED_STORIES
    r = subprocess.run([sys.executable, "-m", "edgert.cli", "chat", str(exported(BUNDLED_STORIES, 8))],
                       input="Hello\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "no chat template" in r.stderr
