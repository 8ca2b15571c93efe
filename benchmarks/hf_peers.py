"""Hugging Face peers: transformers fp32 (the numerical reference) and optimum-onnx (fp32, dynamic int8).

optimum-onnx pins transformers < 4.58 while onnxruntime-genai's builder needs transformers 5, so
optimum lives in its own venv, made here under the suite's work folder (torch==2.13.0 installed
first and alone, so pip never pulls a CUDA build to satisfy a dependency).

    py = ensure_venv(work / "venvs", "optimum", OPTIMUM_VENV)
    art = prepare_optimum(hf_dir, work / "optimum" / shape, py, quant="int8")   # -> (folder, meta)

Both runners time prefill and decode the same way as peers.timing(): the whole prompt -> the
logits of its last token + greedy pick, then n_decode single-token forwards with their cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (stdlib-only at import: usable from any venv)


def _pinned_onnxruntime() -> str:
    """The onnxruntime of the main environment, so both ONNX peers run the same kernels."""
    v = peers._version("onnxruntime")
    return f"onnxruntime=={v}" if v != "?" else "onnxruntime"


# pip install steps, in order; the first alone (see the module docstring)
OPTIMUM_VENV = [["torch==2.13.0"],
                ["optimum-onnx[onnxruntime]==0.1.0", "transformers<4.58", _pinned_onnxruntime()]]


def ensure_venv(root: Path, name: str, steps: list[list[str]], log_dir: Path | None = None) -> Path:
    """A venv at root/name with the pip steps installed (cached by their hash); returns its python."""
    venv = Path(root).resolve() / name
    py = venv / "bin" / "python"
    key = hashlib.sha256(json.dumps(steps).encode()).hexdigest()[:16]
    marker = venv / "edgert-suite.key"
    if py.exists() and marker.exists() and marker.read_text() == key:
        return py
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = (log_dir or venv.parent) / f"{name}-venv.log"
    peers._run_logged([sys.executable, "-m", "venv", str(venv)], log, f"python -m venv {venv}")
    for i, pkgs in enumerate(steps):
        cmd = [str(py), "-m", "pip", "install", "-q", *pkgs]
        part = log.with_suffix(f".{i}.log")
        peers._run_logged(cmd, part, f"pip install {' '.join(pkgs)} (venv {name})")
    marker.write_text(key)
    return py


# --------------------------------------------------------------------------
# runners: one greedy loop over a model with the transformers forward() API
# --------------------------------------------------------------------------


class _CausalLMLoop(peers.Runner):
    """Prefill, then single-token forwards carrying past_key_values (what generate() does, minus
    its per-step bookkeeping, so only the model is timed)."""

    prefill_kwargs: dict = {}

    def __init__(self, path: Path, name: str):
        self.path, self.name, self.info = Path(path), name, {}
        self.model = None

    def _load(self, threads: int):
        raise NotImplementedError

    def measure(self, prompt_ids, n_decode, threads=2):
        import torch

        torch.set_num_threads(threads)
        if self.model is None:
            self.model = self._load(threads)
        model = self.model
        n = len(prompt_ids)
        with torch.inference_mode():
            t0 = time.perf_counter()
            ids = torch.tensor([list(prompt_ids)])
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **self.prefill_kwargs)
            tokens = [int(out.logits[0, -1].argmax())]
            t1 = time.perf_counter()
            for i in range(n_decode):
                out = model(input_ids=torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values,
                            attention_mask=torch.ones((1, n + i + 1), dtype=torch.long), use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
            t2 = time.perf_counter()
        self.last_tokens = tokens[:-1]      # the greedy continuation that was fed back
        return peers.timing(n, n_decode, t0, t1, t2)

    def close(self):
        self.model = None


class TransformersRunner(_CausalLMLoop):
    """transformers fp32, eager PyTorch on the CPU: the numerical reference."""

    prefill_kwargs = {"logits_to_keep": 1}     # lm_head on the last position only, as edgert does

    def _load(self, threads):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()


class OptimumRunner(_CausalLMLoop):
    """optimum-onnx's ORTModelForCausalLM over its exported (and maybe quantized) model.onnx."""

    def _load(self, threads):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        # the quantizer writes model_quantized.onnx: load whichever single graph the folder holds
        names = sorted(p.name for p in self.path.glob("*.onnx"))
        name = "model.onnx" if "model.onnx" in names else names[0]
        return ORTModelForCausalLM.from_pretrained(self.path, file_name=name, session_options=so,
                                                   provider="CPUExecutionProvider")


