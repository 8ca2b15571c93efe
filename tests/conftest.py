"""Shared test fixtures: random-weight Hugging Face checkpoints built from configs (no hub here),
transformers fp32 as the numerical reference, the real stories260K model (the workspace's copy, or
the identical one bundled with the exporter), and a Python with onnxruntime 1.22 (Termux's)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_STORIES = ROOT / "export" / "data" / "stories260K"
SHARED_STORIES = ROOT.parent / "shared" / "models" / "stories260K"
# the workspace's shared/ copy when there, else the bundled one: the same files (identical sha256)
STORIES = SHARED_STORIES if (SHARED_STORIES / "model.safetensors").is_file() else BUNDLED_STORIES


def stories_dir() -> Path:
    return STORIES


# ---- onnxruntime 1.22 (what Termux packages) -------------------------------------------------

OLD_ORT = "1.22.1"
_old_ort_problem: list[str] = []      # why the old-onnxruntime tests did not run (for the summary)


def _cached_venv(name: str, packages: list[str], inherit: bool = False) -> Path:
    """A venv made once and cached in ~/.cache/edgert/NAME (a lock keeps concurrent runs apart).
    inherit: it also sees this Python's packages (a .pth line adds its site-packages after its own),
    so it only installs what must differ."""
    import fcntl
    import site
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgert"
    venv = base / name
    python, done = venv / "bin" / "python", venv / ".edgert-complete"
    parent = site.getsitepackages()[0] if inherit else ""
    stamp = " ".join(packages) + " " + parent + "\n"
    if done.is_file() and done.read_text() == stamp:
        return python
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (done.is_file() and done.read_text() == stamp):
            shutil.rmtree(venv, ignore_errors=True)            # a half-made or stale one
            print(f"\ncreating {venv} ({', '.join(packages)}, once)", file=sys.stderr)
            r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300)
            if not r.returncode and inherit:
                own = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                     capture_output=True, text=True).stdout.strip()
                (Path(own) / "edgert-parent.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
            if not r.returncode:
                r = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages],
                                   capture_output=True, text=True, timeout=900)
            if r.returncode:
                shutil.rmtree(venv, ignore_errors=True)
                tail = (r.stderr.strip().splitlines() or ["?"])[-1]
                raise RuntimeError(f"making {venv} failed: {tail}")
            done.write_text(stamp)
    return python


@pytest.fixture(scope="session")
def old_ort_python() -> str:
    """EDGERT_ORT_PYTHON (.ci/run sets it), else the cached venv, made on first use. When neither can
    be had (no network for pip), the tests skip and the run's summary says so in capitals."""
    if os.environ.get("EDGERT_ORT_PYTHON"):
        return os.environ["EDGERT_ORT_PYTHON"]
    if _old_ort_problem:
        pytest.skip(_old_ort_problem[0])
    try:
        return str(_cached_venv("ort122-venv", [f"onnxruntime=={OLD_ORT}", "numpy", "jinja2", "typer"]))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        _old_ort_problem.append(f"no Python with onnxruntime {OLD_ORT}: {e} (set EDGERT_ORT_PYTHON)")
        pytest.skip(_old_ort_problem[0])


def pytest_terminal_summary(terminalreporter):
    if _old_ort_problem:
        terminalreporter.write_sep("!", f"THE ONNXRUNTIME {OLD_ORT} TESTS DID NOT RUN: {_old_ort_problem[0]}", red=True,
                                   bold=True)
    if _optimum_problem:
        terminalreporter.write_sep("!", f"THE OPTIMUM ROUTE TESTS DID NOT RUN: {_optimum_problem[0]}", red=True, bold=True)


# ---- optimum-onnx (export --via optimum), which wants transformers < 4.58: its own venv ---------

OPTIMUM = ["optimum-onnx==0.1.0", "transformers>=4.36,<4.58", "onnx-ir"]   # onnx-ir: onnxruntime.quantization
_optimum_problem: list[str] = []


@pytest.fixture(scope="session")
def optimum_python() -> str:
    """EDGERT_OPTIMUM_PYTHON (.ci/run sets it), else a cached venv that adds optimum-onnx and an
    older transformers to this Python's packages. Without one (no network for pip) the tests skip
    and the summary says so."""
    if os.environ.get("EDGERT_OPTIMUM_PYTHON"):
        return os.environ["EDGERT_OPTIMUM_PYTHON"]
    if _optimum_problem:
        pytest.skip(_optimum_problem[0])
    try:
        return str(_cached_venv("optimum-venv", OPTIMUM, inherit=True))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        _optimum_problem.append(f"no Python with optimum-onnx: {e} (set EDGERT_OPTIMUM_PYTHON)")
        pytest.skip(_optimum_problem[0])


def make_checkpoint(out: Path, model_type: str, dtype: str = "float32", shard: str | None = None, seed: int = 0,
                    tweak=None, **overrides) -> Path:
    """A random-weight HF folder for `model_type`, saved by transformers itself, with stories260K's tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-6,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    config = transformers.AutoConfig.for_model(model_type, **base)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random init is tiny; widen it so that the layers matter for the logits
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(0, 0.08)
            else:
                p.normal_(0, 0.05)
        if tweak:
            tweak(model)
    model.to(getattr(torch, dtype))
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, safe_serialization=True, **kw)
    tok_src = BUNDLED_STORIES
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_src / f, out / f)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}))
    return out


def hf_model(path: Path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def runtime_greedy(model, ids: list[int], n: int) -> list[int]:
    model.reset()
    logits, out = model.forward(ids)[-1], []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = model.forward([out[-1]])[-1]
    return out


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """export(src, bits=..., **kw) -> artifact path, cached per session."""
    from edgert_export import export
    cache = {}

    def _export(src: Path, bits: int, **kw) -> Path:
        key = (str(src), bits, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("artifact") / "art"
            export(src, out, bits=bits, progress=False, **kw)
            cache[key] = out
        return cache[key]
    return _export


def drive(decoding, picks, vocab: int = 600) -> list:
    """Feed a Decoding logits that make each of `picks` the likeliest token in turn: its Steps, until it stops."""
    import numpy as np
    out = []
    for pick in picks:
        logits = np.zeros(vocab, np.float32)
        logits[pick] = 1.0
        step = decoding.next(logits)
        if step is None:
            break
        out.append(step)
    return out
