"""Export guards: inputs the exporter must refuse in one line (exit 1, no traceback, nothing half-written,
nothing of the user's deleted) instead of deleting, hanging, filling the disk or writing a broken artifact.

Each case starts from the bundled stories260K (0.3M parameters; an export takes a fraction of a second)."""
from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import BUNDLED_STORIES, ROOT

WALL = 60


def cli(*args, timeout=WALL) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "edgert.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def one_line(r: subprocess.CompletedProcess, *fragments) -> str:
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr, r.stderr[-2000:]
    assert r.returncode == 1, (r.returncode, r.stderr[-1000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgert: error: "), r.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def nothing_left(out: Path) -> None:
    assert not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


@pytest.fixture
def src(tmp_path) -> Path:
    d = tmp_path / "src"
    shutil.copytree(BUNDLED_STORIES, d)
    return d


def export_rtn(src, out, *extra, timeout=WALL):
    return cli("export", src, "-o", out, "--recipe", "rtn", *extra, timeout=timeout)


# ---- 1. --force replaces an artifact, never a folder with the user's files in it -------------------

def test_force_keeps_foreign_files(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "edgert.json").write_text('{"format":"edgert"}')
    (out / "thesis.tex").write_text("years of work")
    one_line(export_rtn(src, out, "--force"), "thesis.tex", "--force")
    assert (out / "thesis.tex").read_text() == "years of work" and (out / "edgert.json").is_file()
    (out / "thesis.tex").unlink()
    (out / "notes").mkdir()                  # a folder: no export writes one
    one_line(export_rtn(src, out, "--force"), "notes")
    assert (out / "notes").is_dir()
    shutil.rmtree(out / "notes")             # an artifact's own files only: replaced
    r = export_rtn(src, out, "--force")
    assert r.returncode == 0, r.stderr
    again = export_rtn(src, out, "--force", "--bits", "8")      # a real artifact (graphs, tokenizer, data)
    assert again.returncode == 0, again.stderr
    assert (out / "model.onnx").is_file() and not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


# ---- 2. a long --calib file is cut at the self-calibration's token count ----------------------------

def test_calib_file_capped(src, tmp_path):
    from edgert_export.calibrate import SMALL_TOKENS
    text = tmp_path / "long.txt"
    text.write_text("Once upon a time a little fox ran through the green forest to find her friend. " * 600)  # ~30k tokens
    out = tmp_path / "out"
    r = cli("export", src, "-o", out, "--calib", text)
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "--calib" in line]
    assert len(notes) == 1 and f"first {SMALL_TOKENS} tokens" in notes[0], r.stderr
    assert json.loads((out / "edgert.json").read_text())["quantization"]["calibration_tokens"] == SMALL_TOKENS
    short = tmp_path / "short.txt"            # below the cap: every token, no note
    short.write_text("Once upon a time a little fox ran through the green forest. " * 20)
    r = cli("export", src, "-o", tmp_path / "out2", "--calib", short)
    assert r.returncode == 0 and "--calib" not in r.stderr, r.stderr
    tokens = json.loads((tmp_path / "out2" / "edgert.json").read_text())["quantization"]["calibration_tokens"]
    assert 200 < tokens < SMALL_TOKENS


# ---- 3. a FIFO (or other non-regular file) as a checkpoint file -----------------------------------------

@pytest.mark.parametrize("name", ["model.safetensors", "model-2.safetensors"])
def test_fifo_checkpoint_refused(src, tmp_path, name):
    if name == "model.safetensors":
        (src / name).unlink()
    os.mkfifo(src / name)
    out = tmp_path / "out"
    one_line(export_rtn(src, out, timeout=20), name, "not a regular file")     # a hang: TimeoutExpired
    nothing_left(out)


def test_fifo_index_shard_refused(src, tmp_path):
    (src / "model.safetensors").rename(src / "a.safetensors")
    os.mkfifo(src / "b.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "b.safetensors"}}))
    one_line(export_rtn(src, tmp_path / "out", timeout=20), "b.safetensors", "not a regular file")


# ---- 4. a chat template that cannot render, a tokenizer_config.json that is not an object ----------------

@pytest.mark.parametrize("template,want", [
    ("{% for m in messages %}{{ m.content }", "syntax"),
    ("{{ raise_exception('no') }}", "no"),
    ("{% for m in messages %}{{ foo.bar }}{% endfor %}", "undefined"),
    ("{% for i in range(100000000) %}{% for j in range(100000000) %}x{% endfor %}{% endfor %}", "chat template"),
    (b"\xff\xfe\x00binary\x80", "UTF-8"),
], ids=["jinja", "raises", "undefined", "loop", "binary"])
def test_unrenderable_chat_template_refused(src, tmp_path, template, want):
    f = src / "chat_template.jinja"
    f.write_bytes(template) if isinstance(template, bytes) else f.write_text(template)
    out = tmp_path / "out"
    one_line(export_rtn(src, out), want)
    nothing_left(out)


@pytest.mark.parametrize("content", ["[]", "{bad", "null"])
def test_tokenizer_config_not_an_object_refused(src, tmp_path, content):
    (src / "tokenizer_config.json").write_text(content)
    one_line(export_rtn(src, tmp_path / "out"), "tokenizer_config.json")


def test_renderable_chat_template_exports(src, tmp_path):
    (src / "chat_template.jinja").write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                                             "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert export_rtn(src, tmp_path / "out").returncode == 0


# ---- 5. huge but finite weights ----------------------------------------------------------------------

def _rewrite_tensor(path: Path, name: str, fill: float) -> None:
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    b, e = header[name]["data_offsets"]
    assert header[name]["dtype"] == "F32"
    data[8 + n + b:8 + n + e] = np.full((e - b) // 4, fill, np.float32).tobytes()
    path.write_bytes(bytes(data))


def test_huge_weights_refused(src, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite_tensor(src / "model.safetensors", name, 3e38)
    out = tmp_path / "out"
    one_line(export_rtn(src, out), name, "magnitude")
    nothing_left(out)


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_to_float32_magnitude(dtype):
    from edgert_export.checkpoint import CheckpointError, to_float32

    def stored(values):
        a = np.array(values, np.float32)
        return (a.view(np.uint32) >> 16).astype(np.uint16) if dtype == "BF16" else a.astype(
            np.float16 if dtype == "F16" else np.float32)
    ok = [0.5, -3.0, 1e3, 60000.0]
    assert np.allclose(to_float32(stored(ok), dtype, "w"), ok, rtol=1e-2)
    if dtype != "F16":            # fp16 cannot hold a huge finite value
        with pytest.raises(CheckpointError, match="w holds values beyond"):
            to_float32(stored([0.1, -3e38, 1.0]), dtype, "w")
        with pytest.raises(CheckpointError, match="w holds values beyond"):
            to_float32(stored([2e15]), dtype, "w")


# ---- 6. path errors --------------------------------------------------------------------------------

def _refused(src, out, *fragments):
    from edgert_export import ExportError, export
    with pytest.raises(ExportError) as e:
        export(src, out, recipe="rtn", progress=False)
    line = str(e.value)
    assert "\n" not in line and all(f in line for f in fragments), line
    return line


def test_name_too_long(src, tmp_path):
    _refused(src, tmp_path / ("a" * 300), "too long")
    nothing_left(tmp_path / "b")


def test_symlink_loop_as_out_or_source(src, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    _refused(src, loop, "loop")
    _refused(loop, tmp_path / "out", "loop")
    one_line(export_rtn(loop, tmp_path / "out"), "loop")


def _deny(monkeypatch, inside: Path):
    """stat() of anything under `inside` fails as it does for a non-root user without permission
    (the tests may run as root, which no chmod stops)."""
    real = pathlib.Path.stat

    def stat(self, *a, **k):
        if inside in Path(os.path.abspath(self)).parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)
    monkeypatch.setattr(pathlib.Path, "stat", stat)


def test_unreadable_source(src, tmp_path, monkeypatch):
    _deny(monkeypatch, src.resolve())
    _refused(src, tmp_path / "out", "Permission denied")
    nothing_left(tmp_path / "out")


def test_out_under_folder_without_permission(src, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    _deny(monkeypatch, locked.resolve())
    _refused(src, locked / "out", "Permission denied")


# ---- 7. config and checkpoint that disagree ----------------------------------------------------------

def test_fewer_layers_in_config_refused(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    one_line(export_rtn(src, out), "3 layers", "layer 3")
    nothing_left(out)


def test_duplicate_tensor_across_shards_refused(src, tmp_path):
    shutil.copyfile(src / "model.safetensors", src / "model-2.safetensors")
    out = tmp_path / "out"
    one_line(export_rtn(src, out), "in both", "model-2.safetensors")
    nothing_left(out)