# --------------------------------------------------------------------------
# optimum-onnx export and dynamic quantization (in its venv)
# --------------------------------------------------------------------------


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _need_memory(what: str, need: int) -> None:
    """Refuse up front rather than let the kernel's OOM killer pick a victim on a shared machine."""
    have = _mem_available()
    if have < need:
        raise RuntimeError(f"{what} needs ~{need / 2**30:.1f} GiB of free memory, {have / 2**30:.1f} GiB available")


def _build_once(out_dir: Path, tag: str, key: str, cmd: list[str], what: str, need: int, disk: int) -> dict:
    """Run cmd + [out_dir/tag.tmp], rename the result to out_dir/tag; cached by key in tag.meta.json.
    need / disk: bytes of memory / disk space the step needs; refused up front when they are not free."""
    out, meta_path = out_dir / tag, out_dir / f"{tag}.meta.json"
    meta = peers._cached(meta_path, key, out)
    if meta is None:
        _need_memory(what, need)
        free = shutil.disk_usage(out_dir).free
        if free < disk:
            raise RuntimeError(f"{what} writes ~{disk / 1e9:.1f} GB, {free / 1e9:.1f} GB free on {out_dir}")
        tmp = out_dir / f"{tag}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        dt = peers._run_logged(cmd + [str(tmp)], out_dir / f"{tag}.log", what)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        meta = {"key": key, "convert_s": round(dt, 1), "command": " ".join(cmd + [str(out)]),
                "bytes": peers._dir_size(out)}
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def prepare_optimum(hf_dir, out_dir, python: Path, n_params: int, quant: str = "fp32") -> tuple[Path, dict]:
    """optimum-cli export onnx (fp32; + `onnxruntime quantize --avx512_vnni`: dynamic int8), cached.

    Returns (model folder, meta with bytes and build seconds, the export's included for int8)."""
    if quant not in ("fp32", "int8"):
        raise ValueError(f"optimum quant {quant!r}: fp32 or int8")
    hf_dir, out_dir = Path(hf_dir).resolve(), Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cli = str(Path(python).parent / "optimum-cli")
    key = peers._checkpoint_key(hf_dir, {"optimum": "fp32", "python": str(python)})
    # tracing holds the torch model, the ONNX proto and a validation run: the 0.5B shape's export
    # peaked at 5.2 GB for 2.0 GB of fp32 weights, so ask for 2.75 fp32 copies
    meta = _build_once(out_dir, "fp32", key, [cli, "export", "onnx", "--model", str(hf_dir), "--task",
                                              "text-generation-with-past"],
                       "optimum-cli export onnx", 11 * n_params, disk=4 * n_params)
    if quant == "fp32":
        return out_dir / "fp32", meta
    # writes model_quantized.onnx (MatMulInteger, per-tensor int8 weights) beside the config files
    meta8 = _build_once(out_dir, "int8", key + "-int8", [cli, "onnxruntime", "quantize", "--onnx_model",
                                                          str(out_dir / "fp32"), "--avx512_vnni", "-o"],
                        "optimum-cli onnxruntime quantize", 22 * n_params,    # measured: 10.2 GB for 2.0 GB
                        disk=n_params)
    return out_dir / "int8", dict(meta8, convert_s=meta8["convert_s"] + meta["convert_s"])


def venv_versions(python: Path, modules: list[str]) -> dict:
    """Installed versions of modules in another interpreter."""
    code = ("import json, importlib.metadata as m\n"
            "def v(n):\n  try: return m.version(n)\n  except Exception: return None\n"
            f"print(json.dumps({{n: v(n) for n in {modules!r}}}))")
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=dict(os.environ))
    return json.loads(r.stdout) if r.returncode == 0 else {}
