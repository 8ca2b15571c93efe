"""Side-by-side peers for edgert benchmarks: onnxruntime-genai and llama.cpp.

Both peers come from PyPI only:

  * onnxruntime-genai  (`pip install onnxruntime-genai onnx-ir`): its model
    builder converts the Hugging Face folder to an int4/int8 ONNX model
    (`python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu`),
    and og.Model / og.Generator run it.
  * llama.cpp through llama-cpp-python (`pip install llama-cpp-python gguf`,
    built from source by pip).  The HF folder goes through llama.cpp's own
    convert_hf_to_gguf.py (shipped in the llama-cpp-python sdist) to a bf16
    GGUF, which llama_model_quantize turns into Q4_0 / Q4_K_M / Q8_0 ...

    runner = prepare_llamacpp("ckpt/qwen2.5-0.5b", "work", qtype="Q4_K_M")
    runner.measure(prompt_ids, n_decode=64, threads=2)
    # {"prefill_tok_s": ..., "decode_tok_s": ..., "n_prompt": 128, "n_decode": 64}

What is timed, for every peer:
  prefill = feeding the whole prompt and getting the logits of its last token
            (and picking the first token greedily from them);
  decode  = the next n_decode steps, each one forward pass on the previous
            token plus a greedy pick; EOS is ignored (never stops early).
Each peer uses exactly `threads` compute threads (genai: ORT intra-op
threads, inter-op 1; llama.cpp: n_threads = n_threads_batch).

The converted artifacts are cached in work_dir (keyed by the checkpoint's
config and the options) together with the time the conversion took.

convert_hf_to_gguf.py recognises a BPE pre-tokenizer by hashing the ids the
tokenizer gives for a test string.  The random-weight checkpoints of
benchmarks/checkpoints.py use a self-trained BPE whose pre-tokenizer is
exactly Qwen2's (same split regex + ByteLevel) but whose ids differ, so the
hash is unknown.  The converter is therefore run through a small wrapper
(`peers.py --_convert-gguf`, below) that answers "qwen2" when, and only when,
tokenizer.json's normalizer and pre-tokenizer are Qwen2's; any other unknown
tokenizer still fails as upstream does.

CLI (interleaved rounds, medians):
    python benchmarks/peers.py HF_DIR --work DIR --prompt-len 128 --decode 64 --repeat 5 [--json out.json]
Each round also records how much of the machine other processes used
(`other_load`); --max-other-load re-measures rounds taken while it was busy.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

# --------------------------------------------------------------------------
# common
# --------------------------------------------------------------------------

LLAMA_QTYPES = ("Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "MXFP4_MOE", "BF16", "F16", "F32")


def timing(n_prompt: int, n_decode: int, t0: float, t1: float, t2: float) -> dict:
    """What every Runner.measure returns: prefill ran from t0 to t1, decode from t1 to t2."""
    return {"prefill_tok_s": n_prompt / (t1 - t0), "decode_tok_s": n_decode / (t2 - t1),
            "n_prompt": n_prompt, "n_decode": n_decode}


class Runner:
    """A prepared peer.  measure() may be called many times."""

    name: str = "?"
    info: dict

    def measure(self, prompt_ids: list[int], n_decode: int, threads: int = 2) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _one_line_error(log: Path, what: str) -> str:
    """The last exception-looking line of a log, for a one-line RuntimeError."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    pick = ""
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "NotImplementedError")) or head.startswith(("ERROR", "error")):
            pick = ln
            break
    if not pick and lines:
        pick = lines[-1]
    return f"{what} failed: {pick[:400]} (log: {log})"


