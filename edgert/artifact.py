"""Read and check an artifact folder (edgert.json + model.onnx + data + tokenizer files).

`read_manifest` is the one gate every command goes through (run, bench, eval, verify, and
whatever loads an artifact): the manifest's schema (keys, types, ranges, consistency), every
file it names a plain file name inside the folder, no symbolic link leading out of it, every
external-data `location` of the graphs one of the artifact's own data files (checked here, as
onnxruntime 1.22 follows absolute and `..` locations), sizes as the manifest says. The limits
are named below (README: Security).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path

FORMAT_VERSION = 1

# ---- limits ------------------------------------------------------------------------------------
MAX_MANIFEST_BYTES = 1 << 20
MAX_LAYERS = 1024
MAX_HIDDEN = 1 << 17
MAX_HEADS = 4096
MAX_HEAD_DIM = 1024
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 21
MAX_EXPERTS = 4096
MAX_PARAMETERS = 1 << 42
MAX_FILES = 64
MAX_EOS_IDS = 64
# text files the runtime reads, and their size caps
TEXT_FILES = {"tokenizer.json": 64 << 20, "tokenizer_config.json": 16 << 20, "chat_template.jinja": 1 << 20,
              "special_tokens_map.json": 1 << 20, "generation_config.json": 1 << 20, "config.json": 1 << 20}
SPARSE_MIN_BYTES = 64 << 20    # verify refuses a larger file with less than half of it on disk (never hashes holes)
DATA_SLACK = 1 << 16           # bytes a data file may hold past its last tensor (alignment)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BITS = (4, 8, 32)


class ArtifactError(Exception):
    """An artifact that cannot be used; one line for the user."""


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_manifest(manifest, where: str = "edgert.json") -> dict:
    """The manifest's schema: raises ArtifactError naming the first bad field."""
    def bad(field, want):
        raise ArtifactError(f"{where}: {field} must be {want} (the manifest is damaged or not from edgert export)")

    def need_int(d, key, lo, hi, field=None, optional=False):
        field = field or key
        if key not in d:
            if optional:
                return None
            bad(field, f"present (an integer {lo}..{hi})")
        if not _int(d[key]) or not lo <= d[key] <= hi:
            bad(field, f"an integer {lo}..{hi}, not {str(d[key])[:40]!r}")
        return d[key]

    def need_dict(d, key, optional=False):
        if key not in d and optional:
            return {}
        if not isinstance(d.get(key), dict):
            bad(key, "an object")
        return d[key]

    if not isinstance(manifest, dict) or manifest.get("format") != "edgert":
        raise ArtifactError(f"{where}: not an edgert manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{where}: format version {str(manifest.get('format_version'))[:20]} is not supported by this "
                            f"edgert (it reads version {FORMAT_VERSION}); re-export the model or upgrade edgert")
    if not isinstance(manifest.get("architecture"), str) or not 0 < len(manifest["architecture"]) <= 64:
        bad("architecture", "a short string")
    m = need_dict(manifest, "model")
    layers = need_int(m, "layers", 1, MAX_LAYERS, "model.layers")
    need_int(m, "hidden", 1, MAX_HIDDEN, "model.hidden")
    heads = need_int(m, "heads", 1, MAX_HEADS, "model.heads")
    kv = need_int(m, "kv_heads", 1, heads, "model.kv_heads")
    if heads % kv:
        bad("model.kv_heads", f"a divisor of model.heads ({heads}), not {kv}")
    if manifest.get("io", "edgert") not in ("edgert", "optimum"):
        bad("io", "edgert or optimum (whose graph the runtime feeds through its adapter)")
    optimum = manifest.get("io") == "optimum"
    hd = need_int(m, "head_dim", 1 if optimum else 16, MAX_HEAD_DIM, "model.head_dim")
    if hd % 16 and not optimum:         # GroupQueryAttention's kernels want multiples of 16
        bad("model.head_dim", f"a multiple of 16, not {hd}")
    vocab = need_int(m, "vocab", 1, MAX_VOCAB, "model.vocab")
    params = need_int(m, "parameters", 1, MAX_PARAMETERS, "model.parameters")
    experts = need_int(m, "experts", 1, MAX_EXPERTS, "model.experts", optional=True)
    if experts is not None:
        need_int(m, "experts_per_token", 1, experts, "model.experts_per_token")
        need_int(m, "expert_ffn", 1, 1 << 20, "model.expert_ffn", optional=True)
        need_int(m, "idle_expert_parameters", 0, params, "model.idle_expert_parameters", optional=True)
        need_int(m, "expert_block_size", 16, 256, "model.expert_block_size", optional=True)
        moe = m.get("moe_layers", [])
        if not isinstance(moe, list) or len(moe) > layers or not all(_int(i) and 0 <= i < layers for i in moe):
            bad("model.moe_layers", f"a list of layer numbers below {layers}")
    need_int(m, "kv_headroom", 0, 1 << 12, "model.kv_headroom", optional=True)
    attn = m.get("attention_layers", [])
    if not isinstance(attn, list) or len(attn) > layers or not all(_int(i) and 0 <= i < layers for i in attn):
        bad("model.attention_layers", f"a list of layer numbers below {layers}")
    state = m.get("state", [])
    if not isinstance(state, list) or len(state) > 4 * layers:
        bad("model.state", "a list of state tensors")
    for j, spec in enumerate(state):
        ok = (isinstance(spec, dict) and _int(spec.get("layer")) and 0 <= spec["layer"] < layers
              and isinstance(spec.get("name"), str) and _PLAIN_NAME.fullmatch(spec["name"]) and spec.get("dtype") == "float32"
              and isinstance(spec.get("shape"), list) and 0 < len(spec["shape"]) <= 4
              and all(_int(d) and 1 <= d <= MAX_HIDDEN for d in spec["shape"])
              and math.prod(spec["shape"]) <= 1 << 28)
        if not ok:
            bad(f"model.state[{j}]", "{layer, name, shape (1-4 sizes), dtype float32}")
    need_int(manifest, "context_length", 1, MAX_CONTEXT)
    files = need_dict(manifest, "files")
    if not files or len(files) > MAX_FILES:
        bad("files", f"an object naming 1..{MAX_FILES} files")
    text_files = need_dict(manifest, "text_files", optional=True)     # for verify only (older exports: none)
    entries = [("files", n, i) for n, i in files.items()] + [("text_files", n, i) for n, i in text_files.items()]
    for key, name, info in entries:
        if not _PLAIN_NAME.fullmatch(name):
            bad(f"{key}[{name[:60]!r}]", "a plain file name inside the artifact (no folders, no '..')")
        if key == "text_files" and name not in TEXT_FILES:
            bad(f"text_files[{name!r}]", f"one of {', '.join(TEXT_FILES)}")
        if not isinstance(info, dict):
            bad(f"{key}[{name!r}]", "an object with bytes and sha256")
        need_int(info, "bytes", 0, 1 << 50, f"{key}[{name!r}].bytes")
        if not isinstance(info.get("sha256"), str) or not _SHA256.fullmatch(info["sha256"]):
            bad(f"{key}[{name!r}].sha256", "64 lowercase hex digits")
    if "manifest_sha256" in manifest and not (isinstance(manifest["manifest_sha256"], str)
                                              and _SHA256.fullmatch(manifest["manifest_sha256"])):
        bad("manifest_sha256", "64 lowercase hex digits")
    graphs = manifest.get("graphs", {"default": "model.onnx"})
    if not isinstance(graphs, dict) or not graphs or len(graphs) > 16:
        bad("graphs", "an object of graph variants")
    for key, name in graphs.items():
        if not isinstance(name, str) or name not in files or not name.endswith(".onnx") or len(key) > 32:
            bad(f"graphs[{key[:32]!r}]", "an .onnx file listed in files")
    if "default" not in graphs and "plain" not in graphs:
        bad("graphs", "an object with a 'default' (or, for MoE, a 'plain') graph")
    q = need_dict(manifest, "quantization", optional=True)
    for key in ("attention", "mlp", "embed", "lm_head", "experts", "router"):
        if key in q and q[key] not in _BITS:
            bad(f"quantization.{key}", "4, 8 or 32")
    need_int(q, "block_size", 16, 256, "quantization.block_size", optional=True)
    need_int(q, "lm_head_int8_candidates", 0, 1 << 16, "quantization.lm_head_int8_candidates", optional=True)
    special = need_dict(manifest, "special_tokens")
    for key in ("bos", "pad", "think_start", "think_end"):
        if special.get(key) is not None:
            need_int(special, key, 0, vocab - 1, f"special_tokens.{key}")
    eos = special.get("eos", [])
    if not isinstance(eos, list) or len(eos) > MAX_EOS_IDS or not all(_int(i) and 0 <= i < vocab for i in eos):
        bad("special_tokens.eos", f"a list of token ids below the vocabulary ({vocab})")
    gen = need_dict(manifest, "generation", optional=True)
    if "do_sample" in gen and not isinstance(gen["do_sample"], bool):
        bad("generation.do_sample", "true or false")
    for key, lo, hi in (("temperature", 0, 100), ("top_p", 0, 1), ("repetition_penalty", 1e-3, 100)):
        if gen.get(key) is not None and not (_number(gen[key]) and lo <= gen[key] <= hi):
            bad(f"generation.{key}", f"a number {lo}..{hi}")
    if gen.get("top_k") is not None:
        need_int(gen, "top_k", 0, MAX_VOCAB, "generation.top_k")
    if not isinstance(manifest.get("versions", {}), dict):
        bad("versions", "an object")
    return manifest


