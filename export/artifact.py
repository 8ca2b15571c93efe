"""HF folder -> artifact folder, written atomically.

Everything goes into a hidden temporary folder beside OUT and is renamed into place only
when complete, so an interrupted or failed export leaves nothing half-written behind.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from edgert.artifact import TEXT_FILES, manifest_sha256
from edgert.limits import read_text_file

from .archs import model_for
from .calibrate import SELF_SEED, CalibrationError, collect, sample_self
from .checkpoint import Checkpoint, CheckpointError, _read_json
from .decoder import UnsupportedModel
from .graph import IR_VERSION, KV_TYPES, Graph, Recipe
from .hub import HubError, looks_like_repo_id, resolve
from .outdir import OutError, check_out, signals_unwind, writing
from .quantize import DEFAULT_RECIPE, RECIPES, TABLE_BLOCK, Quantizer, Survey, default_budget, plan_budget, workers
from .validate import text_config, validate

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DEFAULT_MAX_CONTEXT = 32768
DEFAULT_CALIBRATION = "self"   # --calib when none is given (measured: README, "Quantization")
BUNDLED_MODEL = Path(__file__).parent / "data" / "stories260K"   # for `edgert demo` and tests   # rotary tables cost 2 x context x head_dim/2 floats


class ExportError(Exception):
    """One line for the user."""


def _progress(total: int, label: str):
    tty = sys.stderr.isatty()
    state = {"n": 0, "t0": time.time()}

    def tick():
        state["n"] += 1
        if tty:
            n = state["n"]
            bar = "#" * (30 * n // total) + "." * (30 - 30 * n // total)
            el = time.time() - state["t0"]
            eta = f", ETA {el * (total - n) / n:.0f}s " if n < total else " "
            sys.stderr.write(f"\r{label} [{bar}] {n}/{total} layers {el:.0f}s{eta}")
            if n == total:
                sys.stderr.write("\n")
            sys.stderr.flush()
    return tick


def _progress_tokens(label: str):
    """A progress line with an ETA for the self-calibration's sampling (on a terminal)."""
    t0, tty = time.time(), sys.stderr.isatty()

    def tick(done: int, total: int):
        if tty:
            el = time.time() - t0
            eta = el * (total - done) / max(done, 1)
            sys.stderr.write(f"\r{label}: {done}/{total} tokens {el:.0f}s, ETA {eta:.0f}s ")
            if done >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()
    return tick


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _special_tokens(src: Path, ckpt: Checkpoint) -> dict:
    """bos / eos ids (generation_config first, as transformers does) and the reasoning markers."""
    cfg, gen = text_config(ckpt.config), ckpt.generation_config
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    out = {"bos": gen.get("bos_token_id", cfg.get("bos_token_id")), "eos": eos,
           "pad": gen.get("pad_token_id", cfg.get("pad_token_id"))}
    tok = _read_json(src / "tokenizer.json")
    lookup = {t["content"]: t["id"] for t in tok.get("added_tokens", []) if isinstance(t, dict)}
    vocab = tok.get("model", {}).get("vocab", {})
    for key, text in (("think_start", "<think>"), ("think_end", "</think>")):
        out[key] = lookup.get(text, vocab.get(text) if isinstance(vocab, dict) else None)
    for key in ("pad", "think_start", "think_end"):      # optional: an id the model cannot emit (pad -1) means none
        if not (isinstance(out[key], int) and 0 <= out[key] < cfg["vocab_size"]):
            out[key] = None
    return out