def _checkpoint_key(hf_dir: Path, extra: dict) -> str:
    """Identifies a conversion: the checkpoint's config + weight index/sizes + options."""
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "model.safetensors.index.json"):
        p = hf_dir / name
        if p.exists():
            h.update(p.read_bytes())
    for p in sorted(hf_dir.glob("*.safetensors")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _cached(meta_path: Path, key: str, artifact: Path) -> dict | None:
    if meta_path.exists() and artifact.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            return None
        if meta.get("key") == key:
            return meta
    return None


def _run_logged(cmd: list[str], log: Path, what: str, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    dt = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(_one_line_error(log, what))
    return dt


def _check_hf_dir(hf_dir: Path) -> None:
    if not (hf_dir / "config.json").is_file():
        raise RuntimeError(f"{hf_dir} is not a Hugging Face checkpoint folder (no config.json)")


def _dir_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# --------------------------------------------------------------------------
# onnxruntime-genai
# --------------------------------------------------------------------------


class GenaiRunner(Runner):
    def __init__(self, model_dir: Path, name: str, info: dict):
        self.model_dir = model_dir
        self.name = name
        self.info = info
        self._model = None
        self._threads = None

    def _load(self, threads: int):
        import onnxruntime_genai as og

        if self._model is None or self._threads != threads:
            self._model = None
            cfg = og.Config(str(self.model_dir))
            opts = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
            self._model = og.Model(cfg)
            self._threads = threads
        return self._model

    def measure(self, prompt_ids, n_decode, threads=2):
        import onnxruntime_genai as og

        model = self._load(threads)
        n = len(prompt_ids)
        total = n + n_decode + 1
        params = og.GeneratorParams(model)
        # min_length == max_length: EOS is masked, so exactly n_decode steps run.
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=1)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(list(prompt_ids))  # runs the prompt, computes logits
        gen.generate_next_token()  # greedy pick from the prompt's logits (no model run)
        t1 = time.perf_counter()
        for _ in range(n_decode):
            gen.generate_next_token()  # one forward pass on the last token + pick
        t2 = time.perf_counter()
        got = len(gen.get_sequence(0))
        del gen
        if got != total:
            raise RuntimeError(f"{self.name}: expected {total} tokens, got {got}")
        return timing(n, n_decode, t0, t1, t2)

    def close(self):
        self._model = None


def prepare_genai(hf_dir, work_dir, precision: str = "int4", extra_options: dict | None = None) -> Runner:
    """Convert hf_dir with the onnxruntime-genai model builder (cached in work_dir)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"onnxruntime-genai is not installed (pip install onnxruntime-genai onnx-ir): {e}") from None
    try:
        import onnx_ir  # noqa: F401  (the builder needs it; not a dependency of the wheel)
    except ImportError:
        raise RuntimeError("onnxruntime-genai's model builder needs onnx-ir (pip install onnx-ir)") from None
    hf_dir, work_dir = Path(hf_dir).resolve(), Path(work_dir).resolve()
    _check_hf_dir(hf_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    extra = dict(extra_options or {})
    tag = f"genai-{precision}" + ("-" + "-".join(f"{k}={v}" for k, v in sorted(extra.items())) if extra else "")
    out = work_dir / tag
    meta_path = work_dir / f"{tag}.meta.json"
    key = _checkpoint_key(hf_dir, {"precision": precision, **extra, "genai": _version("onnxruntime_genai")})
    meta = _cached(meta_path, key, out / "genai_config.json")
    if meta is None:
        tmp = work_dir / f"{tag}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(tmp),
               "-p", precision, "-e", "cpu", "-c", str(work_dir / "genai-cache")]
        if extra:
            cmd += ["--extra_options"] + [f"{k}={v}" for k, v in extra.items()]
        env = dict(os.environ, TQDM_DISABLE="1")
        dt = _run_logged(cmd, work_dir / f"{tag}.log", f"onnxruntime-genai builder ({precision})", env)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        shutil.rmtree(work_dir / "genai-cache", ignore_errors=True)
        meta = {"key": key, "convert_s": round(dt, 1), "command": " ".join(cmd), "bytes": _dir_size(out)}
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return GenaiRunner(out, tag, meta)


# --------------------------------------------------------------------------
# llama.cpp (llama-cpp-python)
# --------------------------------------------------------------------------

_LOG_CB = None


def _llama_quiet(llama_cpp) -> None:
    global _LOG_CB
    if _LOG_CB is None:
        _LOG_CB = llama_cpp.llama_log_callback(lambda level, text, user: None)
        llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


class LlamaCppRunner(Runner):
    def __init__(self, gguf: Path, name: str, info: dict):
        import llama_cpp

        self.lc = llama_cpp
        self.name = name
        self.info = info
        self.gguf = gguf
        _llama_quiet(llama_cpp)
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.ctx = None
        self.n_ctx = 0
        self.n_batch = 512

    def _context(self, need: int, threads: int):
        lc = self.lc
        if self.ctx is None or need > self.n_ctx:
            if self.ctx is not None:
                lc.llama_free(self.ctx)
                self.ctx = None
            cp = lc.llama_context_default_params()
            self.n_ctx = max(512, -(-need // 256) * 256)
            cp.n_ctx = self.n_ctx
            cp.n_batch = self.n_batch
            cp.n_ubatch = self.n_batch
            cp.n_seq_max = 1
            cp.n_threads = threads
            cp.n_threads_batch = threads
            if self.info.get("kv") == "q8_0":        # a quantized V cache needs flash attention
                cp.type_k = cp.type_v = 8            # GGML_TYPE_Q8_0
                if hasattr(cp, "flash_attn_type"):
                    cp.flash_attn_type = 1           # LLAMA_FLASH_ATTN_TYPE_ENABLED
                else:
                    cp.flash_attn = True
            self.ctx = lc.llama_init_from_model(self.model, cp)
            if not self.ctx:
                raise RuntimeError(f"{self.name}: llama_init_from_model failed")
        lc.llama_set_n_threads(self.ctx, threads, threads)
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        return self.ctx

    def _eval(self, ctx, toks: list[int]):
        lc = self.lc
        for i in range(0, len(toks), self.n_batch):
            part = toks[i : i + self.n_batch]
            arr = (lc.llama_token * len(part))(*part)
            rc = lc.llama_decode(ctx, lc.llama_batch_get_one(arr, len(part)))
            if rc != 0:
                raise RuntimeError(f"{self.name}: llama_decode returned {rc}")
        logits = lc.llama_get_logits_ith(ctx, -1)
        return _argmax(logits, self.n_vocab)

    def measure(self, prompt_ids, n_decode, threads=2):
        n = len(prompt_ids)
        ctx = self._context(n + n_decode + 1, threads)
        t0 = time.perf_counter()
        tok = self._eval(ctx, list(prompt_ids))
        t1 = time.perf_counter()
        for _ in range(n_decode):
            tok = self._eval(ctx, [tok])
        t2 = time.perf_counter()
        return timing(n, n_decode, t0, t1, t2)

    def close(self):
        if self.ctx is not None:
            self.lc.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            self.lc.llama_model_free(self.model)
            self.model = None


def _argmax(ptr, n: int) -> int:
    import numpy as np

    return int(np.ctypeslib.as_array(ptr, shape=(n,)).argmax())


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod.replace("_", "-"))
    except Exception:
        return "?"


def find_gguf_converter(work_dir: Path) -> Path:
    """Directory holding llama.cpp's convert_hf_to_gguf.py (with conversion/ and gguf-py/).

    Looked for in $EDGERT_LLAMA_CPP_SRC, then work_dir/llama.cpp-src; else the
    sdist of the installed llama-cpp-python version is fetched with
    `pip download` and its vendor/llama.cpp converter unpacked there."""
    env = os.environ.get("EDGERT_LLAMA_CPP_SRC")
    if env:
        p = Path(env)
        if not (p / "convert_hf_to_gguf.py").exists():
            raise RuntimeError(f"EDGERT_LLAMA_CPP_SRC={env} holds no convert_hf_to_gguf.py")
        return p
    dest = work_dir / "llama.cpp-src"
    if (dest / "convert_hf_to_gguf.py").exists():
        return dest
    ver = _version("llama_cpp_python")
    sd = work_dir / "sdist"
    sd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", str(sd),
           f"llama-cpp-python=={ver}"]
    _run_logged(cmd, work_dir / "sdist.log", "pip download of the llama-cpp-python sdist")
    tars = sorted(sd.glob("llama_cpp_python-*.tar.gz"))
    if not tars:
        raise RuntimeError(f"no llama-cpp-python sdist in {sd}")
    tmp = work_dir / "llama.cpp-src.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tars[-1]) as tf:
        prefix = tf.getmembers()[0].name.split("/")[0] + "/vendor/llama.cpp/"
        want = [m for m in tf.getmembers()
                if m.name.startswith(prefix)
                and (m.name[len(prefix):] in ("convert_hf_to_gguf.py", "LICENSE")
                     or m.name[len(prefix):].startswith(("conversion/", "gguf-py/")))]
        for m in want:
            m.name = m.name[len(prefix):]
        tf.extractall(tmp, members=want, filter="data")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def prepare_llamacpp(hf_dir, work_dir, qtype: str = "Q4_0", outtype: str = "bf16", src_dir=None) -> Runner:
    """Convert hf_dir to GGUF (`outtype` bf16, or f32 for quality runs) and quantize it to qtype
    (cached in work_dir). src_dir: where the converter is looked for or unpacked (default
    work_dir), so that several checkpoints can share one copy."""
    try:
        import llama_cpp
    except ImportError as e:
        raise RuntimeError(f"llama-cpp-python is not installed (pip install llama-cpp-python gguf): {e}") from None
    qtype = qtype.upper()
    if qtype not in LLAMA_QTYPES:
        raise ValueError(f"unknown qtype {qtype}; choose from {', '.join(LLAMA_QTYPES)}")
    if qtype != "F32" and not hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}"):
        raise RuntimeError(f"this llama-cpp-python has no LLAMA_FTYPE_MOSTLY_{qtype}")
    hf_dir, work_dir = Path(hf_dir).resolve(), Path(work_dir).resolve()
    _check_hf_dir(hf_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    if outtype not in ("bf16", "f32"):
        raise ValueError(f"outtype must be bf16 or f32, not {outtype!r}")

    # 1. HF -> bf16/f32 GGUF (shared by every qtype)
    base = work_dir / f"llamacpp-{outtype}.gguf"
    base_meta_path = work_dir / f"llamacpp-{outtype}.meta.json"
    base_key = _checkpoint_key(hf_dir, {"outtype": outtype, "llama_cpp": _version("llama_cpp_python")})
    if qtype != outtype.upper():       # a cached quantized file no longer needs its base GGUF
        tag = qtype if outtype == "bf16" else f"{qtype}-from-{outtype}"
        out = work_dir / f"llamacpp-{tag}.gguf"
        meta = _cached(work_dir / f"llamacpp-{tag}.meta.json", base_key + "-" + qtype, out)
        if meta is not None:
            return LlamaCppRunner(out, f"llama.cpp-{qtype}", meta)
    base_meta = _cached(base_meta_path, base_key, base)
    if base_meta is None:
        conv = find_gguf_converter(Path(src_dir).resolve() if src_dir else work_dir)
        tmp = base.with_suffix(".tmp")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_convert-gguf", str(conv),
               str(hf_dir), "--outfile", str(tmp), "--outtype", outtype]
        if json.loads((Path(hf_dir) / "config.json").read_text()).get("model_type", "").startswith("qwen3_5"):
            cmd.append("--no-mtp")      # a text-only Qwen3.5 checkpoint has no multi-token-prediction head
        dt = _run_logged(cmd, work_dir / f"llamacpp-{outtype}.log", "convert_hf_to_gguf.py")
        tmp.rename(base)
        base_meta = {"key": base_key, "convert_s": round(dt, 1), "command": " ".join(cmd), "bytes": _dir_size(base)}
        base_meta_path.write_text(json.dumps(base_meta, indent=2) + "\n")

    # 2. bf16/f32 GGUF -> qtype
    if qtype == outtype.upper():
        out, meta = base, dict(base_meta, quantize_s=0.0)
    else:
        tag = qtype if outtype == "bf16" else f"{qtype}-from-{outtype}"
        out = work_dir / f"llamacpp-{tag}.gguf"
        meta_path = work_dir / f"llamacpp-{tag}.meta.json"
        key = base_key + "-" + qtype
        meta = _cached(meta_path, key, out)
        if meta is None:
            tmp = out.with_suffix(".tmp")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_quantize", str(base), str(tmp), qtype]
            dt = _run_logged(cmd, work_dir / f"llamacpp-{tag}.log", f"llama_model_quantize {qtype}")
            tmp.rename(out)
            meta = {"key": key, "convert_s": base_meta["convert_s"], "quantize_s": round(dt, 1),
                    "command": " ".join(cmd), "bytes": _dir_size(out)}
            meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return LlamaCppRunner(out, f"llama.cpp-{qtype}", meta)


# --------------------------------------------------------------------------
# helpers run in a subprocess
# --------------------------------------------------------------------------

QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def has_qwen2_pretokenizer(hf_dir: Path) -> bool:
    """True when tokenizer.json pre-tokenizes exactly as Qwen2 does."""
    try:
        tj = json.loads((Path(hf_dir) / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return False
    if tj.get("model", {}).get("type") != "BPE":
        return False
    norm = tj.get("normalizer")
    if norm not in (None, {"type": "NFC"}):
        return False
    pre = tj.get("pre_tokenizer") or {}
    seq = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not seq or len(seq) != 2:
        return False
    split, bl = seq
    return (
        split.get("type") == "Split"
        and split.get("pattern") == {"Regex": QWEN2_SPLIT_REGEX}
        and split.get("behavior") == "Isolated"
        and not split.get("invert", False)
        and bl.get("type") == "ByteLevel"
        and not bl.get("add_prefix_space", False)
        and not bl.get("use_regex", True)
    )


def _convert_gguf_main(argv: list[str]) -> int:
    """python peers.py --_convert-gguf CONVERTER_DIR HF_DIR [converter args...]

    Runs llama.cpp's convert_hf_to_gguf.py unchanged, except that a BPE
    tokenizer whose hash is unknown but whose pre-tokenizer is exactly
    Qwen2's is reported to it as "qwen2"."""
    import runpy

    conv_dir, hf_dir, rest = Path(argv[0]), argv[1], argv[2:]
    # the converter's own gguf-py before any pip-installed gguf, as the script does itself
    if "NO_LOCAL_GGUF" not in os.environ:
        sys.path.insert(0, str(conv_dir / "gguf-py"))
    sys.path.insert(0, str(conv_dir))
    from conversion import base as conv_base  # noqa: E402

    owner = next(c for c in conv_base.__dict__.values()
                 if isinstance(c, type) and "get_vocab_base_pre" in c.__dict__)
    upstream = owner.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return upstream(self, tokenizer)
        except NotImplementedError:
            if has_qwen2_pretokenizer(self.dir_model):
                print("peers.py: unknown BPE hash, but tokenizer.json has Qwen2's pre-tokenizer -> 'qwen2'",
                      file=sys.stderr)
                return "qwen2"
            raise

    owner.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(conv_dir / "convert_hf_to_gguf.py"), hf_dir] + rest
    runpy.run_path(str(conv_dir / "convert_hf_to_gguf.py"), run_name="__main__")
    return 0