def confined(folder: Path, name: str, what: str = "file") -> Path:
    """folder/name, refusing a name with folders in it, a symbolic link that leads out of the
    folder, and anything but a regular file (a FIFO or device would block or never end)."""
    if not _PLAIN_NAME.fullmatch(name):
        raise ArtifactError(f"{folder}: {what} {name[:60]!r} is not a plain file name inside the artifact")
    path = folder / name
    if path.is_symlink():
        real = path.resolve()
        if folder.resolve() not in real.parents:
            raise ArtifactError(f"{folder}: {name} is a symbolic link out of the artifact folder (to {real}); refused")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ArtifactError(f"{folder}: {name} is missing") from None
    except OSError as e:
        raise ArtifactError(f"{folder}: {name}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{folder}: {name} is not a regular file")
    return path


def _check_external(folder: Path, graph: str, files: dict) -> int:
    """Every external-data location of a graph is one of the manifest's data files, and every
    tensor lies inside it; returns the end of the last tensor per data file (max)."""
    from .onnx_scan import ScanError, external_data
    try:
        tensors = external_data(folder / graph)
    except (ScanError, OSError, ValueError) as e:
        raise ArtifactError(f"{folder}: {graph} is not a readable ONNX file ({e})") from None
    ends: dict[str, int] = {}
    for t in tensors:
        loc, tname = t.get("location"), t.get("\0name", "?")[:60]
        if loc not in files or loc.endswith(".onnx"):
            raise ArtifactError(f"{folder}: {graph}: tensor {tname!r} reads its weights from {str(loc)[:80]!r}, which is "
                                f"not one of the artifact's data files; refused")
        try:
            offset, length = int(t.get("offset", "0")), int(t.get("length", "-1"))
        except ValueError:
            raise ArtifactError(f"{folder}: {graph}: tensor {tname!r} has a malformed external-data offset/length") from None
        if offset < 0 or length < 0 or offset + length > files[loc]["bytes"]:
            raise ArtifactError(f"{folder}: {graph}: tensor {tname!r} lies outside {loc} "
                                f"({offset}+{length} > {files[loc]['bytes']} bytes)")
        ends[loc] = max(ends.get(loc, 0), offset + length)
    return ends