def export(model_dir, out, bits: int = 4, block_size: int | None = None, context: int | None = None, force: bool = False,
           embed_bits: int = 8, progress: bool = True, recipe: str = DEFAULT_RECIPE, calib=None,
           checkpoint=None, kv_cache: str | None = None, revision: str | None = None,
           bits_per_weight: float | None = None, via: str | None = None) -> dict:
    """Export a Hugging Face folder (or a hub repo id ORG/NAME, at `revision`: see hub.py) to an
    edgert artifact folder; returns the manifest.
    block_size: the projections' block (None: each linear's own, quantize.auto_block; the tables 32).
    recipe: how int4 codes are chosen (quantize.RECIPES); calib: "self", "built-in" or a calibration
    text file for "gptq"; bits_per_weight: a byte budget for the projections (mixed precision).
    `checkpoint` replaces the folder's weights (synthetic.py); config and tokenizer still come from the folder.
    kv_cache: the precision of the KV cache the graphs read and write, int8, fp16 or fp32 (default: int8,
    fp16 for heads under 32 wide, fp32 for the unquantized --bits 32 reference: Decoder.default_kv_cache).
    via: "native" (edgert's own builders), "optimum" (optimum-onnx's graph, onnxruntime's
    quantizer: optimum_route.py) or None: native when edgert builds the model_type, else optimum."""
    t0 = time.time()
    src, out = Path(model_dir), Path(out)
    if via not in (None, "native", "optimum"):
        raise ExportError(f"--via must be native or optimum, not {via!r}")
    explicit = {"--recipe": recipe != DEFAULT_RECIPE, "--calib": calib is not None, "--kv-cache": kv_cache is not None,
                "--bits-per-weight": bits_per_weight is not None, "--embed-bits": embed_bits != 8}
    if recipe not in RECIPES:
        raise ExportError(f"--recipe must be one of {', '.join(RECIPES)}, not {recipe!r}")
    if kv_cache is not None and kv_cache not in KV_TYPES:
        raise ExportError(f"--kv-cache must be one of {', '.join(KV_TYPES)}, not {kv_cache!r}")
    if calib and recipe != "gptq":
        raise ExportError(f"--calib is for --recipe gptq; --recipe {recipe} uses no calibration")
    calib = DEFAULT_CALIBRATION if calib is None else calib
    self_calib = str(calib) == "self"
    calib_text = None if self_calib else _calibration_text(None if str(calib) == "built-in" else calib)
    if bits not in (4, 8, 32):
        raise ExportError(f"--bits must be 4, 8 or 32, not {bits}")
    if embed_bits not in (4, 8, 32):
        raise ExportError(f"--embed-bits must be 4, 8 or 32, not {embed_bits}")
    if bits_per_weight is not None:
        if bits != 4 or recipe != "gptq":
            raise ExportError("--bits-per-weight mixes int4 and int8 layouts from the calibration: it needs --bits 4 "
                              "and --recipe gptq")
        if not 4.0 < bits_per_weight <= 9.0:
            raise ExportError(f"--bits-per-weight must be above 4 and at most 9 (int8 blocks of 64), not {bits_per_weight:g}")
    if block_size is not None and block_size not in (16, 32, 64, 128, 256):
        raise ExportError(f"--block-size must be one of 16, 32, 64, 128, 256, not {block_size}")
    if checkpoint is None and looks_like_repo_id(model_dir):
        try:
            src = resolve(str(model_dir), revision)
        except HubError as e:
            raise ExportError(str(e)) from None
    elif revision:
        raise ExportError(f"--revision is for Hugging Face repo ids; {model_dir} is a folder")
    try:
        check_out(out, force, src)           # fail fast; checked again under the lock and before the rename
    except OutError as e:
        raise ExportError(str(e)) from None
    if checkpoint is None and _route(src, via) == "optimum":
        native_only = [flag for flag, given in explicit.items() if given]
        if native_only:
            raise ExportError(f"{', '.join(native_only)}: native export only; the optimum route quantizes with "
                              f"onnxruntime's round-to-nearest MatMulNBits and keeps an fp32 KV cache")
        return _export_optimum(src, out, bits, block_size or TABLE_BLOCK, context, force, progress, t0)
    try:
        ckpt = Checkpoint(src) if checkpoint is None else checkpoint
        validate(ckpt, tensors=checkpoint is None)     # before any graph, temporary folder or large array
        model = model_for(ckpt.config)
    except (CheckpointError, UnsupportedModel) as e:
        raise ExportError(str(e)) from None
    except OSError as e:           # a source folder or file we may not read
        raise ExportError(f"{e.filename or src}: cannot read it ({e.strerror or e})") from None
    if not (src / "tokenizer.json").is_file():
        raise ExportError(f"{src}: no tokenizer.json (the runtime needs the fast-tokenizer file)")
    _check_chat_template(src)
    kv_cache = kv_cache or ("fp32" if bits == 32 else model.default_kv_cache)
    max_ctx = min(model.max_positions, DEFAULT_MAX_CONTEXT)
    context = context or max_ctx
    if context < 1 or context > model.max_positions:
        raise ExportError(f"--context must be between 1 and the model's {model.max_positions} positions, not {context}")

    g = None
    try:
        with signals_unwind(), writing(out, force, src) as (tmp, commit):
            recipe = Recipe(bits=bits, block_size=block_size or 0, embed_bits=embed_bits, method=recipe, kv_cache=kv_cache)
            calibrated = recipe.method == "gptq" and bits != 32 and 4 in (bits, embed_bits)
            stats, plan = None, None
            if bits_per_weight is None and block_size is None and bits == 4 and calibrated:
                bits_per_weight = default_budget(model.hidden)       # narrow models only
            survey = Survey if bits_per_weight is not None else None
            if calibrated and self_calib:
                eos = _special_tokens(src, ckpt)["eos"]
                stats = sample_self(model, ckpt, src, tmp / "calibration", eos=eos, survey=survey,
                                    progress=_progress_tokens("calibration: sampling the model's own text") if progress else None)
            elif calibrated:
                stats = collect(model, ckpt, src, calib_text, tmp / "calibration", survey=survey,
                                name=None if str(calib) == "built-in" else str(calib))
            if stats is None and hasattr(ckpt, "kv_ranges"):    # random weights (synthetic.py): the ranges
                stats = ckpt.kv_ranges(model)                     # calibration would find, for the int8 cache
            if survey is not None:
                surveyed = stats.survey if stats is not None else None
                if (not surveyed or not surveyed.linears) and explicit["--bits-per-weight"]:
                    raise ExportError("--bits-per-weight: this model has no linears to budget")
                try:
                    plan = plan_budget(surveyed, stats, bits_per_weight) if surveyed and surveyed.linears else None
                except ValueError as e:
                    if explicit["--bits-per-weight"]:
                        raise ExportError(str(e)) from None
                    plan = None     # the default budget below what padded rows cost at their cheapest: uniform
                bits_per_weight = bits_per_weight if plan else None
            g = Graph(tmp / "model.onnx.data")
            g.quantizer = Quantizer(recipe.method, stats, plan, workers())
            tick = _progress(model.n_layers, f"export {ckpt.config.get('model_type')}") if progress else (lambda: None)
            quant = model.build(g, ckpt, recipe, context, tick)
            g.quantizer.finish()          # the linears still in GPTQ's processes
            graphs = {}
            for name, tags in g.variants().items():   # graphs over one data file (see Graph.variants)
                graphs[name] = "model.onnx" if name == "default" else f"model.{name}.onnx"
                # what the graph itself needs of the runtime, which checks it against edgert.json at load
                g.save(tmp / graphs[name], producer="edgert", tags=tags,
                       metadata={"edgert.kv_headroom": model.kv_headroom} if model.kv_headroom else None)
            g.close()
            shutil.rmtree(tmp / "calibration", ignore_errors=True)
            total_params = sum(int(np.prod(ckpt.shape(n))) for n in ckpt.names if model.counts(n))
            manifest = _seal(tmp, src, ckpt, graphs, {
                "architecture": ckpt.config.get("model_type"),
                "model": {"layers": model.n_layers, "hidden": model.hidden, "heads": model.heads,
                          "kv_heads": model.kv_heads, "head_dim": model.padded_head_dim, "vocab": model.vocab,
                          "parameters": total_params, **model.extra_manifest(),
                          **({"kv_headroom": model.kv_headroom} if model.kv_headroom else {}),
                          **model.layer_manifest()},
                "context_length": context,
                "quantization": {**quant, "router": 32, "int4": "asymmetric (zero point per block)",
                                 "int8": "symmetric", "accuracy_level": 4, "recipe": recipe.method,
                                 # the int8 cache's calibrated scales: every graph's cache is codes only
                                 **({"kv_scales": "per-channel"} if any(n.endswith("kv8gqa") for n in graphs) else {}),
                                 **({"calibration": _calib_name(calib), "calibration_tokens": stats.tokens,
                                     **({"calibration_seed": SELF_SEED} if self_calib else {})} if stats and stats.tokens else {}),
                                 **_tensor_table(g.quantizer, bits_per_weight)}})
            commit()
    except (CheckpointError, UnsupportedModel) as e:
        raise ExportError(str(e)) from None
    except CalibrationError as e:
        raise ExportError(f"calibration: {e}") from None
    except KeyError as e:
        raise ExportError(f"{src}: config.json lacks {e.args[0]!r}, which this {ckpt.config.get('model_type')} model needs") from None
    except OSError as e:
        raise ExportError(f"writing {out}: {e.strerror or e}") from None
    except OutError as e:
        raise ExportError(str(e)) from None
    except MemoryError as e:
        raise ExportError(f"out of memory: {str(e) or 'an allocation failed'}") from None
    except ExportError:
        raise
    except Exception as e:
        # a checkpoint that passed validation but still breaks the build: one line, never a traceback
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ExportError(f"{src}: cannot export this checkpoint ({type(e).__name__}: {first})") from None
    finally:
        if g is not None:
            g.quantizer.close()
            g.close()
    return _summarised(manifest, t0)


