"""Read and check an artifact folder (edgert.json + model.onnx + data + tokenizer files)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT_VERSION = 1


class ArtifactError(Exception):
    """An artifact that cannot be used; one line for the user."""


def read_manifest(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact folder")
    mf = path / "edgert.json"
    if not mf.is_file():
        raise ArtifactError(f"{path}: not an edgert artifact (no edgert.json; make one with `edgert export`)")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{mf}: corrupt manifest (not JSON)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "edgert":
        raise ArtifactError(f"{mf}: not an edgert manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{mf}: format version {manifest.get('format_version')} is not supported by this edgert "
                            f"(it reads version {FORMAT_VERSION}); re-export the model or upgrade edgert")
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path}: {name} is missing")
        if f.stat().st_size != info["bytes"]:
            raise ArtifactError(f"{path}: {name} has {f.stat().st_size} bytes, the manifest says {info['bytes']} (truncated or replaced)")
    return manifest


def verify(path) -> dict:
    """Full check: every data file's sha256 against the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, info in manifest["files"].items():
        h = hashlib.sha256()
        with open(path / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        if h.hexdigest() != info["sha256"]:
            raise ArtifactError(f"{path}: {name} is corrupt (sha256 differs from the manifest)")
    return manifest


def bytes_per_weight(bits: int, block_size: int) -> float:
    """Stored bytes per weight of a block-quantized matrix (MatMulNBits layout): the codes, an fp32
    scale per block and, for int4 (asymmetric), a 4-bit zero point per block; 32 = plain fp32.
    Shared by the bench's decode roofline and the synthetic models' size check."""
    if bits == 32:
        return 4.0
    return bits / 8 + (4 + (0.5 if bits == 4 else 0)) / block_size
