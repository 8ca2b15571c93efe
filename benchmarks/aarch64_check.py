"""Does the runtime give the same tokens on aarch64 (Raspberry Pi) as on this x86-64 machine?

    python benchmarks/aarch64_check.py [--work /work/scratch/aarch64] [--json OUT]
           [--ort 1.22.1,1.32.0] [--machines pi5,pi4,max] [--max-tokens 40] [--prompt "Once upon a time"]

No ARM hardware is needed: the runtime runs under QEMU user emulation (qemu-aarch64-static) in
a Debian bookworm arm64 userland, with onnxruntime/numpy/jinja2/typer from PyPI's aarch64 wheels.
Everything is set up once and cached in --work (delete a folder there to rebuild it):

  root/                      debootstrap --foreign --arch=arm64 --variant=minbase --include=python3
                             bookworm, its .debs unpacked with dpkg-deb -x (no second stage needed)
  machines/<name>/           that root seen through symlinks + a fake /proc/cpuinfo and
                             /sys/devices/system/cpu/{possible,present,online} of the emulated board
                             (qemu -L looks there first; onnxruntime >= 1.32 segfaults on the host's
                             x86 cpuinfo)
  site-ort<V>/               the aarch64 wheels of onnxruntime==V + numpy + jinja2 + typer and their
                             dependencies, unzipped into one folder (PYTHONPATH); no `tokenizers`,
                             so the runtime uses its pure-Python tokenizer (and stdlib `re`, no `regex`)
  host-ort<V>/               an x86-64 venv with onnxruntime==V when the host's onnxruntime is another
  ckpt/, art/                checkpoints and artifacts exported on the host with edgert_export
  runs/                      per-run logits (.npz) and results

Machines (qemu -cpu model + /proc/cpuinfo):
  pi5  cortex-a76, Raspberry Pi 5 cpuinfo (implementer 0x41, part 0xd0b, asimd + asimddp), 4 CPUs
  pi4  cortex-a72, Raspberry Pi 4 cpuinfo (part 0xd08, asimd, no dot product), 4 CPUs
  max  qemu's `-cpu max` (SVE, i8mm, bf16 ...) with the Pi 5 cpuinfo: the recipe of
       shared/notes/aarch64-emulation.md; onnxruntime picks its ISA from the auxv HWCAPs, so this
       exercises kernels a Pi never runs
A cpuinfo that claims more than the emulated CPU has makes onnxruntime die of SIGILL (asimddp on
cortex-a72), so each machine gets the cpuinfo of its own CPU.

Artifacts (exported on the host): the bundled stories260K at bits 32, 8, 4, and 4 with fp32 or int4
embeddings/lm_head ("4e32", "4e4": no 8-bit tensor at all) or an int8 KV cache ("4kv8"), and a tiny random Qwen3-MoE (16 experts, top-2; built with
tests/conftest.py's make_checkpoint) at 4, 4e32 and 4kv8. MoE artifacts hold model.qmoe.onnx and
model.plain.onnx: the runtime picks plain below onnxruntime 1.23, qmoe from 1.23 on; on >= 1.23
plain is also run, forced.

Each run: `edgert.load(art, tokenizer="python", context=128, threads=1)`, then greedy
`generate(prompt, raw=True, max_tokens=N, temperature=0, ignore_eos=True)`, logits recorded at
each step. Each run is compared with
  twin = the x86-64 run with the same onnxruntime version and the same graph (strategy), and
  ref  = the x86-64 run with the newest onnxruntime of --ort and the default graph.
identical = same prompt ids and generated ids as both. max|dlogit| compares the logits along the
twin's tokens (rows of the twin itself for x86-64; when the tokens diverge the run is repeated
teacher-forced on the twin's tokens, so kernel rounding can be told from a real bug).
Exit status: 0 when every run ran and is identical, 1 otherwise. A run the runtime refuses at load
by design (int8 weights on an onnxruntime without the 8-bit MatMulNBits kernel: 1.22 on ARM) is
shown as REFUSED and does not count as a failure.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
STORIES = PROJECT / "export" / "data" / "stories260K"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# ---------------------------------------------------------------------------------------------
# emulated machines


def cpuinfo(n: int, features: str, part: str, variant: str, revision: str, model: str, revcode: str) -> str:
    block = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
             "CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: {revision}\n")
    body = "\n".join(block.format(i=i, features=features, part=part, variant=variant, revision=revision)
                     for i in range(n))
    return body + f"\nRevision\t: {revcode}\nSerial\t\t: 10000000abcdef01\nModel\t\t: {model}\n"


PI5_CPUINFO = cpuinfo(4, "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
                         "dcpop asimddp", part="0xd0b", variant="0x4", revision="1",
                      model="Raspberry Pi 5 Model B Rev 1.0", revcode="d04170")
PI4_CPUINFO = cpuinfo(4, "fp asimd evtstrm crc32 cpuid", part="0xd08", variant="0x0", revision="3",
                      model="Raspberry Pi 4 Model B Rev 1.5", revcode="d03115")

MACHINES = {   # name: (qemu -cpu, /proc/cpuinfo, label)
    "pi5": ("cortex-a76", PI5_CPUINFO, "aarch64 pi5 (qemu cortex-a76)"),
    "pi4": ("cortex-a72", PI4_CPUINFO, "aarch64 pi4 (qemu cortex-a72)"),
    "max": ("max", PI5_CPUINFO, "aarch64 qemu -cpu max"),
}

# ---------------------------------------------------------------------------------------------
# setup helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))[:200]} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return r


def done(folder: Path) -> bool:
    return (folder / ".complete").is_file()


def finish(tmp: Path, final: Path, info: dict | None = None) -> None:
    (tmp / ".complete").write_text(json.dumps(info or {}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def fresh(tmp: Path) -> Path:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def ensure_tools() -> dict:
    missing = [p for p, cmd in (("qemu-user-static", "qemu-aarch64-static"), ("debootstrap", "debootstrap"))
               if not shutil.which(cmd) and not Path("/usr/sbin", cmd).exists()]
    if missing:
        if os.geteuid() != 0:
            raise SystemExit(f"install {' '.join(missing)} (apt-get install {' '.join(missing)}) or run as root")
        log(f"apt-get install {' '.join(missing)}")
        run(["apt-get", "update", "-q"])
        run(["apt-get", "install", "-y", "-q", *missing], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    qemu = shutil.which("qemu-aarch64-static")
    return {"qemu": qemu, "qemu_version": run([qemu, "--version"]).stdout.splitlines()[0]}


def debian_mirror() -> str:
    """The URI of the apt source that carries the bookworm suite (deb822 or one-line format)."""
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in f.read_text().split("\n\n"):
            fields = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
            if SUITE in fields.get("suites", "").split() and fields.get("uris"):
                return fields["uris"].split()[0]
    lists = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for f in lists:
        if f.is_file():
            for line in f.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb" and SUITE in parts:
                    return next(p for p in parts[1:] if "://" in p)
    return DEFAULT_MIRROR


def ensure_root(work: Path) -> Path:
    """A Debian arm64 userland with python3, unpacked without running its second stage."""
    root = work / "root"
    if done(root):
        return root
    if os.geteuid() != 0:
        raise SystemExit("debootstrap needs root")
    tmp = fresh(work / "root.tmp")
    mirror = debian_mirror()
    log(f"debootstrap --foreign arm64 {SUITE} minbase + python3 from {mirror} (~20 s)")
    run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3", SUITE, tmp, mirror])
    debs = sorted((tmp / "var/cache/apt/archives").glob("*.deb"))
    for deb in debs:
        run(["dpkg-deb", "-x", deb, tmp])
    pythons = sorted(p.name for p in (tmp / "usr/bin").glob("python3.*") if p.name[8:].isdigit())
    if not pythons:
        raise RuntimeError(f"{tmp}: no python3 after unpacking {len(debs)} packages")
    finish(tmp, root, {"mirror": mirror, "suite": SUITE, "packages": len(debs), "python": pythons[-1]})
    return root


def root_python(root: Path) -> str:
    return json.loads((root / ".complete").read_text())["python"].replace("python", "")   # "3.11"


def ensure_machine(work: Path, root: Path, name: str) -> Path:
    """ROOT seen through symlinks, plus the board's /proc/cpuinfo and cpu count (qemu -L finds them first)."""
    cpu, info, _ = MACHINES[name]
    folder = work / "machines" / name
    stamp = hashlib.sha256(f"{root}\n{cpu}\n{info}".encode()).hexdigest()
    if done(folder) and json.loads((folder / ".complete").read_text()).get("stamp") == stamp:
        return folder
    tmp = fresh(work / "machines" / f"{name}.tmp")
    for entry in root.iterdir():
        if entry.name not in ("proc", "sys", ".complete"):
            (tmp / entry.name).symlink_to(entry)
    (tmp / "proc").mkdir()
    (tmp / "proc/cpuinfo").write_text(info)
    cpus = tmp / "sys/devices/system/cpu"
    cpus.mkdir(parents=True)
    n = info.count("processor\t:")
    for f in ("possible", "present", "online"):
        (cpus / f).write_text(f"0-{n - 1}\n")
    finish(tmp, folder, {"stamp": stamp, "qemu_cpu": cpu})
    return folder