def _quantize_main(argv: list[str]) -> int:
    """python peers.py --_quantize IN.gguf OUT.gguf QTYPE [NTHREAD]"""
    import llama_cpp

    src, dst, qtype = argv[0], argv[1], argv[2].upper()
    nthread = int(argv[3]) if len(argv) > 3 else 2
    llama_cpp.llama_backend_init()
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    p.nthread = nthread
    p.allow_requantize = True       # gpt-oss's MXFP4 experts (kept as MXFP4 by the converter) into Q4_0 etc.
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    if rc != 0:
        print(f"RuntimeError: llama_model_quantize returned {rc}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------
# CLI: interleaved rounds
# --------------------------------------------------------------------------

DEFAULT_PEERS = "genai-int4,llamacpp-Q4_0,llamacpp-Q4_K_M"


def prepare(peer: str, hf_dir, work_dir, genai_extra: dict | None = None) -> Runner:
    kind, _, arg = peer.partition("-")
    if kind == "genai":
        return prepare_genai(hf_dir, work_dir, precision=arg or "int4", extra_options=genai_extra)
    if kind == "llamacpp":
        return prepare_llamacpp(hf_dir, work_dir, qtype=arg or "Q4_0")
    raise ValueError(f"unknown peer {peer!r} (genai-int4, genai-int8, llamacpp-Q4_0, llamacpp-Q4_K_M, ...)")


def _cpu_times() -> tuple[float, float, float]:
    """(wall s, whole-machine busy CPU s, CPU s of this process and its finished children)."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    busy = (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


def other_load(before, after) -> float:
    """Share of the machine's cores that other processes kept busy between two _cpu_times()."""
    wall = after[0] - before[0]
    other = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, min(1.0, other / (wall * (os.cpu_count() or 1)))) if wall > 0 else 0.0


