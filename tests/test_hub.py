"""`edgert export ORG/NAME`: a hub repo id resolved from the local Hugging Face cache when offline
(no machine here reaches the hub). The cache is laid out as huggingface_hub lays it out: blobs
named by hash, snapshots of symbolic links to them, refs naming the commit of a branch."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from conftest import BUNDLED_STORIES, ROOT

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root, repo: str, src, commit: str = COMMIT, branch: str = "main"):
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / branch).write_text(commit)


def run_export(args, cache, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "edgert.cli", "export", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)


def test_repo_id_from_the_offline_cache(tmp_path):
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    fake_cache(cache, "karpathy/stories260K", BUNDLED_STORIES)
    r = run_export(["karpathy/stories260K", "-o", str(tmp_path / "art"), "--bits", "8"], cache, tmp_path)
    assert r.returncode == 0, r.stderr
    import edgert
    text = "".join(t.text for t in edgert.load(tmp_path / "art").generate("Once upon a time", raw=True,
                                                                            max_tokens=12, temperature=0))
    assert len(text) > 10
    # the revision is pinned: a tag that names the same commit works, an unknown one is one line
    (cache / "models--karpathy--stories260K" / "refs" / "v1").write_text(COMMIT)
    r = run_export(["karpathy/stories260K", "-o", str(tmp_path / "art2"), "--bits", "8", "--revision", "v1"], cache, tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_export(["karpathy/stories260K", "-o", str(tmp_path / "art3"), "--revision", "nope"], cache, tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "offline" in r.stderr
    assert not (tmp_path / "art3").exists()


def test_repo_id_missing_offline_is_one_line(tmp_path):
    pytest.importorskip("huggingface_hub")
    r = run_export(["nobody/nothing", "-o", str(tmp_path / "out")], tmp_path / "empty-cache", tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "edgert: error: nobody/nothing is not in the local Hugging Face cache and the hub cannot be reached "
        "(offline); download it where there is a network, or give a folder"]
    assert not (tmp_path / "out").exists()


def test_a_folder_named_like_a_repo_id_stays_a_folder(tmp_path):
    (tmp_path / "org").mkdir()
    shutil.copytree(BUNDLED_STORIES, tmp_path / "org" / "model")
    r = run_export(["org/model", "-o", str(tmp_path / "out"), "--bits", "8"], tmp_path / "empty-cache", tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_export(["org/model", "-o", str(tmp_path / "out2"), "--revision", "main"], tmp_path / "empty-cache", tmp_path)
    assert r.returncode == 1 and "--revision is for Hugging Face repo ids" in r.stderr