def ensure_site(work: Path, version: str, pyver: str) -> Path:
    """aarch64 wheels of onnxruntime==version and the runtime's other dependencies, unzipped into one folder."""
    site = work / f"site-ort{version}"
    if done(site):
        return site
    wheels = fresh(work / f"wheels-ort{version}")
    plats = [a for p in ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64",
                         "manylinux2014_aarch64") for a in ("--platform", p)]
    log(f"pip download aarch64 wheels: onnxruntime=={version} numpy jinja2 typer (cp{pyver})")
    run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", pyver,
         "--implementation", "cp", *plats, "-d", wheels, f"onnxruntime=={version}", "numpy", "jinja2", "typer"])
    tmp = fresh(work / f"site-ort{version}.tmp")
    names = sorted(w.name for w in wheels.glob("*.whl"))
    for w in names:
        run([sys.executable, "-m", "zipfile", "-e", wheels / w, tmp])
    finish(tmp, site, {"wheels": names})
    return site


def host_onnxruntime() -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("onnxruntime")
    except PackageNotFoundError:
        return None


def ensure_host_python(work: Path, version: str) -> str:
    """This interpreter when its onnxruntime is `version`; else a venv with onnxruntime==version."""
    if host_onnxruntime() == version:
        return sys.executable
    venv = work / f"host-ort{version}"
    if not done(venv):       # built in place: a venv's scripts name their folder, so no rename
        if venv.exists():
            shutil.rmtree(venv)
        log(f"x86-64 venv with onnxruntime=={version}")
        run([sys.executable, "-m", "venv", venv])
        run([venv / "bin/python", "-m", "pip", "install", "-q", f"onnxruntime=={version}", "numpy", "jinja2"])
        (venv / ".complete").write_text("{}")
    return str(venv / "bin/python")


