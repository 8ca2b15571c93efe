"""The CLI audit of 2026-12-04 (second pass): click's own usage errors, verify's coverage of every
file the runtime reads, `bench --json -` and `--json ART`, EDGERT_SYNTHETIC_DIR on a file, `export
--force` onto a read-only artifact, and FIFOs given as text files. Each is one line on stderr, a
non-zero exit, no traceback and nothing left behind."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BUNDLED_STORIES


def edgert(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "edgert.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, stdin=subprocess.DEVNULL)


def one_line(r, *fragments, code: int = 1) -> str:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-2000:]
    assert r.returncode == code, (r.returncode, r.stderr[-1000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgert: error: "), r.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def artifact(exported):
    return exported(BUNDLED_STORIES, 8)


def edit_manifest(art: Path, fn) -> None:
    m = json.loads((art / "edgert.json").read_text())
    fn(m)
    (art / "edgert.json").write_text(json.dumps(m, indent=2))


# ---- 1. click's usage errors: one line, status 2; help as it was ------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["run", "ART", "hi", "--temperature", "abc"], "'--temperature'"),
    (["run", "ART", "--bogus"], "--bogus"),
    (["run"], "Missing argument"),
    (["frob"], "frob"),
    (["bench", "--repeat", "0"], "--repeat"),
], ids=["bad-value", "unknown-option", "missing-argument", "unknown-command", "out-of-range"])
def test_usage_errors_are_one_line(args, fragment):
    text = one_line(edgert(*args), fragment, "--help)", code=2)
    assert "Usage:" not in text


def test_help_is_still_help():
    for args in ([], ["--help"], ["run", "--help"]):
        r = edgert(*args)
        assert "Usage:" in r.stdout + r.stderr and "edgert: error" not in r.stderr, (args, r.stderr)
        if args:
            assert r.returncode == 0, args
        else:                                     # `edgert` alone: the command list, click's status (2, or 0 < 8.2)
            assert "Commands" in r.stdout + r.stderr and r.returncode in (0, 2)


def _raise(e):
    def verify(path):
        raise e
    return verify


def test_exit_statuses_are_kept(monkeypatch, capsys):
    """fail() exits 1, Ctrl-C 130, success 0, through main() as the console script runs it."""
    from edgert import artifact as art, cli
    for verify, status in ((_raise(KeyboardInterrupt()), 130), (_raise(art.ArtifactError("damaged")), 1),
                           (lambda path: {"architecture": "x", "files": {}, "manifest_sha256": "0" * 64}, 0)):
        monkeypatch.setattr(art, "verify", verify)
        monkeypatch.setattr(art, "unchecked", lambda path, m: [], raising=False)
        monkeypatch.setattr(sys, "argv", ["edgert", "verify", "x"])
        with pytest.raises(SystemExit) as e:
            cli.main()
        assert (e.value.code or 0) == status
    assert capsys.readouterr().err.strip() == "edgert: error: damaged"


# ---- 2. verify covers the tokenizer, template and config files and the manifest itself -------------

def _edit_json(name, key, value):
    def edit(art: Path):
        d = json.loads((art / name).read_text())
        d[key] = value
        (art / name).write_text(json.dumps(d))
    return edit


@pytest.mark.parametrize("edit,fragment", [
    (lambda art: (art / "tokenizer.json").write_text((art / "tokenizer.json").read_text().replace('"a"', '"q"', 1)),
     "tokenizer.json is corrupt or was edited"),
    (_edit_json("tokenizer_config.json", "bos_token", "<unk>"), "tokenizer_config.json"),
    (_edit_json("generation_config.json", "temperature", 2.0), "generation_config.json"),
    (_edit_json("config.json", "rms_norm_eps", 0.5), "config.json"),
    (lambda art: edit_manifest(art, lambda m: m["special_tokens"].__setitem__("eos", [3])), "edgert.json was edited"),
    (lambda art: (art / "tokenizer_config.json").unlink(), "tokenizer_config.json is missing"),
    (lambda art: edit_manifest(art, lambda m: m["text_files"].__setitem__("model.onnx", m["files"]["model.onnx"])),
     "text_files"),
], ids=["tokenizer", "tokenizer-config", "generation-config", "config", "manifest", "removed", "foreign-entry"])
def test_verify_covers_every_file_the_runtime_reads(artifact, tmp_path, edit, fragment):
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    edit(art)
    one_line(edgert("verify", art), fragment)


def test_verify_covers_the_chat_template_file(tmp_path):
    from edgert_export import export
    src = tmp_path / "src"
    shutil.copytree(BUNDLED_STORIES, src)
    (src / "chat_template.jinja").write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                                             "{% if add_generation_prompt %}<assistant>{% endif %}")
    export(src, tmp_path / "art", bits=8, progress=False)
    assert edgert("verify", tmp_path / "art").returncode == 0
    (tmp_path / "art" / "chat_template.jinja").write_text("{{ messages[0].content }}")
    one_line(edgert("verify", tmp_path / "art"), "chat_template.jinja")


def test_artifact_without_the_new_hashes_verifies_and_says_what_it_could_not_check(artifact, tmp_path):
    r = edgert("verify", artifact)
    assert r.returncode == 0 and "not checked" not in r.stdout, r.stdout + r.stderr     # a new export: all of it
    old = tmp_path / "old"
    shutil.copytree(artifact, old)
    edit_manifest(old, lambda m: (m.pop("text_files"), m.pop("manifest_sha256")))      # as exported before
    (old / "tokenizer_config.json").write_text((old / "tokenizer_config.json").read_text() + " ")
    r = edgert("verify", old)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    note = r.stdout.splitlines()[-1]
    assert "not checked" in note and all(n in note for n in ("edgert.json", "tokenizer.json", "tokenizer_config.json"))
    r = edgert("run", old, "Once upon a time", "--raw", "--max-tokens", "3", "--temperature", "0")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr                          # the runtime loads it as before


# ---- 3. bench --json - and --json ART ---------------------------------------------------------------

def test_bench_json_dash_is_stdout(tmp_path):
    from edgert.cli import _bench_json_value
    assert _bench_json_value(["bench", "A", "--json", "-"]) == ["bench", "A", "--json", "-"]
    for args in (["bench", tmp_path / "nope", "--json", "-"], ["bench", "--json", "-", tmp_path / "nope"]):
        one_line(edgert(*args), "nope: no such artifact folder")       # "-" is the target, not an argument


def test_bench_json_before_the_artifact_benches_it(artifact, tmp_path):
    r = edgert("bench", "--json", artifact, "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "1",
               "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["gen_tokens"] == 4                     # JSON on stdout, no table
    one_line(edgert("bench", "--json", tmp_path / "nope"), "--json took", "nope")


# ---- 4. EDGERT_SYNTHETIC_DIR on a file ----------------------------------------------------------------

@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_synthetic_dir_on_a_file(tmp_path, where):
    f = tmp_path / "cache"
    f.write_text("not a folder")
    r = edgert("bench", "--synthetic", "qwen2.5-0.5b", env={"EDGERT_SYNTHETIC_DIR": str(f if where == "file" else f / "sub")})
    one_line(r, "EDGERT_SYNTHETIC_DIR", "not a folder")
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_a_read_only_synthetic_dir_is_said_before_a_build(tmp_path):
    """A folder that exists but cannot be written: one line naming the variable (it was
    "[Errno 13] Permission denied" from the temporary folder the build makes)."""
    prefix = _without_root_override(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o555)
    try:
        r = subprocess.run([*prefix, sys.executable, "-m", "edgert.cli", "bench", "--synthetic", "qwen2.5-0.5b"],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "EDGERT_SYNTHETIC_DIR": str(cache)})
        one_line(r, "EDGERT_SYNTHETIC_DIR", "not writable")
        assert list(cache.iterdir()) == []
    finally:
        cache.chmod(0o755)


# ---- 5. export --force onto a read-only artifact -------------------------------------------------------

def _without_root_override(tmp_path) -> list[str]:
    """A command prefix under which chmod binds: none for a user; for root, setpriv without
    CAP_DAC_OVERRIDE (skipped where that cannot be had)."""
    if os.geteuid() != 0:
        return []
    prefix = [shutil.which("setpriv") or "setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o555)
    try:
        r = subprocess.run([*prefix, "touch", str(probe / "x")], capture_output=True, timeout=30)
    except OSError:
        r = None
    probe.rmdir() if not (probe / "x").exists() else shutil.rmtree(probe)
    if r is None or r.returncode == 0:
        pytest.skip("root, and no setpriv to drop CAP_DAC_OVERRIDE: chmod does not bind")
    return prefix


def test_force_onto_a_read_only_artifact_is_refused(artifact, tmp_path):
    prefix = _without_root_override(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(artifact, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    out.chmod(0o555)
    try:
        r = subprocess.run([*prefix, sys.executable, "-m", "edgert.cli", "export", str(BUNDLED_STORIES), "-o", str(out),
                            "--bits", "8", "--force"], capture_output=True, text=True, timeout=120)
        one_line(r, "cannot be replaced")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert [p.name for p in tmp_path.iterdir()] == ["out"]           # no .out.old-PID, .out.partial-PID, lock
    finally:
        out.chmod(0o755)


def test_an_old_copy_that_cannot_be_removed_is_said(artifact, tmp_path, monkeypatch):
    """Past the permission check (an immutable file, say): the leftover is named, not kept silently."""
    from edgert_export import ExportError, export, outdir
    out = tmp_path / "out"
    shutil.copytree(artifact, out)
    rmtree = shutil.rmtree
    monkeypatch.setattr(outdir.shutil, "rmtree", lambda p, *a, **k: None if ".old-" in str(p) else rmtree(p, *a, **k))
    with pytest.raises(ExportError, match=r"old copy could not be removed: remove .*\.out\.old-\d+ by hand"):
        export(BUNDLED_STORIES, out, bits=8, force=True, progress=False)


# ---- 6. a FIFO, socket or folder as a text file; a pipe with a writer still reads ---------------------------

@pytest.mark.parametrize("kind", ["fifo", "socket", "folder"])
def test_text_files_that_are_not_files_end_in_one_line(tmp_path, kind):
    path = tmp_path / kind
    if kind == "fifo":          # nobody writes to it: opening it must not wait for a writer (it did, forever)
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
    else:
        path.mkdir()
    said = "empty" if kind == "fifo" else "cannot read it"
    out = tmp_path / "out"
    one_line(edgert("export", BUNDLED_STORIES, "-o", out, "--calib", path, timeout=20), said)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    one_line(edgert("eval", tmp_path / "nope", "--text", path, timeout=20), said)
    if kind == "fifo":                                               # a device is still read up to the cap
        one_line(edgert("eval", tmp_path / "nope", "--text", "/dev/zero"), "--text", "MB")


def test_a_pipe_with_a_writer_is_read(artifact):
    """`--text /dev/stdin` (or `<(cmd)`): a pipe, read to its end like a file."""
    text = "Once upon a time there was a little girl named Lily. She liked to play in the park with her dog.\n"
    r = subprocess.run([sys.executable, "-m", "edgert.cli", "eval", str(artifact), "--text", "/dev/stdin"],
                       input=text * 4, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "over 126 tokens" in r.stdout, r.stdout       # all of it
