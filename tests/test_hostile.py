"""Hostile inputs (issue 15): malformed or malicious artifacts, checkpoints, templates, tokenizers
and flags get one line on stderr, a non-zero exit, bounded time and memory, and leave nothing
behind; nothing outside the artifact is read.

Every case runs the real CLI in a subprocess. A seeded fuzz pass mutates manifests, graphs, data
files, tokenizer.json, chat templates, config.json and safetensors headers; then one test per
case listed in the issue. The runtime cases also run on onnxruntime 1.22 (EDGERT_ORT_PYTHON,
runtime only and no `tokenizers`, as on Termux) when it is set, and the fuzz pass and the
confinement cases on the newest onnxruntime installed alone (EDGERT_RUNTIME_PYTHON: onnxruntime,
numpy, jinja2, typer; .ci/run makes both).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

REASONING = ROOT / "export" / "data" / "reasoning-qwen2"
OLD = os.environ.get("EDGERT_ORT_PYTHON")
RUNTIME_ONLY = os.environ.get("EDGERT_RUNTIME_PYTHON")
PYTHONS = [pytest.param(sys.executable, id="current")] + [
    pytest.param(OLD or "", id="ort122", marks=pytest.mark.skipif(not OLD, reason="set EDGERT_ORT_PYTHON (.ci/run does)"))]
ALL_PYTHONS = PYTHONS + [pytest.param(RUNTIME_ONLY or "", id="runtime-only", marks=pytest.mark.skipif(
    not RUNTIME_ONLY, reason="set EDGERT_RUNTIME_PYTHON to a Python with only the runtime's dependencies (.ci/run does)"))]
SECONDS = 10            # CPU time of every case, start-up included (CPU, not wall: the test machine is shared)
WALL = 60               # wall time after which a case is killed (a hang that does not spin)
RSS_MB = 600            # the models are < 1 MB: this is onnxruntime + Python + the bound under test
SEED = 15


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    rss_mb: float
    cpu: float


# `python -m edgert.cli ARGS` that records its own peak RSS (VmHWM) at exit. wait4's ru_maxrss cannot
# be used: Linux starts a child's maxrss at the RSS its parent had when it forked (pytest's, with
# torch loaded: ~1 GB in a full run), whatever the child itself uses after exec.
_RUN_RECORDING_HWM = (
    "import atexit, os, runpy, sys\n"
    "def _hwm(path=os.environ.pop('EDGERT_TEST_HWM')):\n"
    "    with open('/proc/self/status') as f, open(path, 'w') as out:\n"
    "        out.write(next(line for line in f if line.startswith('VmHWM:')))\n"
    "atexit.register(_hwm)\n"
    "sys.argv[0] = 'edgert'\n"
    "runpy.run_module('edgert.cli', run_name='__main__')\n")


def cli(*args, python=sys.executable, stdin=None, env=None, cwd=None, timeout=WALL) -> Result:
    """The real CLI in a subprocess; its peak RSS (VmHWM at exit), CPU time from the kernel (wait4), wall time."""
    hwm = tempfile.NamedTemporaryFile(prefix="edgert-hwm-", delete=False)
    hwm.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "EDGERT_TEST_HWM": hwm.name, **(env or {})}
    t0 = time.monotonic()
    p = subprocess.Popen([python, "-c", _RUN_RECORDING_HWM, *map(str, args)], stdin=stdin if stdin is not None else
                         subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    killer = threading.Timer(timeout, p.kill)
    killer.start()
    out, err = [], []
    readers = [threading.Thread(target=lambda s, b: b.append(s.read()), args=(s, b)) for s, b in
               ((p.stdout, out), (p.stderr, err))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(p.pid, 0)
    for r in readers:
        r.join()
    killer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    try:                # a process killed before its exit handlers ran has no record: the kernel's figure then
        rss_mb = int(open(hwm.name).read().split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        rss_mb = usage.ru_maxrss / 1024
    finally:
        os.unlink(hwm.name)
    return Result(p.returncode, out[0].decode(errors="replace"), err[0].decode(errors="replace"),
                  time.monotonic() - t0, rss_mb, usage.ru_utime + usage.ru_stime)


def assert_bounded(r: Result, what: str = ""):
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, (what, r.stderr[-3000:])
    assert r.cpu < SECONDS and r.seconds < WALL, (what, r.cpu, r.seconds, r.stderr[-500:])
    assert r.rss_mb < RSS_MB, (what, r.rss_mb)


def assert_one_line(r: Result, *fragments, what: str = "") -> str:
    assert_bounded(r, what)
    assert r.rc not in (0, -9), (what, r.rc, r.stderr[-500:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgert: error: "), (what, r.stderr[-2000:])
    for f in fragments:
        assert f in lines[0], (what, lines[0])
    return lines[0]


def listing(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---- the artifact every runtime case starts from ---------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """reasoning-qwen2 at int4 (round to nearest, quick): a chat template, a byte-level BPE
    with a Split pre-tokenizer, a default graph and its nibbles twin."""
    from edgert_export import export
    out = tmp_path_factory.mktemp("base") / "art"
    from edgert.chat import load_chat_template
    export(REASONING, out, bits=4, recipe="rtn", progress=False)
    (out / "chat_template.jinja").write_text(load_chat_template(out))     # as a file of its own (it wins)
    return out


def clone(base: Path, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    dst = where / "art"
    shutil.copytree(base, dst)
    return dst


def rehash(art: Path, name: str) -> None:
    """Make the manifest agree with a file again (so the case tests more than the size check)."""
    m = json.loads((art / "edgert.json").read_text())
    data = (art / name).read_bytes()
    m["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if "manifest_sha256" in m:
        from edgert.artifact import manifest_sha256
        m["manifest_sha256"] = manifest_sha256(m)
    (art / "edgert.json").write_text(json.dumps(m))


# ---- mutations ------------------------------------------------------------------------------------

HOSTILE_VALUES = [None, "2", -1, 0, 2 ** 63, 1e308, float("nan"), True, [], {}, [[[[1]]]], "../x.onnx",
                  "/etc/passwd", "a" * 10000]


def json_paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from json_paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):
            yield from json_paths(v, path + (i,))


def mutate_json(obj, rng: random.Random):
    """One hostile change at a random place (a top-level section first, then a place in it): a
    key removed, or a value replaced by a wrong type, an impossible number or a path."""
    obj = copy.deepcopy(obj)
    section = rng.choice(list(obj))
    paths = [p for p in json_paths(obj) if p and p[0] == section]
    path = rng.choice(paths)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if rng.random() < 0.3 and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(HOSTILE_VALUES)
    return obj, "/".join(map(str, path))


def dump(obj) -> str:
    return json.dumps(obj, allow_nan=True)


def deep_json(depth=100_000) -> str:
    return "[" * depth + "]" * depth


# ---- 1. the seeded fuzz pass ---------------------------------------------------------------------

def runtime_cases(base: Path, rng: random.Random, tmp: Path) -> list:
    """(label, artifact, extra args): mutated copies of `base`."""
    cases = []
    manifest = json.loads((base / "edgert.json").read_text())
    n = 0

    def new(label):
        nonlocal n
        n += 1
        return clone(base, tmp / f"c{n}"), f"{label}#{n}"

    for _ in range(8):                                     # manifests
        art, label = new("manifest")
        mutated, where = mutate_json(manifest, rng)
        (art / "edgert.json").write_text(dump(mutated))
        cases.append((f"{label} {where}", art))
    for text in (deep_json(), "\x00" * 100, json.dumps([manifest])):
        art, label = new("manifest-raw")
        (art / "edgert.json").write_text(text)
        cases.append((label, art))
    for _ in range(4):                                     # graphs: byte flips / truncation / garbage
        art, label = new("graph")
        g = art / rng.choice(["model.onnx", "model.nibbles.onnx"])
        data = bytearray(g.read_bytes())
        kind = rng.choice(["flip", "truncate", "garbage"])
        if kind == "flip":
            for _ in range(8):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == "truncate":
            data = data[: rng.randrange(1, len(data))]
        else:
            data = bytearray(rng.randbytes(len(data)))
        g.write_bytes(bytes(data))
        rehash(art, g.name)
        cases.append((f"{label} {kind} {g.name}", art))
    for kind in ("truncate", "extend", "flip"):            # the data file
        art, label = new("data")
        d = art / "model.onnx.data"
        data = bytearray(d.read_bytes())
        if kind == "truncate":
            data = data[: len(data) // 3]
        elif kind == "extend":
            data += b"\0" * 100_000
        else:
            data[rng.randrange(len(data))] ^= 0xFF
        d.write_bytes(bytes(data))
        if kind != "flip":
            rehash(art, d.name) if rng.random() < 0.5 else None
        cases.append((f"{label} {kind}", art))
    tok = json.loads((base / "tokenizer.json").read_text())
    for _ in range(5):                                     # tokenizer.json
        art, label = new("tokenizer")
        mutated, where = mutate_json({k: tok[k] for k in ("model", "pre_tokenizer", "normalizer", "decoder",
                                                          "post_processor", "added_tokens") if k in tok}, rng)
        (art / "tokenizer.json").write_text(dump({**tok, **mutated}))
        cases.append((f"{label} {where}", art))
    for text in (deep_json(),):
        art, label = new("tokenizer-raw")
        (art / "tokenizer.json").write_text(text)
        cases.append((label, art))
    for text in (deep_json(), "[1, 2]", json.dumps({"bos_token": [[]], "chat_template": 5})):
        art, label = new("tokenizer-config")
        (art / "tokenizer_config.json").write_text(text)
        cases.append((label, art))
    lines = (base / "chat_template.jinja").read_text().splitlines(keepends=True)
    for _ in range(3):                                     # the real chat template with a hostile part inside
        art, label = new("template")
        at, snippet = rng.randrange(len(lines) + 1), rng.choice(TEMPLATES)
        (art / "chat_template.jinja").write_text("".join(lines[:at]) + snippet + "".join(lines[at:]))
        cases.append((f"{label} {snippet[:40]}", art))
    return cases


TEMPLATES = [
    "{{ 'a' * 10**8 }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{{ ('x\n' * 1000)|indent(1000000) }}",
    "{{ 'a'|center(100000000) }}",
    "{{ ([1] * 100000000)|length }}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
    "{{ range(10**12)|list }}",
    "{{ 2.0 ** 100000 }}",
    "{{ '%100000000s'|format('a') }}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(100) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ('{0}' * 100000).format('a' * 1000000) }}",
]


def run_all(jobs, workers=2):
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: job(), jobs))


@pytest.mark.parametrize("python", ALL_PYTHONS)
def test_fuzz_runtime(base, tmp_path, python):
    """Mutated artifacts through `run` and `verify`: failures are one line; nothing may succeed by
    reading outside the folder; nothing is left behind."""
    rng = random.Random(SEED)
    cases = runtime_cases(base, rng, tmp_path)
    before = {label: listing(art.parent) for label, art in cases}

    def job(label, art, command):
        args = ["run", art, "What is 2+3?", "--max-tokens", "4"] if command == "run" else ["verify", art]
        both = "tokenizer" in label and python == sys.executable and command == "run"
        env = {"EDGERT_TOKENIZER": "python" if int(label.split("#")[1].split()[0]) % 2 else "tokenizers"} if both else {}
        return label, command, art, cli(*args, python=python, env=env)
    jobs = [lambda c=c, cmd=cmd: job(*c, cmd) for c in cases for cmd in ("run", "verify")
            if not (cmd == "verify" and c[0].startswith(("template", "tokenizer")))]
    failed = 0
    for label, command, art, r in run_all(jobs):
        assert_bounded(r, f"{command} {label}")
        if r.rc != 0:
            assert_one_line(r, what=f"{command} {label}")
            failed += 1
        assert listing(art.parent) == before[label], (label, listing(art.parent) ^ before[label])
    assert failed >= len(jobs) * 0.6, failed        # most mutations must be refused, not shrugged off


def export_cases(rng: random.Random, tmp: Path) -> list:
    """(label, model folder): mutated copies of the reasoning-qwen2 checkpoint."""
    cases, cfg = [], json.loads((REASONING / "config.json").read_text())
    for i in range(10):
        src = tmp / f"cfg{i}"
        shutil.copytree(REASONING, src)
        mutated, where = mutate_json(cfg, rng)
        (src / "config.json").write_text(dump(mutated))
        cases.append((f"config {where}", src))
    for i in range(8):
        src = tmp / f"st{i}"
        shutil.copytree(REASONING, src)
        f = src / "model.safetensors"
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        name = rng.choice([k for k in header if k != "__metadata__"])
        kind = rng.choice(["offsets", "shape", "dtype", "length", "overlap", "garbage"])
        body = data[8 + n:]
        if kind == "offsets":
            header[name]["data_offsets"] = rng.choice([[-64, 0], [0, 2 ** 62], [10, 5], ["0", "1"], [0]])
        elif kind == "shape":
            header[name]["shape"] = rng.choice([[2 ** 40, 2 ** 40], [-1], ["128"], [0], [3, 3, 3, 3, 3, 3, 3, 3, 3]])
        elif kind == "dtype":
            header[name]["dtype"] = rng.choice(["I64", "BOOL", "Q4", None])
        elif kind == "overlap":
            other = rng.choice([k for k in header if k not in ("__metadata__", name)])
            size = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            start = header[other]["data_offsets"][0] + 1
            header[name]["data_offsets"] = [start, start + size]
        text = json.dumps(header).encode() if kind != "garbage" else rng.randbytes(n)
        length = len(text) if kind != "length" else rng.choice([0, 2 ** 63, len(data) * 2])
        f.write_bytes(struct.pack("<Q", length) + text + body)
        cases.append((f"safetensors {kind} {name}", src))
    return cases


def test_fuzz_export(tmp_path):
    rng = random.Random(SEED)
    cases = export_cases(rng, tmp_path / "src")
    outs = tmp_path / "outs"
    outs.mkdir()

    def job(i, label, src):
        return label, i, cli("export", src, "-o", outs / f"o{i}", "--recipe", "rtn")
    failed = 0
    for label, i, r in run_all([lambda i=i, c=c: job(i, *c) for i, c in enumerate(cases)]):
        assert_bounded(r, label)
        if r.rc != 0:
            assert_one_line(r, what=label)
            assert not any(p.name.startswith((f"o{i}", f".o{i}.")) for p in outs.iterdir()), label
            failed += 1
    assert failed >= len(cases) * 0.7, failed


# ---- 2. one test per case in the issue ---------------------------------------------------------------

@pytest.fixture
def art(base, tmp_path) -> Path:
    return clone(base, tmp_path)


def edit_manifest(art: Path, fn):
    m = json.loads((art / "edgert.json").read_text())
    fn(m)
    (art / "edgert.json").write_text(json.dumps(m))


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("change", [
    lambda m: (m.pop("model"), m.pop("special_tokens")), lambda m: (m["model"].pop("layers"), m.pop("files")),
    lambda m: m.pop("context_length"), lambda m: m["model"].__setitem__("layers", "2"),
    lambda m: m.__setitem__("context_length", None), lambda m: m.__setitem__("files", list(m["files"])),
    lambda m: m["special_tokens"].__setitem__("eos", 507), lambda m: m["model"].__setitem__("kv_heads", 3),
], ids=["no-model-special", "no-layers-files", "no-context", "layers-str", "context-null", "files-list", "eos-int",
        "kv-not-dividing"])
def test_manifest_schema(art, change, python):
    edit_manifest(art, change)
    for command in ("run", "verify"):
        args = ["run", art, "hi"] if command == "run" else ["verify", art]
        assert_one_line(cli(*args, python=python), "edgert.json", what=command)


def test_manifest_deeply_nested(art):
    (art / "edgert.json").write_text(deep_json())
    assert_one_line(cli("verify", art), "corrupt manifest")


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_graph_path_outside(art, base, where, python):
    target = str(base / "model.onnx") if where == "absolute" else "../../x/model.onnx"
    edit_manifest(art, lambda m: m["graphs"].__setitem__("default", target))
    for args in (["run", art, "hi"], ["verify", art]):
        assert_one_line(cli(*args, python=python), "graphs")


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.json", "chat_template.jinja", "model.onnx.data"])
def test_symlink_out_of_folder_refused(art, base, tmp_path, name, python):
    """A foreign file linked in (here the same model's, so it would even run) is refused."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copyfile(base / name, foreign / name)
    (art / name).unlink()
    (art / name).symlink_to(foreign / name)
    for args in (["run", art, "hi", "--max-tokens", "2"], ["verify", art]):
        assert_one_line(cli(*args, python=python), "symbolic link out of the artifact", what=str(args))


def test_symlink_inside_folder_allowed(art):
    (art / "model.onnx.data").rename(art / "weights.bin")
    (art / "model.onnx.data").symlink_to("weights.bin")
    r = cli("verify", art)
    assert r.rc == 0, r.stderr


def _relocate(art: Path, location: str):
    """Point every external tensor of model.onnx at `location` (manifest updated to match)."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, str(art / "model.onnx"))
    rehash(art, "model.onnx")


@pytest.mark.parametrize("python", ALL_PYTHONS)
@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlinked-dir"])
def test_external_data_outside_folder(art, base, tmp_path, where, python):
    """onnxruntime 1.22.1 loads weights from any location a graph names; edgert checks them itself."""
    if where == "absolute":
        location = str(base / "model.onnx.data")
    elif where == "dotdot":
        location = os.path.relpath(base / "model.onnx.data", art)
    else:
        (art / "w").symlink_to(base, target_is_directory=True)
        location = "w/model.onnx.data"
    _relocate(art, location)
    for args in (["run", art, "hi", "--max-tokens", "2"], ["verify", art]):
        assert_one_line(cli(*args, python=python), "not one of the artifact's data files", what=str(args))


def test_current_onnxruntime_refuses_outside_locations_itself(art, base):
    """Newer onnxruntime (1.32 here) refuses an absolute location on its own; edgert keeps its own
    check for 1.22 (above), which does not."""
    ort = pytest.importorskip("onnxruntime")
    if tuple(int(p) for p in ort.__version__.split(".")[:2]) < (1, 23):
        pytest.skip(f"onnxruntime {ort.__version__} follows outside locations")
    _relocate(art, str(base / "model.onnx.data"))
    with pytest.raises(Exception, match="(?i)external|outside|location|path"):
        ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("manifest_says", ["old size", "1 TB"])
def test_verify_sparse_terabyte(art, manifest_says):
    data = art / "model.onnx.data"
    os.truncate(data, 1 << 40)
    if manifest_says == "1 TB":
        edit_manifest(art, lambda m: m["files"]["model.onnx.data"].__setitem__("bytes", 1 << 40))
    for args in (["verify", art], ["run", art, "hi"]):
        text = assert_one_line(cli(*args), "model.onnx.data", what=str(args))
        assert "edgert verify" in text or args[0] == "verify"


def test_run_data_size_mismatch_says_verify(art):
    with open(art / "model.onnx.data", "ab") as f:
        f.write(b"\0" * 10)
    assert_one_line(cli("run", art, "hi"), "manifest says", "edgert verify")


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("template", TEMPLATES, ids=range(len(TEMPLATES)))
def test_chat_template_bounded(art, template, python):
    (art / "chat_template.jinja").write_text(template)
    assert_one_line(cli("run", art, "hi", "--max-tokens", "2", python=python), "chat template", what=template)


def test_chat_template_bound_is_per_render():
    """Concurrent renders (a server's threads) each get their own bound: a slow template stopped
    at its limit leaves a normal render beside it untouched."""
    from edgert.chat import TemplateLimits, render_chat
    slow = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    ok = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    results = {}

    def render(name, template, limits):
        try:
            results[name] = render_chat(template, [{"role": "user", "content": "hi"}], limits=limits)
        except ValueError as e:
            results[name] = e
    threads = [threading.Thread(target=render, args=("slow", slow, TemplateLimits(seconds=1.0)))]
    threads += [threading.Thread(target=render, args=(f"ok{i}", ok, None)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert isinstance(results["slow"], ValueError), results["slow"]
    assert "1 s" in str(results["slow"]) or "steps" in str(results["slow"]), results["slow"]
    assert all(results[f"ok{i}"] == "<user>hi" for i in range(4))


@pytest.mark.parametrize("python", ALL_PYTHONS)
@pytest.mark.parametrize("backend", ["python", "tokenizers"])
@pytest.mark.parametrize("pattern", ["(a|aa)+$", "(a+)+$"])
def test_catastrophic_pre_tokenizer(art, backend, pattern, python):
    if backend == "tokenizers" and python != sys.executable:
        pytest.skip("no tokenizers in a runtime-only install (as on Termux)")
    pytest.importorskip("tokenizers") if backend == "tokenizers" else None
    tok = json.loads((art / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {"Regex": pattern}
    (art / "tokenizer.json").write_text(json.dumps(tok))
    r = cli("run", art, "a" * 80 + "!", "--raw", "--max-tokens", "2", python=python,
            env={"EDGERT_TOKENIZER": backend})
    assert_one_line(r, what=f"{backend} {pattern}")


def test_catastrophic_pattern_refused_in_a_thread_without_regex():
    """Without the `regex` module and off the main thread (no timer signal) nested quantifiers are
    refused when the tokenizer is read."""
    from edgert.tokenizer import _nested_repeat
    assert _nested_repeat("(a+)+$") and _nested_repeat(r"(\w+\s?)*$") and _nested_repeat("(.*a){20}")
    qwen2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    assert not _nested_repeat(qwen2) and not _nested_repeat(r"\p{N}{1,3}")


# -- safe writes -----------------------------------------------------------------------------------

def test_demo_out_refuses_user_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert_one_line(cli("demo", "--out", out, "--max-tokens", "2"), "not an edgert artifact")
    assert (out / "thesis.tex").read_text() == "years of work" and listing(out) == {"thesis.tex"}


def test_export_onto_source_refused(tmp_path):
    src = tmp_path / "model"
    shutil.copytree(REASONING, src)
    before = listing(src)
    for out in (src, tmp_path):
        assert_one_line(cli("export", src, "-o", out, "--force", "--recipe", "rtn"), "source")
    assert listing(src) == before


def test_export_replaces_an_artifact_with_force(base, tmp_path):
    out = clone(base, tmp_path)
    assert_one_line(cli("export", REASONING, "-o", out, "--recipe", "rtn"), "--force")
    r = cli("export", REASONING, "-o", out, "--recipe", "rtn", "--bits", "8", "--force")
    assert r.rc == 0, r.stderr
    assert json.loads((out / "edgert.json").read_text())["quantization"]["mlp"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_folder_created_at_out_during_export_is_kept(tmp_path, monkeypatch):
    from edgert_export import ExportError, export
    from edgert_export.decoder import Decoder
    out = tmp_path / "out"
    real = Decoder.build

    def build(self, *a, **k):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return real(self, *a, **k)
    monkeypatch.setattr(Decoder, "build", build)
    with pytest.raises(ExportError, match="not an edgert artifact"):
        export(REASONING, out, recipe="rtn", progress=False)
    assert listing(tmp_path) == {"out", "out/notes.txt"}


def test_concurrent_exports_to_one_out(tmp_path):
    """Two exports to the same new OUT: one wins, the other is refused; nothing else is left."""
    out = tmp_path / "out"
    results = run_all([lambda: cli("export", REASONING, "-o", out, "--recipe", "rtn") for _ in range(2)])
    assert sorted(r.rc for r in results) == [0, 1], [r.stderr for r in results]
    loser = next(r for r in results if r.rc)
    assert "another export is writing" in loser.stderr or "already exists" in loser.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_refused_while_locked(tmp_path):
    from edgert_export.outdir import _Lock
    out = tmp_path / "out"
    lock = _Lock(out)
    lock.acquire()
    try:
        assert_one_line(cli("export", REASONING, "-o", out, "--recipe", "rtn"), "another export is writing")
    finally:
        lock.release()
    assert list(tmp_path.iterdir()) == []


def test_sigterm_cleans_up_and_stale_partials_are_removed(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "edgert.cli", "export", REASONING, "-o", out], env=env,
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not any(q.name.startswith(".out.partial-") for q in tmp_path.iterdir()):   # the export has begun
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1].decode()
    assert p.returncode != 0 and "Traceback" not in err and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []
    # a SIGKILLed export's folder (a pid that is gone) is removed by the next export to OUT
    stale = tmp_path / f".out.partial-{dead_pid()}"
    stale.mkdir()
    (stale / "model.onnx.data").write_bytes(b"\0" * 1000)
    r = cli("export", REASONING, "-o", out, "--recipe", "rtn")
    assert r.rc == 0, r.stderr
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out"]


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# -- resources before refusal ------------------------------------------------------------------------

def test_huge_hidden_size_refused_before_allocating(tmp_path):
    src = tmp_path / "model"
    shutil.copytree(REASONING, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_size"] = 32768
    (src / "config.json").write_text(json.dumps(cfg))
    r = cli("export", src, "-o", tmp_path / "out")
    assert_one_line(r, "shape")
    assert r.rss_mb < 300, r.rss_mb


def test_endless_inputs_are_capped(art, tmp_path):
    with open("/dev/zero", "rb") as zero:
        assert_one_line(cli("run", art, stdin=zero), "stdin", "MB")
    assert_one_line(cli("eval", art, "--text", "/dev/zero"), "--text", "MB")
    assert_one_line(cli("export", REASONING, "-o", tmp_path / "o", "--calib", "/dev/zero"), "--calib", "MB")
    assert not (tmp_path / "o").exists()


def test_long_prompt_refused_before_tokenizing(art, tmp_path):
    big = tmp_path / "prompt.txt"
    big.write_text("word " * 2_000_000)           # 10 MB
    with open(big, "rb") as f:
        r = cli("run", art, stdin=f)
    assert_one_line(r, "characters", "context")
    assert r.rss_mb < 300, r.rss_mb


@pytest.mark.parametrize("python", PYTHONS)
def test_threads_capped_by_cores(art, python):
    assert_one_line(cli("run", art, "hi", "--threads", "10000", python=python), "--threads", "CPU cores")


# -- silent nonsense and hostile checkpoints ---------------------------------------------------------

def _checkpoint(tmp_path, config=None, generation=None, tensors=None, index=None) -> Path:
    src = tmp_path / "model"
    shutil.copytree(REASONING, src)
    if config:
        cfg = json.loads((src / "config.json").read_text())
        config(cfg)
        (src / "config.json").write_text(json.dumps(cfg))
    if generation:
        gen = json.loads((src / "generation_config.json").read_text())
        generation(gen)
        (src / "generation_config.json").write_text(json.dumps(gen))
    if tensors:
        f = src / "model.safetensors"
        data = bytearray(f.read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        body = tensors(header, data, 8 + n)
        text = json.dumps(header).encode()
        f.write_bytes(struct.pack("<Q", len(text)) + text + bytes(body if body is not None else data[8 + n:]))
    if index:
        index(src)
    return src


def _nan(header, data, start):
    t = header["model.layers.1.self_attn.q_proj.weight"]
    data[start + t["data_offsets"][0]: start + t["data_offsets"][0] + 2] = b"\xc0\x7f"      # bf16 NaN
    return data[start:]


def _inf(header, data, start):
    t = header["model.norm.weight"]
    data[start + t["data_offsets"][0]: start + t["data_offsets"][0] + 2] = b"\x80\x7f"      # bf16 +Inf
    return data[start:]


def _overlap(header, data, start):
    a, b = header["model.norm.weight"]["data_offsets"]
    e0 = header["model.embed_tokens.weight"]["data_offsets"][0]
    header["model.norm.weight"]["data_offsets"] = [e0 + 2, e0 + 2 + b - a]


def _before_data(header, data, start):
    a, b = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = [-64, b - a - 64]        # into the header


def _escaping_shard(src):
    (src / "model.safetensors").rename(src.parent / "x.safetensors")
    names = json.loads((src.parent / "x.safetensors").read_bytes()[8:8 + struct.unpack(
        "<Q", (src.parent / "x.safetensors").read_bytes()[:8])[0]])
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "../x.safetensors" for k in names if k != "__metadata__"}}))


def _dtype(header, data, start):
    header["model.layers.0.mlp.up_proj.weight"]["dtype"] = "I16"


def _shape(header, data, start):
    t = header["model.layers.0.mlp.up_proj.weight"]
    t["shape"] = list(reversed(t["shape"]))


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


@pytest.mark.parametrize("case", [
    dict(config=_set("eos_token_id", "507"), want="eos_token_id"),
    dict(generation=_set("eos_token_id", "507"), want="eos_token_id"),
    dict(config=_set("rope_theta", 0), want="rope_theta"),
    dict(config=lambda c: c.__setitem__("rope_parameters", {"rope_type": "default", "rope_theta": -1}), want="rope_theta"),
    dict(tensors=_nan, want="NaN"),
    dict(tensors=_inf, want="NaN or infinite"),
    dict(tensors=_overlap, want="overlap"),
    dict(tensors=_before_data, want="data_offsets"),
    dict(index=_escaping_shard, want="not a plain file name"),
    dict(config=_set("num_attention_heads", 0), want="num_attention_heads"),
    dict(config=_set("num_key_value_heads", 3), want="num_key_value_heads"),
    dict(config=_set("hidden_size", "128"), want="hidden_size"),
    dict(config=_set("vocab_size", -512), want="vocab_size"),
    dict(config=_set("vocab_size", 10 ** 12), want="vocab_size"),
    dict(config=_set("max_position_embeddings", None), want="max_position_embeddings"),
    dict(config=_set("rope_scaling", "linear"), want="rope_scaling"),
    dict(config=_set("rope_parameters", [10000.0]), want="rope_parameters"),
    dict(config=_set("num_hidden_layers", 40), want="layer"),
    dict(tensors=_dtype, want="dtype"),
    dict(tensors=_shape, want="shape"),
], ids=["eos-str", "gen-eos-str", "theta-0", "theta-neg", "nan", "inf", "overlap", "before-data", "shard-escape",
        "heads-0", "kv-not-dividing", "hidden-str", "vocab-neg", "vocab-huge", "positions-null", "rope-str",
        "rope-list", "layers-missing", "dtype", "shape"])
def test_hostile_checkpoint(tmp_path, case):
    want = case.pop("want")
    src = _checkpoint(tmp_path, **case)
    out = tmp_path / "out"
    assert_one_line(cli("export", src, "-o", out), want)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_verify_never_hashes_holes(art, monkeypatch):
    """A data file that is mostly holes is refused before hashing, even when everything else agrees."""
    from edgert import artifact
    size = 256 << 20
    os.truncate(art / "model.onnx.data", size)
    edit_manifest(art, lambda m: m["files"]["model.onnx.data"].__setitem__("bytes", size))
    monkeypatch.setattr(artifact, "DATA_SLACK", size)          # let it past the tail check
    t0 = time.monotonic()
    with pytest.raises(artifact.ArtifactError, match="mostly holes"):
        artifact.verify(art)
    assert time.monotonic() - t0 < 2


def test_lock_without_flock(tmp_path, monkeypatch):
    """Storage without flock (some Android mounts): the lock file is created exclusively with the
    owner's pid; a live owner blocks a second export, a dead one's file is taken over."""
    import errno
    import fcntl
    from edgert_export.outdir import OutError, _Lock

    def no_flock(*a):
        raise OSError(errno.ENOSYS, "flock not supported")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "out"
    first = _Lock(out)
    first.acquire()
    with pytest.raises(OutError, match="another export is writing"):
        _Lock(out).acquire()
    first.release()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / ".out.lock").write_text(f"{dead_pid()}\n")
    taken = _Lock(out)
    taken.acquire()
    assert (tmp_path / ".out.lock").read_text().strip() == str(os.getpid())
    taken.release()


# -- the 2026-12-04 audit: flags, closed and full streams, outputs, edited manifests -----------------

def test_run_flags_and_streams_the_audit_found(base, tmp_path):
    """Each of these once gave a traceback or a wrong answer; now one line (or a correct run)."""
    for args, fragment in [(("--temperature", "inf"), "finite"), (("--temperature", "nan"), "--temperature"),
                           (("--seed", "-1"), "--seed")]:
        r = cli("run", base, "1+1", "--max-tokens", "2", *args)
        assert_bounded(r, args)
        assert r.rc == 2 and fragment in r.stderr, (args, r.stderr)           # typer's usage error
    r = cli("run", base, "1+1", "--max-tokens", "3", "--top-p", "0", "--temperature", "1", "--seed", "1")
    assert_bounded(r)
    assert r.rc == 0 and r.stdout.strip()                                     # top-p 0: the likeliest token
    assert_one_line(cli("run", base, "1+1", "--draft", tmp_path / "nope"), "no such")
    bad = subprocess.run([sys.executable, "-m", "edgert.cli", "run", str(base), b"1+\xff1"], capture_output=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=WALL)
    assert bad.returncode == 1 and b"not valid UTF-8" in bad.stderr and b"Traceback" not in bad.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for out in ("--json", None):                   # a full disk on stdout: one line, exit 1
        with open("/dev/full", "w") as full:
            p = subprocess.run([sys.executable, "-m", "edgert.cli", "run", str(base), "1+1", "--max-tokens", "2",
                                *([out] if out else [])], stdout=full, stderr=subprocess.PIPE, env=env, timeout=WALL)
        lines = p.stderr.decode().strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("edgert: error:"), p.stderr
    closed = subprocess.run(f"{sys.executable} -m edgert.cli run {base} <&-", shell=True, capture_output=True,
                            env=env, timeout=WALL)
    assert closed.returncode == 1 and b"prompt is empty" in closed.stderr and b"Traceback" not in closed.stderr
    closed = subprocess.run(f"{sys.executable} -m edgert.cli run {base} 1+1 --max-tokens 2 >&-", shell=True,
                            capture_output=True, env=env, timeout=WALL)
    assert closed.returncode == 0 and b"Traceback" not in closed.stderr


def test_bench_json_target_checked_before_the_run_and_defaults_fit_small_contexts(tmp_path):
    from edgert_export import export
    small = tmp_path / "c64"
    export(ROOT / "export" / "data" / "stories260K", small, bits=4, recipe="rtn", context=64, progress=False)
    for target, fragment in [(tmp_path, "not a file"), (tmp_path / "no" / "x.json", "cannot write there")]:
        r = assert_one_line(cli("bench", small, "--json", target), fragment)
    r = cli("bench", small, "--repeat", "1", "--prompt-tokens", "8", "--gen-tokens", "4", "--json", tmp_path / "b.json")
    assert "Traceback" not in r.stderr     # (a real run: its bandwidth probe's buffers are not the bound under test)
    assert r.rc == 0 and json.loads((tmp_path / "b.json").read_text())["gen_tokens"] == 4, r.stderr
    assert_one_line(cli("bench", small, "--prompt-tokens", "600"), "do not fit", "64-token")
    r = cli("export", ROOT / "export" / "data" / "stories260K", "-o", tmp_path / "c1", "--context", "1")
    assert r.rc == 2 and not (tmp_path / "c1").exists()
    # eval against a reference of a shorter context: the default window is the shorter of the two
    r = cli("eval", base_of(tmp_path), "--reference", small, "--json")
    assert "Traceback" not in r.stderr
    assert r.rc == 0 and json.loads(r.stdout)["window"] == 64, r.stderr


def base_of(tmp_path: Path) -> Path:
    """stories260K at int4, its full 512-token context (the reference of the eval case above)."""
    from edgert_export import export
    out = tmp_path / "s512"
    export(ROOT / "export" / "data" / "stories260K", out, bits=4, recipe="rtn", progress=False)
    return out


@pytest.fixture(scope="module")
def fp16_cache(tmp_path_factory) -> Path:
    """reasoning-qwen2 with an fp16 KV cache: its cache inputs have the names an fp32 cache's have."""
    from edgert_export import export
    out = tmp_path_factory.mktemp("fp16") / "art"
    export(REASONING, out, bits=4, recipe="rtn", progress=False, kv_cache="fp16")
    return out


@pytest.mark.parametrize("change,fragment", [
    (lambda m: m["quantization"].__setitem__("kv_cache", "fp32"), "needs input past_key_values.0.key of tensor(float)"),
    (lambda m: m["model"].__setitem__("layers", m["model"]["layers"] - 1), "the graph also takes"),
], ids=["kv-cache", "fewer-layers"])
def test_a_manifest_edited_against_its_graph_is_one_line(fp16_cache, tmp_path, change, fragment):
    """Each once reached onnxruntime, which printed its own coloured log before edgert's line. (An
    fp16 cache called fp32 keeps its inputs' names: only their type tells.)"""
    art = clone(fp16_cache, tmp_path)
    edit_manifest(art, change)
    assert_one_line(cli("run", art, "What is 9*9+9?"), fragment)


def test_token_ids_outside_the_vocabulary_are_refused_before_onnxruntime(base):
    """A tokenizer that does not belong to the model yields ids past its vocabulary: one line from
    the forward itself (onnxruntime's Gather would print its own log first), for any caller."""
    import numpy as np
    import edgert
    from edgert.model import RunError
    llm = edgert.load(base, threads=1)
    for bad in (llm.model.vocab, -1):
        with pytest.raises(RunError, match="outside the model's vocabulary"):
            llm.model.run(0, np.array([[1, bad]]), np.array([0]))
    assert llm.model.run(0, np.array([[1, 2]]), np.array([0])).shape[-1] == llm.model.vocab


def test_speculation_that_cannot_apply_says_so(base):
    r = cli("run", base, "1+1", "--max-tokens", "3", "--speculate", "ngram", "--temperature", "0.7", "--seed", "1")
    assert_bounded(r)
    assert r.rc == 0 and "speculation verifies greedy decoding only; sampling is on" in r.stderr
    r = cli("run", base, "1+1", "--max-tokens", "3", "--speculate", "ngram", "--temperature", "0")
    assert r.rc == 0 and "speculation verifies" not in r.stderr


def test_piped_chat_exits_1_when_a_line_failed(base, tmp_path):
    r = cli("chat", base, "--max-tokens", "2", stdin=open(_write(tmp_path / "in.txt", "/load nothing.json\n1+1\n")))
    assert_bounded(r)
    assert r.rc == 1 and "cannot read" in r.stderr
    r = cli("chat", base, "--max-tokens", "2", stdin=open(_write(tmp_path / "ok.txt", "1+1\n")))
    assert r.rc == 0, r.stderr


def test_demo_never_runs_another_artifact(base, tmp_path):
    assert_one_line(cli("demo", "--out", base, "--max-tokens", "2", "--bits", "8"), "another artifact")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