# ---------------------------------------------------------------------------------------------
# artifacts


ARTIFACTS = [  # name, source, bits, extra export options
    ("stories260K", "stories", 32, {}),
    ("stories260K", "stories", 8, {}),
    ("stories260K", "stories", 4, {}),
    ("stories260K", "stories", 4, {"embed_bits": 32}),
    ("stories260K", "stories", 4, {"embed_bits": 4}),
    ("stories260K", "stories", 4, {"kv_cache": "int8"}),      # the int8 cache's standard-op attention
    ("qwen3-moe-tiny", "moe", 4, {}),
    ("qwen3-moe-tiny", "moe", 4, {"embed_bits": 32}),
    ("qwen3-moe-tiny", "moe", 4, {"kv_cache": "int8"}),
    ("reasoning-lfm2", "lfm2", 4, {}),     # hybrid: conv state; fused graph on >= 1.25, standard on 1.22; int8 KV
]
MOE_CONFIG = dict(num_experts=16, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, head_dim=16)


def bits_label(bits: int, opts: dict) -> str:
    label = f"{bits}e{opts['embed_bits']}" if "embed_bits" in opts else str(bits)
    return label + ("kv8" if opts.get("kv_cache") == "int8" else "")


def tree_hash(base: Path, paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(base)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def ensure_moe_checkpoint(work: Path) -> Path:
    out = work / "ckpt" / "qwen3-moe-tiny"
    stamp = json.dumps(MOE_CONFIG, sort_keys=True)
    if done(out) and json.loads((out / ".complete").read_text()).get("config") == stamp:
        return out
    log("building the tiny random Qwen3-MoE checkpoint with transformers (tests/conftest.py make_checkpoint)")
    sys.path.insert(0, str(PROJECT / "tests"))
    from conftest import make_checkpoint
    tmp = fresh(work / "ckpt" / "qwen3-moe-tiny.tmp")
    make_checkpoint(tmp, "qwen3_moe", **MOE_CONFIG)
    finish(tmp, out, {"config": stamp})
    return out


def ensure_artifacts(work: Path, reexport: bool) -> list[dict]:
    from edgert_export import export
    exporter = tree_hash(PROJECT, (PROJECT / "export").rglob("*.py"))
    sources = {"stories": STORIES, "lfm2": PROJECT / "export" / "data" / "reasoning-lfm2"}
    arts = []
    for name, src_key, bits, opts in ARTIFACTS:
        if src_key not in sources:
            sources[src_key] = ensure_moe_checkpoint(work)
        src = sources[src_key]
        label = bits_label(bits, opts)
        out = work / "art" / f"{name}-{label}"
        stamp = {"exporter": exporter, "source": tree_hash(src, (p for p in src.iterdir() if p.is_file() and p.name != ".complete")),
                 "bits": bits, **opts}
        stamp_file = work / "art" / f"{name}-{label}.stamp.json"
        if reexport or not (out / "edgert.json").is_file() or not stamp_file.is_file() \
                or json.loads(stamp_file.read_text()) != stamp:
            log(f"export {name} bits={bits} {opts or ''} -> {out}")
            t0 = time.time()
            export(src, out, bits=bits, force=True, progress=False, **opts)
            stamp_file.write_text(json.dumps(stamp))
            log(f"  {time.time() - t0:.1f} s")
        manifest = json.loads((out / "edgert.json").read_text())
        arts.append({"name": name, "bits": label, "path": str(out), "graphs": manifest.get("graphs", {"default": "model.onnx"}),
                     "quantization": manifest["quantization"]})
    return arts


# ---------------------------------------------------------------------------------------------
# the worker: runs inside the emulated (or host) Python; stdlib at import, the runtime inside


def worker(job_file: str) -> None:
    t_start = time.perf_counter()
    job = json.loads(Path(job_file).read_text())
    out = {"platform_machine": platform.machine(), "python": platform.python_version()}
    import importlib.util
    out["tokenizers_importable"] = importlib.util.find_spec("tokenizers") is not None
    out["regex_importable"] = importlib.util.find_spec("regex") is not None
    import numpy as np
    import onnxruntime as ort
    import edgert
    out.update(onnxruntime=ort.__version__, numpy=np.__version__, import_s=time.perf_counter() - t_start)
    try:
        import edgert.cli  # noqa: F401  (typer + its dependencies import on this machine)
        out["cli_import"] = "ok"
    except Exception as e:   # noqa: BLE001 - reported, not fatal: the check uses the Python API
        out["cli_import"] = f"{type(e).__name__}: {e}"
    try:
        t0 = time.perf_counter()
        llm = edgert.load(job["artifact"], tokenizer="python", context=job["context"], threads=job["threads"],
                          moe_strategy=job["strategy"])
        out["load_s"] = time.perf_counter() - t0
        out["strategy"], out["tokenizer"] = llm.model.strategy, llm.tokenizer.backend
        model = llm.model
        out["prompt_ids"] = llm.encode(job["prompt"], raw=True)
        if out["tokenizers_importable"]:      # host only: the Rust tokenizer must agree with the Python one
            from edgert.tokenizer import Tokenizer
            out["prompt_ids_tokenizers"] = Tokenizer.from_dir(job["artifact"], backend="tokenizers").encode(
                job["prompt"], add_special_tokens=True)
        t0 = time.perf_counter()
        toks = list(llm.generate(job["prompt"], raw=True, max_tokens=job["max_tokens"], temperature=0,
                                 ignore_eos=True))
        out["generate_s"] = time.perf_counter() - t0
        out["ids"] = [t.id for t in toks if t.id >= 0]      # id -1: held-back text flushed at the end
        out["text"] = "".join(t.text for t in toks)

        def along(prompt, ids):
            """The logits before each of ids, teacher-forced one token at a time (as generation fed them;
            generation itself steps through the engine, which keeps no logits)."""
            model.reset()
            path = [model.forward(prompt)[-1]]
            for t in ids[:-1]:
                path.append(model.forward([t])[-1])
            return np.stack(path).astype(np.float32)
        logits = along(out["prompt_ids"], out["ids"])
        forced = job.get("forced")
        if forced is not None and forced != out["ids"]:
            forced_logits = along(job["prompt_ids_forced"], forced)    # the twin's tokens: logits along its path
        else:
            forced_logits = logits
        np.savez(job["npz"], logits=logits, forced_logits=forced_logits)
        out["status"] = "ok"
    except Exception as e:   # noqa: BLE001 - one line for the table
        out["status"] = "error"
        out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400]}" if str(e).strip() else type(e).__name__
        if "no 8-bit MatMulNBits kernel" in out["error"]:
            out["status"] = "refused"    # by design: the runtime's load-time probe (onnxruntime 1.22 on ARM)
    Path(job["result"]).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# the driver


