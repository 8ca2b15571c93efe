"""Bad input gets one clear line on stderr and a non-zero exit: no traceback, no partial output."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BUNDLED_STORIES


def edgert(*args, stdin: str | None = None, env=None):
    return subprocess.run([sys.executable, "-m", "edgert.cli", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=300, env={**os.environ, **(env or {})})


def assert_one_line_error(r, *fragments):
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    err = [line for line in r.stderr.strip().splitlines() if line.strip()]
    text = " ".join(err)
    for f in fragments:
        assert f in text, text
    return text


@pytest.fixture(scope="module")
def artifact(exported):
    return exported(BUNDLED_STORIES, 8)


def copy_model(tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(BUNDLED_STORIES, dst)
    return dst


def test_run_streams_only_generated_text(artifact):
    r = edgert("run", artifact, "Once upon a time", "--raw", "--max-tokens", "20", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(", there was a little girl named Lily")
    assert "tok/s" in r.stderr and "tok/s" not in r.stdout


def test_run_json_and_stdin(artifact):
    r = edgert("run", artifact, "--raw", "--max-tokens", "12", "--json", "--temperature", "0", stdin="Once upon a time")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"text", "tokens", "prompt_tokens", "reasoning", "answer", "prefill_tok_s", "decode_tok_s",
                        "stop_reason"}
    assert len(out["tokens"]) == 12 and out["stop_reason"] == "length" and out["prompt_tokens"] == 5
    assert out["text"].startswith(", there was")


def test_export_missing_folder(tmp_path):
    assert_one_line_error(edgert("export", tmp_path / "nope", "-o", tmp_path / "out"), "no such model folder")
    assert not (tmp_path / "out").exists()


def test_export_unknown_architecture_lists_supported(tmp_path):
    src = copy_model(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "bert"
    (src / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(edgert("export", src, "-o", tmp_path / "out"), "'bert' is not built natively", "llama", "qwen2", "qwen3", "edgert[optimum]")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_export_corrupt_safetensors(tmp_path, damage):
    src = copy_model(tmp_path)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"{garbage" + data[16:])
    text = assert_one_line_error(edgert("export", src, "-o", tmp_path / "out"), "model.safetensors")
    assert ("truncated" in text) if damage == "truncate" else ("corrupt" in text)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_export_refuses_nonempty_out_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_one_line_error(edgert("export", BUNDLED_STORIES, "-o", out), "not an edgert artifact")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    # the user's folder is never replaced, even with --force (tests/test_hostile.py: an artifact is)
    assert_one_line_error(edgert("export", BUNDLED_STORIES, "-o", out, "--force", "--bits", "8"), "even with --force")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    from edgert_export import artifact as art
    from edgert_export.decoder import Decoder
    calls = {"n": 0}
    real_ffn = Decoder.ffn

    def ffn(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_ffn(self, *a, **k)
    monkeypatch.setattr(Decoder, "ffn", ffn)
    with pytest.raises(KeyboardInterrupt):
        art.export(BUNDLED_STORIES, tmp_path / "out", bits=4, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_flags(artifact, tmp_path):
    assert_one_line_error(edgert("run", artifact, "hi", "--max-tokens", "-5"), "--max-tokens")
    assert_one_line_error(edgert("run", artifact, "hi", "--top-p", "3"), "--top-p")
    assert_one_line_error(edgert("export", BUNDLED_STORIES, "-o", tmp_path / "o", "--bits", "3"), "--bits")
    assert_one_line_error(edgert("export", BUNDLED_STORIES, "-o", tmp_path / "o", "--block-size", "48"), "--block-size")
    assert_one_line_error(edgert("run", artifact, "hi", "--context", "100000"), "--context")
    assert not (tmp_path / "o").exists()


def test_prompt_longer_than_context(artifact):
    assert_one_line_error(edgert("run", artifact, "Once upon a time " * 40, "--raw", "--context", "32"),
                          "prompt has", "context")


def test_corrupt_and_foreign_artifacts(artifact, tmp_path):
    assert_one_line_error(edgert("run", tmp_path / "missing", "hi"), "no such artifact")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.onnx").write_bytes(b"not onnx")
    assert_one_line_error(edgert("run", foreign, "hi"), "not an edgert artifact")

    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    (bad / "edgert.json").write_text("{oops")
    assert_one_line_error(edgert("run", bad, "hi"), "corrupt manifest")

    cut = tmp_path / "cut"
    shutil.copytree(artifact, cut)
    data = cut / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    assert_one_line_error(edgert("run", cut, "hi"), "model.onnx.data", "truncated")

    flipped = tmp_path / "flipped"
    shutil.copytree(artifact, flipped)
    raw = bytearray((flipped / "model.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (flipped / "model.onnx").write_bytes(bytes(raw))
    assert_one_line_error(edgert("verify", flipped), "corrupt")
    assert edgert("verify", artifact).returncode == 0


def test_missing_prompt_on_terminal_is_an_error(artifact):
    # an empty stdin is a mistake, not a request for unconditional text
    assert_one_line_error(edgert("run", artifact, "--raw", stdin=""), "empty")