CHECK_CHAT = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi. How can I help?"}]


def _check_chat_template(src: Path) -> None:
    """The model's chat template must render CHECK_CHAT with the generation prompt in the runtime's
    own sandbox (edgert.chat.render_chat, the variables llm.LLM passes): one that cannot would export
    and then fail every later run. tokenizer_config.json must be a JSON object for the same reason."""
    from edgert.chat import load_chat_template, render_chat, tokenizer_config
    try:
        cfg = tokenizer_config(src)
        template = load_chat_template(src)
        if template is not None:
            names = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in
                     ((k, cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token"))}
            render_chat(template, CHECK_CHAT, add_generation_prompt=True, variables=names)
    except ValueError as e:       # render_chat's and tokenizer_config's one line (a template names no file)
        line = (str(e).strip().splitlines() or ["?"])[0][:300]
        raise ExportError(line if str(src) in line else f"{src}: the chat template does not render a two-message "
                          f"conversation: {line}") from None
    except OSError as e:
        raise ExportError(f"{src}: cannot read the chat template ({e.strerror or e})") from None


def _route(src: Path, via: str | None) -> str:
    """native or optimum: what --via says, else native for the model_types edgert builds and
    optimum for the others (when it is installed; a note on stderr says so)."""
    from .archs import ARCHITECTURES
    from . import optimum_route
    if via:
        return via
    try:
        model_type = _read_json(src / "config.json").get("model_type") if (src / "config.json").is_file() else None
    except (CheckpointError, AttributeError):
        return "native"          # the native path reports what is wrong with it
    except OSError as e:         # is_file on a folder we may not enter
        raise ExportError(f"{src}: cannot read it ({e.strerror or e})") from None
    if not isinstance(model_type, str) or model_type in ARCHITECTURES:
        return "native"
    if not optimum_route.available():
        raise ExportError(f"model_type {model_type!r} is not built natively (supported: {', '.join(sorted(ARCHITECTURES))}); "
                          f"to export it through optimum-onnx: {optimum_route.INSTALL}")
    print(f"edgert: model_type {model_type!r} is not built natively: exporting through optimum-onnx (--via optimum)",
          file=sys.stderr)
    return "optimum"


def _export_optimum(src: Path, out: Path, bits: int, block_size: int, context: int | None, force: bool,
                    progress: bool, t0: float) -> dict:
    """The optimum route (optimum_route.py) into the same atomic write and manifest."""
    from . import optimum_route
    try:
        ckpt = Checkpoint(src)
        optimum_route.check(src, ckpt.config)           # before torch allocates anything, before any folder
        _check_chat_template(src)
        note = (lambda line: print(line, file=sys.stderr)) if progress else (lambda line: None)
        with signals_unwind(), writing(out, force, src) as (tmp, commit):
            model, quant, max_positions = optimum_route.build(src, tmp, ckpt.config, bits, block_size, note)
            context = context or min(max_positions, DEFAULT_MAX_CONTEXT)
            if not 1 <= context <= max_positions:
                raise ExportError(f"--context must be between 1 and the model's {max_positions} positions, not {context}")
            manifest = _seal(tmp, src, ckpt, {"default": "model.onnx"}, {
                "architecture": ckpt.config.get("model_type"), "io": "optimum", "model": model,
                "context_length": context, "quantization": quant})
            commit()
    except (CheckpointError, UnsupportedModel, OutError) as e:
        raise ExportError(str(e)) from None
    except OSError as e:
        raise ExportError(f"writing {out}: {e.strerror or e}") from None
    except ExportError:
        raise
    except Exception as e:       # optimum-onnx / torch / the quantizer on a model they cannot take
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ExportError(f"{src}: optimum-onnx cannot export this model ({type(e).__name__}: {first})") from None
    return _summarised(manifest, t0)


def _summarised(manifest: dict, t0: float) -> dict:
    """The manifest plus what the CLI prints (not written to edgert.json): bytes, bits per weight, seconds."""
    size = sum(f["bytes"] for f in manifest["files"].values())
    manifest["summary"] = {"bytes": size, "bits_per_weight": 8 * size / max(manifest["model"]["parameters"], 1),
                           "seconds": time.time() - t0}
    return manifest


def _seal(tmp: Path, src: Path, ckpt, graphs: dict, fields: dict) -> dict:
    """The artifact's last step, either route: tokenizer and config files copied, every file
    hashed, edgert.json written (fields: architecture, model, context_length, quantization, ...)."""
    for name in TOKENIZER_FILES + ("generation_config.json", "config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / name)
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
             for name in [*graphs.values(), "model.onnx.data"]}
    text_files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                  for name in TEXT_FILES if (tmp / name).is_file()}      # what the runtime reads besides: for verify
    stored = sum(f["bytes"] for f in files.values())
    fields["quantization"]["bits_per_weight"] = round(8 * stored / max(fields["model"]["parameters"], 1), 3)
    manifest = {
        "format": "edgert", "format_version": FORMAT_VERSION, **fields,
        "batch": True,          # the graphs take [batch, sequence] ids: several sequences per forward
        "graphs": graphs,
        "special_tokens": _special_tokens(src, ckpt),
        "generation": {k: ckpt.generation_config[k] for k in ("do_sample", "temperature", "top_p", "top_k",
                                                              "repetition_penalty") if k in ckpt.generation_config},
        "files": files,
        "text_files": text_files,
        "versions": {"edgert": _version(), "numpy": np.__version__,
                     "onnx_ir": IR_VERSION, "python": platform.python_version()},
    }
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    (tmp / "edgert.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _tensor_table(quantizer, budget) -> dict:
    """Per quantized tensor: bits, block size and stored bytes; the projections' bits per weight
    (codes + scales + zero points over their weights) and the budget they were given."""
    from .quantize import SKIP
    chosen = getattr(quantizer, "chosen", None)
    if not chosen:
        return {}
    out = {"tensors": chosen}
    lin = [t for t in chosen if t not in SKIP]
    weights = sum(quantizer.weights.get(t, 0) for t in lin)
    if weights:
        out["linear_bits_per_weight"] = round(8 * sum(chosen[t]["bytes"] for t in lin) / weights, 4)
    if budget is not None:
        out["bits_per_weight_budget"] = budget
    return out


def _calib_name(calib) -> str:
    return "self" if str(calib) == "self" else "built-in" if str(calib) == "built-in" else Path(calib).name


def _calibration_text(path) -> str:
    """The calibration text (the built-in one when path is None); one line on any problem."""
    from .calibrate import DEFAULT_CALIB
    path = Path(path) if path else DEFAULT_CALIB
    try:
        text = read_text_file(path, what=f"--calib {path}")
    except ValueError as e:
        raise ExportError(str(e)) from None
    if not text.strip():
        raise ExportError(f"--calib {path}: the file is empty")
    return text


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("edgert")
    except Exception:
        return "0+unknown"