class Env:
    def __init__(self, kind: str, ort: str, label: str, argv: list[str], env: dict):
        self.kind, self.ort, self.label, self.argv, self.env = kind, ort, label, argv, env


def host_env(python: str, ort: str) -> Env:
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "EDGERT_TOKENIZER": "python", "PYTHONNOUSERSITE": "1"}
    return Env("x86-64", ort, "x86-64", [python], env)


def qemu_env(qemu: str, machine_root: Path, machine: str, site: Path, ort: str) -> Env:
    cpu, _, label = MACHINES[machine]
    argv = [qemu, "-cpu", cpu, "-L", str(machine_root),
            "-E", f"PYTHONPATH={site}:{PROJECT}", "-E", "EDGERT_TOKENIZER=python", "-E", "PYTHONNOUSERSITE=1",
            "-E", "PYTHONDONTWRITEBYTECODE=1", "-U", "VIRTUAL_ENV",
            str(machine_root / "usr/bin/python3"), "-S"]    # -S: no site-packages of the Debian root or the host
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "LD_LIBRARY_PATH", "LD_PRELOAD")}
    return Env(machine, ort, label, argv, env)


def run_job(env: Env, art: dict, strategy: str | None, args, runs_dir: Path, forced: dict | None, tag: str = "") -> dict:
    key = f"{Path(art['path']).name}.ort{env.ort}.{env.kind}.{strategy or 'auto'}.t{args.threads}{tag}"
    job = {"artifact": art["path"], "strategy": strategy, "prompt": args.prompt, "max_tokens": args.max_tokens,
           "context": args.context, "threads": args.threads, "npz": str(runs_dir / f"{key}.npz"),
           "result": str(runs_dir / f"{key}.json"),
           "forced": forced["ids"] if forced else None, "prompt_ids_forced": forced["prompt_ids"] if forced else None}
    for f in (job["npz"], job["result"]):
        Path(f).unlink(missing_ok=True)
    job_file = runs_dir / f"{key}.job.json"
    job_file.write_text(json.dumps(job))
    t0 = time.perf_counter()
    try:
        r = subprocess.run([*env.argv, str(Path(__file__).resolve()), "--_worker", str(job_file)], env=env.env,
                           capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        r = subprocess.CompletedProcess(e.cmd, -9, "", out + f"\ntimed out after {args.timeout:.0f} s")
    wall = time.perf_counter() - t0
    row = {"artifact": art["name"], "bits": art["bits"], "art_path": art["path"], "ort": env.ort, "machine": env.kind,
           "machine_label": env.label, "requested_strategy": strategy or "auto", "wall_s": wall, "key": key}
    if Path(job["result"]).is_file():
        row.update(json.loads(Path(job["result"]).read_text()))
    else:
        row.update(status="crash", error=f"worker exited {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1][:300]}")
    if r.returncode != 0 and row.get("status") == "ok":
        row.update(status="crash", error=f"worker exited {r.returncode} after its run")
    row["npz"] = job["npz"] if Path(job["npz"]).is_file() else None
    if row.get("status") != "ok":
        row["stderr_tail"] = r.stderr[-3000:]
        row["note"] = short_error(row.get("error", ""), r.stderr)
    return row


def short_error(error: str, stderr: str) -> str:
    """onnxruntime's own message ends with the reason after a long C++ signature: keep node + reason."""
    m = re.search(r"running (\w+) node\. Name:'([^']*)'", error)
    lines = [line for line in stderr.splitlines() if "Status Message" in line]
    if m and lines:
        reason = lines[-1].rsplit("] ", 1)[-1].strip()
        return f"onnxruntime: {m.group(1)} node {m.group(2)!r}: {reason}"
    return error


def strategies_for(art: dict, ort: str) -> list[str | None]:
    """auto, plus the other MoE graph this onnxruntime can run (plain on >= 1.23), plus the int8
    cache's standard-op graphs where auto runs its GroupQueryAttention twin (>= 1.27), plus the int8
    weights' nibble twins (what auto picks where the 8-bit kernel is missing: 1.22 on ARM)."""
    out = [None]
    major_minor = tuple(int(p) for p in ort.split(".")[:2])
    if "qmoe" in art["graphs"] and "plain" in art["graphs"] and major_minor >= (1, 23):
        out.append("plain")
    if major_minor >= (1, 27):    # the int8 cache: auto runs GroupQueryAttention's; its standard-op graph too
        out += [g for g in (g[:-len("+kv8gqa")] if "+" in g else "default" for g in sorted(art["graphs"])
                            if g.endswith("kv8gqa")) if g not in out]
    return out + sorted(g for g in art["graphs"] if g.endswith("nibbles"))


def ensure_exact(work: Path, art: dict) -> Path:
    """A copy of the artifact whose MatMulNBits nodes use accuracy_level 0: activations stay fp32 (no int8
    quantization of the input), so it is the exact result of the quantized weights, up to fp32 summation order."""
    import onnx
    src = Path(art["path"])
    out = work / "exact" / f"{src.name}-acc0"
    stamp = hashlib.sha256((src / "edgert.json").read_bytes()).hexdigest()
    if done(out) and json.loads((out / ".complete").read_text()).get("stamp") == stamp:
        return out
    tmp = work / "exact" / f"{src.name}-acc0.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    manifest = json.loads((tmp / "edgert.json").read_text())
    changed = {}
    for graph_file in manifest.get("graphs", {"default": "model.onnx"}).values():
        model = onnx.load(str(tmp / graph_file), load_external_data=False)
        count = 0

        def walk(graph):
            nonlocal count
            for node in graph.node:
                if node.op_type == "MatMulNBits":
                    for a in node.attribute:
                        if a.name == "accuracy_level":
                            a.i, count = 0, count + 1
                for a in node.attribute:
                    if a.type == onnx.AttributeProto.GRAPH:
                        walk(a.g)
                    for g in a.graphs:
                        walk(g)
        walk(model.graph)
        onnx.save(model, str(tmp / graph_file))
        data = (tmp / graph_file).read_bytes()
        manifest["files"][graph_file] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        changed[graph_file] = count
    if "manifest_sha256" in manifest:        # the manifest records its own sha256: edited, it is recomputed
        from edgert.artifact import manifest_sha256
        manifest["manifest_sha256"] = manifest_sha256(manifest)
    (tmp / "edgert.json").write_text(json.dumps(manifest, indent=2))
    finish(tmp, out, {"stamp": stamp, "matmulnbits_set_to_accuracy_level_0": changed})
    return out


def diagnose(rows: list[dict], arts: list[dict], work: Path, ref_env: "Env", args, runs_dir: Path) -> None:
    """For a run whose tokens differ from the run it was teacher-forced on (its partner): are both near the
    exact computation (kernel rounding, e.g. int8 activations at accuracy_level 4) or is one far off (a bug)?"""
    import numpy as np
    cache = {}
    for row in rows:
        partner = row.get("_partner")
        if row.get("status") != "ok" or not partner or partner.get("status") != "ok" or row["ids"] == partner["ids"]:
            continue
        art = next(a for a in arts if a["path"] == row["art_path"])
        strategy = "plain" if "plain" in art["graphs"] else None
        if (art["path"], partner["key"]) not in cache:
            exact_art = {**art, "path": str(ensure_exact(work, art))}
            log(f"exact reference for {Path(art['path']).name} along the tokens of {partner['key']}")
            cache[(art["path"], partner["key"])] = run_job(ref_env, exact_art, strategy, args, runs_dir, partner,
                                                           tag=f".along.{partner['key']}")
        ex = cache[(art["path"], partner["key"])]
        if ex.get("status") != "ok":
            row["diagnosis"] = {"error": ex.get("error")}
            continue
        exact = np.load(ex["npz"])["forced_logits"].astype(np.float64)
        mine = np.load(row["npz"])["forced_logits"]
        theirs = np.load(partner["npz"])["logits"]
        n = min(len(exact), len(mine), len(theirs))
        d_row, d_partner = float(np.abs(mine[:n] - exact[:n]).max()), float(np.abs(theirs[:n] - exact[:n]).max())
        if d_row <= 1e-3:
            verdict = (f"rounding: this run is the exact fp32-activation result (max|d| {d_row:.1e}); the x86 run "
                       f"carries int8-activation rounding (max|d| {d_partner:.2f}) and flips a near-tie")
        elif d_row <= 3 * max(d_partner, 1e-3):
            verdict = (f"rounding: both runs are within quantization noise of the exact fp32-activation result "
                       f"(max|d| {d_row:.2f} here, {d_partner:.2f} on x86)")
        else:
            verdict = f"SUSPECT: this run is far from the exact result (max|d| {d_row:.2f}; x86 {d_partner:.2f})"
        row["diagnosis"] = {"exact_key": ex["key"], "max_abs_diff_to_exact": d_row, "partner_max_abs_diff_to_exact": d_partner,
                            "exact_greedy_ids": ex["ids"], "exact_greedy_equals_this_run": ex["ids"] == row["ids"],
                            "exact_greedy_equals_partner": ex["ids"] == partner["ids"], "verdict": verdict}


def compare(row: dict, other: dict | None, use_forced: bool) -> dict:
    """Tokens and logits of `row` against `other` (its twin or the reference)."""
    import numpy as np
    if other is None or other.get("status") != "ok" or row.get("status") != "ok":
        return {"same": None}
    same = row["ids"] == other["ids"] and row["prompt_ids"] == other["prompt_ids"]
    res = {"same": same}
    if not same:
        res["first_diff"] = next((i for i, (a, b) in enumerate(zip(row["ids"], other["ids"])) if a != b),
                                 min(len(row["ids"]), len(other["ids"])))
    if row.get("npz") and other.get("npz"):
        mine = np.load(row["npz"])["forced_logits" if use_forced else "logits"]
        theirs = np.load(other["npz"])["logits"]
        n = min(len(mine), len(theirs))
        if n and row["prompt_ids"] == other["prompt_ids"]:
            d = np.abs(mine[:n].astype(np.float64) - theirs[:n])
            res["max_abs_logit_diff"] = float(d.max())
            res["top1_agree"] = float(np.mean(mine[:n].argmax(-1) == theirs[:n].argmax(-1)))
            srt = np.sort(theirs[:n], axis=-1)
            margins = srt[:, -1] - srt[:, -2]
            res["min_top2_margin_of_other"] = float(margins.min())
            if not same:
                flips = np.nonzero(mine[:n].argmax(-1) != theirs[:n].argmax(-1))[0]
                res["flip_steps"] = flips.tolist()
                res["margins_at_flips"] = margins[flips].tolist()
    return res


def fmt_table(rows: list[dict]) -> str:
    head = ["artifact", "bits", "ORT", "machine", "strategy", "identical", "max|dlogit|", "load s", "gen s", "note"]
    lines = []
    for r in rows:
        strat = r.get("strategy") or "-"
        if r["requested_strategy"] == "auto" and strat != "-":
            strat += " (auto)"
        ident = {True: "yes", False: "NO", None: "-"}[r.get("identical")] if r.get("status") == "ok" else r["status"].upper()
        dl = r.get("vs_twin", {}).get("max_abs_logit_diff") if r["machine"] != "x86-64" else r.get("vs_ref", {}).get("max_abs_logit_diff")
        note = ""
        if r.get("status") != "ok":
            note = r.get("note") or r.get("error", "")[:140]
        elif r.get("identical") is False:
            c = r.get("vs_twin") if r.get("vs_twin", {}).get("same") is False else r.get("vs_ref", {})
            note = f"first diff at token {c.get('first_diff')}"
        elif r["machine"] == "x86-64" and r.get("is_ref"):
            note = "reference"
        lines.append([r["artifact"], r["bits"], r["ort"], r["machine_label"], strat, ident,
                      "-" if dl is None else f"{dl:.2e}", f"{r['load_s']:.2f}" if "load_s" in r else "-",
                      f"{r['generate_s']:.2f}" if "generate_s" in r else "-", note])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--_worker":
        worker(sys.argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/work/scratch/aarch64"))
    ap.add_argument("--ort", default="1.22.1,1.32.0", help="onnxruntime versions; the last is the reference")
    ap.add_argument("--machines", default="pi5,pi4,max", help=f"emulated machines: {', '.join(MACHINES)}")
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated artifact folder names (e.g. stories260K-4)")
    ap.add_argument("--reexport", action="store_true", help="export the artifacts again")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--no-diagnose", action="store_true",
                    help="skip the exact (accuracy_level 0) reference run for token mismatches")
    ap.add_argument("--json", type=Path, help="write every run and its comparison here")
    args = ap.parse_args()
    t_total = time.time()
    versions = [v.strip() for v in args.ort.split(",") if v.strip()]
    machines = [m.strip() for m in args.machines.split(",") if m.strip()]
    bad = [m for m in machines if m not in MACHINES]
    if bad:
        ap.error(f"unknown machine(s) {bad}; choose from {', '.join(MACHINES)}")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    runs_dir = work / "runs"
    runs_dir.mkdir(exist_ok=True)

    t0 = time.time()
    tools = ensure_tools()
    root = ensure_root(work)
    pyver = root_python(root)
    machine_roots = {m: ensure_machine(work, root, m) for m in machines}
    sites = {v: ensure_site(work, v, pyver) for v in versions}
    host_pythons = {v: ensure_host_python(work, v) for v in versions}
    arts = ensure_artifacts(work, args.reexport)
    if args.only:
        keep = set(args.only.split(","))
        arts = [a for a in arts if Path(a["path"]).name in keep]
    setup_s = time.time() - t0
    log(f"setup {setup_s:.0f} s; {len(arts)} artifacts, onnxruntime {versions}, machines x86-64 + {machines}")

    ref_version = versions[-1]
    envs = [host_env(host_pythons[v], v) for v in [ref_version] + versions[:-1]]
    envs += [qemu_env(tools["qemu"], machine_roots[m], m, sites[v], v) for m in machines for v in versions]
    rows, by = [], {}
    for env in envs:
        for art in arts:
            for strategy in strategies_for(art, env.ort):
                twin_key = None
                if env.kind == "x86-64":
                    twin = by.get((art["path"], ref_version, "x86-64", None))   # x86 rows: teacher-force on ref
                else:
                    twin = by.get((art["path"], env.ort, "x86-64", strategy))
                    twin_key = twin and twin.get("key")
                forced = twin if twin and twin.get("status") == "ok" else None
                log(f"{env.label:32s} ort {env.ort:7s} {Path(art['path']).name:22s} {strategy or 'auto'}")
                row = run_job(env, art, strategy, args, runs_dir, forced)
                row["twin"] = twin_key
                by[(art["path"], env.ort, env.kind, strategy)] = row
                rows.append(row)

    failures = []
    for row in rows:
        art_path = row["art_path"]
        strategy = None if row["requested_strategy"] == "auto" else row["requested_strategy"]
        # a nibble twin (the int8 weights through the 4-bit kernel) rounds differently from the
        # 8-bit kernel: its reference is x86-64 running the same twin graph
        ran = row.get("strategy") or ""
        ref = by.get((art_path, ref_version, "x86-64", ran if ran.endswith("nibbles") else None))
        row["is_ref"] = row is ref
        if row["machine"] != "x86-64":
            if strategy is None and ran.endswith("nibbles"):
                # auto chose the nibble twin here (no 8-bit kernel): compare with x86 running that graph
                twin = by.get((art_path, row["ort"], "x86-64", ran))
                row["vs_twin"] = compare(row, twin, use_forced=False)
            else:
                twin = by.get((art_path, row["ort"], "x86-64", strategy))
                row["vs_twin"] = compare(row, twin, use_forced=True)
            row["vs_ref"] = compare(row, ref, use_forced=False)
            row["_partner"] = twin
            verdicts = [row["vs_twin"]["same"], row["vs_ref"]["same"]]
        else:
            row["vs_ref"] = compare(row, ref, use_forced=True) if row is not ref else {"same": True}
            row["_partner"] = ref if row is not ref else None
            verdicts = [row["vs_ref"]["same"]]
        if row.get("status") == "ok" and row.get("prompt_ids_tokenizers") not in (None, row["prompt_ids"]):
            row["tokenizer_mismatch"] = True
            verdicts.append(False)
        row["identical"] = None if None in verdicts else all(verdicts)
        if row.get("status") == "refused":
            continue                     # an artifact this onnxruntime cannot run, refused with one clear line
        if row.get("status") != "ok" or row["identical"] is not True:
            failures.append(row)
    if not args.no_diagnose:
        diagnose(rows, arts, work, envs[0], args, runs_dir)

    print()
    print(f"prompt {args.prompt!r}, {args.max_tokens} greedy tokens, threads={args.threads}, context={args.context}; "
          f"identical = same prompt and generated ids as x86-64 with the same onnxruntime + graph and as x86-64 "
          f"onnxruntime {ref_version} (default graph); max|dlogit| along the x86 twin's tokens "
          f"(x86 rows: against the x86 onnxruntime {ref_version} reference)")
    print(fmt_table(rows))
    sample = next((r for r in rows if r.get("is_ref") and r.get("status") == "ok"), None)
    if sample:
        print(f"\nreference text ({sample['artifact']} {sample['bits']}): {sample['prompt_ids']} -> {sample['text']!r}")
    emu = [r for r in rows if r["machine"] != "x86-64" and r.get("status") == "ok"]
    leaks = [r["key"] for r in emu if r.get("tokenizers_importable") or r.get("platform_machine") != "aarch64" or r.get("tokenizer") != "python"]
    if leaks:
        print(f"\nWARNING: emulated runs that were not aarch64 + pure-Python tokenizer: {leaks}")
        failures += [r for r in emu if r["key"] in leaks and r not in failures]
    cli = sorted({(r["machine_label"], r["ort"], r.get("cli_import")) for r in emu if r.get("cli_import") != "ok"})
    if cli:
        print(f"\nedgert.cli (typer) failed to import: {cli}")
    total = time.time() - t_total
    print(f"\n{len(rows)} runs, {len(failures)} not identical or failed; setup {setup_s:.0f} s, total {total:.0f} s")
    for r in failures:
        if r.get("status") != "ok":
            print(f"  FAIL {r['key']}: {r.get('note') or r.get('error')}")
            continue
        c = r.get("vs_twin") if r.get("vs_twin", {}).get("same") is False else r.get("vs_ref", {})
        if r.get("tokenizer_mismatch"):
            print(f"  FAIL {r['key']}: the python and tokenizers backends encode the prompt differently")
        print(f"  FAIL {r['key']}: tokens differ from {r['_partner']['key'] if r.get('_partner') else 'reference'} "
              f"from token {c.get('first_diff')}; argmax flips at steps {c.get('flip_steps')} where the x86 top-2 margin "
              f"was {[round(m, 4) for m in c.get('margins_at_flips', [])]}; max|dlogit| {c.get('max_abs_logit_diff', float('nan')):.3g}")
        dg = r.get("diagnosis") or {}
        if dg.get("verdict"):
            print(f"       {dg['verdict']}; exact greedy tokens = {'this run' if dg['exact_greedy_equals_this_run'] else 'x86' if dg['exact_greedy_equals_partner'] else 'neither'}")
    if args.json:
        info = {"command": " ".join([sys.executable, *sys.argv]), "total_s": total, "setup_s": setup_s,
                "host": {"machine": platform.machine(), "python": platform.python_version(), "onnxruntime": host_onnxruntime()},
                "qemu": tools["qemu_version"], "debian_root": json.loads((root / ".complete").read_text()),
                "machines": {m: {"qemu_cpu": MACHINES[m][0], "cpuinfo": MACHINES[m][1]} for m in machines},
                "sites": {v: json.loads((sites[v] / ".complete").read_text())["wheels"] for v in versions},
                "artifacts": arts, "prompt": args.prompt, "max_tokens": args.max_tokens, "threads": args.threads,
                "context": args.context, "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], "failures": [r["key"] for r in failures]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(info, indent=1))
        print(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