def read_json(folder, name: str) -> dict:
    """A JSON object from a file in the artifact ({} when absent): confined, capped (TEXT_FILES), one line on damage."""
    folder = Path(folder)
    if not (folder / name).exists() and not (folder / name).is_symlink():
        return {}
    path = confined(folder, name)
    try:
        with open(path, "rb") as f:
            data = f.read(TEXT_FILES.get(name, 1 << 20) + 1)
        if len(data) > TEXT_FILES.get(name, 1 << 20):
            raise ArtifactError(f"{path}: too large; refused")
        value = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ArtifactError(f"{path}: not valid JSON") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"{path}: not a JSON object")
    return value


def read_manifest(path, graphs: bool = True) -> dict:
    """The artifact's manifest, after every check above (cheap: no hashing).
    graphs=False skips the scan of the graph files (for a quick look at the manifest only)."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact folder")
    mf = path / "edgert.json"
    if not mf.is_file() and not mf.is_symlink():
        raise ArtifactError(f"{path}: not an edgert artifact (no edgert.json; make one with `edgert export`)")
    confined(path, "edgert.json", "manifest")
    try:
        with open(mf, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{mf}: larger than {MAX_MANIFEST_BYTES >> 20} MB; not a manifest")
        manifest = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ArtifactError(f"{mf}: corrupt manifest (not JSON)") from None
    except OSError as e:
        raise ArtifactError(f"{mf}: cannot read it ({e.strerror})") from None
    check_manifest(manifest, str(mf))
    files = manifest["files"]
    for name, info in files.items():
        size = confined(path, name).stat().st_size
        if size != info["bytes"]:
            raise ArtifactError(f"{path}: {name} has {size} bytes, the manifest says {info['bytes']} (truncated or "
                                f"replaced; run `edgert verify {path}`)")
    for name, cap in TEXT_FILES.items():
        if (path / name).exists() or (path / name).is_symlink():
            if confined(path, name).stat().st_size > cap:
                raise ArtifactError(f"{path}: {name} is larger than {cap >> 20} MB; refused")
    if graphs:
        ends: dict[str, int] = {}
        for graph in sorted(set(manifest.get("graphs", {"default": "model.onnx"}).values())):
            for loc, end in _check_external(path, graph, files).items():
                ends[loc] = max(ends.get(loc, 0), end)
        for loc, end in ends.items():
            if files[loc]["bytes"] > end + DATA_SLACK:
                raise ArtifactError(f"{path}: {loc} has {files[loc]['bytes'] - end} bytes past its last tensor; "
                                    f"not as exported (run `edgert verify {path}`)")
    return manifest


def manifest_sha256(manifest: dict) -> str:
    """The sha256 a manifest records of itself: of its content without that field, as compact JSON
    with sorted keys (so it survives re-indentation, not an edit)."""
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != "manifest_sha256"}))
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def unchecked(path, manifest: dict) -> list[str]:
    """The files the runtime reads that verify cannot check: no sha256 recorded for them (exported
    before edgert recorded them, or added to the folder since)."""
    path = Path(path)
    names = [] if "manifest_sha256" in manifest else ["edgert.json"]
    return names + [n for n in TEXT_FILES if n not in manifest.get("text_files", {})
                    and ((path / n).exists() or (path / n).is_symlink())]


def verify(path) -> dict:
    """Full check: read_manifest's, then every file's sha256 against the manifest (graphs and data,
    then the tokenizer, template and config files), then the manifest's own. Sizes are compared
    first, so a file of the wrong size is never hashed."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, info in {**manifest["files"], **manifest.get("text_files", {})}.items():
        h = hashlib.sha256()
        with open(confined(path, name), "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size != info["bytes"]:
                raise ArtifactError(f"{path}: {name} has {st.st_size} bytes, the manifest says {info['bytes']} "
                                    f"(changed since the export)")
            if st.st_size > SPARSE_MIN_BYTES and 0 <= st.st_blocks * 512 < st.st_size // 2:
                raise ArtifactError(f"{path}: {name} is mostly holes (a sparse file of {st.st_size} bytes), not an "
                                    f"exported file; refused")
            left = info["bytes"]
            while left > 0:
                chunk = f.read(min(1 << 22, left))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
        if h.hexdigest() != info["sha256"]:
            raise ArtifactError(f"{path}: {name} is corrupt or was edited (sha256 differs from the manifest)")
    if "manifest_sha256" in manifest and manifest_sha256(manifest) != manifest["manifest_sha256"]:
        raise ArtifactError(f"{path}: edgert.json was edited after the export (its sha256 differs from the one it records)")
    return manifest


def bytes_per_weight(bits: int, block_size: int) -> float:
    """Stored bytes per weight of a block-quantized matrix (MatMulNBits layout): the codes, an fp32
    scale per block and, for int4 (asymmetric), a 4-bit zero point per block; 32 = plain fp32.
    Shared by the bench's decode roofline and the synthetic models' size check."""
    if bits == 32:
        return 4.0
    return bits / 8 + (4 + (0.5 if bits == 4 else 0)) / block_size