def make_prompt(hf_dir, n: int, seed: int = 0) -> list[int]:
    """n token ids drawn uniformly (seeded) from the tokenizer's ordinary vocabulary."""
    import numpy as np

    tj = json.loads((Path(hf_dir) / "tokenizer.json").read_text())
    n_vocab = len(tj["model"]["vocab"])
    special = {t["id"] for t in tj.get("added_tokens", [])}
    ids = [i for i in range(n_vocab) if i not in special]
    rng = np.random.default_rng(seed)
    return [ids[i] for i in rng.integers(0, len(ids), n)]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--_convert-gguf":
        return _convert_gguf_main(argv[1:])
    if argv and argv[0] == "--_quantize":
        return _quantize_main(argv[1:])
    ap = argparse.ArgumentParser(description="Benchmark onnxruntime-genai and llama.cpp on a HF checkpoint.")
    ap.add_argument("hf_dir")
    ap.add_argument("--work", required=True, help="cache folder for converted models")
    ap.add_argument("--peers", default=DEFAULT_PEERS, help=f"comma-separated (default {DEFAULT_PEERS})")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-other-load", type=float, default=None, metavar="FRACTION",
                    help="re-measure a round while other processes kept more than this share of the cores busy")
    ap.add_argument("--retries", type=int, default=3, help="re-measurements allowed per round (with --max-other-load)")
    ap.add_argument("--genai-option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra_options for the genai builder, e.g. prune_lm_head=true (repeatable)")
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args(argv)
    genai_extra = dict(o.split("=", 1) for o in a.genai_option)
    if not (Path(a.hf_dir) / "config.json").is_file():
        ap.error(f"{a.hf_dir} is not a Hugging Face checkpoint folder (no config.json)")

    runners: list[Runner] = []
    errors: dict[str, str] = {}
    for peer in a.peers.split(","):
        peer = peer.strip()
        t0 = time.perf_counter()
        try:
            r = prepare(peer, a.hf_dir, a.work, genai_extra)
        except RuntimeError as e:
            errors[peer] = str(e)
            print(f"{peer}: unavailable: {e}", flush=True)
            continue
        print(f"{peer}: ready in {time.perf_counter() - t0:.1f} s "
              f"(conversion {r.info.get('convert_s')} s"
              + (f", quantize {r.info['quantize_s']} s" if "quantize_s" in r.info else "")
              + f", {r.info.get('bytes', 0) / 1e6:.0f} MB)", flush=True)
        runners.append(r)

    prompt = make_prompt(a.hf_dir, a.prompt_len, a.seed)
    load_before = os.getloadavg()
    rounds: dict[str, list[dict]] = {r.name: [] for r in runners}
    for i in range(a.warmup + a.repeat):
        for r in runners:
            m = None
            for attempt in range(1 + (a.retries if a.max_other_load is not None else 0)):
                c0 = _cpu_times()
                try:
                    m = r.measure(prompt, a.decode, threads=a.threads)
                except Exception as e:  # a peer that breaks mid-run is reported, not fatal
                    errors[r.name] = f"measure failed: {e}"
                    m = None
                    break
                m["other_load"] = other_load(c0, _cpu_times())
                m["retries"] = attempt
                if a.max_other_load is None or m["other_load"] <= a.max_other_load:
                    break
            if m is None:
                continue
            if i >= a.warmup:
                rounds[r.name].append(m)
                print(f"round {i - a.warmup + 1}/{a.repeat} {r.name:>18}: prefill {m['prefill_tok_s']:8.1f} tok/s"
                      f"  decode {m['decode_tok_s']:7.1f} tok/s  (other processes {m['other_load']:4.0%}"
                      + (f", {m['retries']} retries" if m["retries"] else "") + ")",
                      flush=True)

    load_after = os.getloadavg()
    summary = {}
    for r in runners:
        ms = rounds[r.name]
        if not ms:
            continue
        pre = [m["prefill_tok_s"] for m in ms]
        dec = [m["decode_tok_s"] for m in ms]
        summary[r.name] = {
            "prefill_tok_s": statistics.median(pre),
            "decode_tok_s": statistics.median(dec),
            "prefill_range": [min(pre), max(pre)],
            "decode_range": [min(dec), max(dec)],
            "other_load_median": statistics.median(m["other_load"] for m in ms),
            "rounds": len(ms),
            "convert_s": r.info.get("convert_s"),
            "quantize_s": r.info.get("quantize_s"),
            "bytes": r.info.get("bytes"),
        }
    print()
    print(f"{Path(a.hf_dir).name}: prompt {a.prompt_len}, decode {a.decode}, threads {a.threads}, "
          f"median of {a.repeat} interleaved rounds; load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"{'peer':<20} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode min-max':>15} {'size MB':>8}"
          f" {'other load':>10}")
    for name, s in summary.items():
        rng = f"{s['decode_range'][0]:.1f}-{s['decode_range'][1]:.1f}"
        print(f"{name:<20} {s['prefill_tok_s']:>14.1f} {s['decode_tok_s']:>13.1f} {rng:>15}"
              f" {(s['bytes'] or 0) / 1e6:>8.0f} {s['other_load_median']:>10.0%}")
    for name, e in errors.items():
        print(f"{name:<20} ERROR: {e}")
    if a.json:
        out = {
            "hf_dir": str(a.hf_dir),
            "prompt_len": a.prompt_len,
            "decode": a.decode,
            "threads": a.threads,
            "repeat": a.repeat,
            "max_other_load": a.max_other_load,
            "genai_options": genai_extra,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "summary": summary,
            "rounds": rounds,
            "errors": errors,
            "versions": {m: _version(m) for m in ("onnxruntime", "onnxruntime_genai", "llama_cpp_python")},
        }
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    for r in runners:
        r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
