"""The runtime on its own: no heavy imports, chat template, think budget, stop reasons."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from conftest import BUNDLED_STORIES, ROOT, make_checkpoint

HEAVY = ("torch", "transformers", "optimum", "onnx", "safetensors", "edgert_export")


def test_runtime_dependencies_are_light():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in deps}
    assert names == {"onnxruntime", "numpy", "typer", "jinja2"}


def test_runtime_imports_nothing_heavy(exported):
    art = exported(BUNDLED_STORIES, 4)
    code = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {HEAVY!r}:
            raise ImportError('runtime imported ' + name)
sys.meta_path.insert(0, Block())
import edgert
from edgert.cli import app
llm = edgert.load({str(art)!r}, tokenizer="python")
text = ''.join(t.text for t in llm.generate('Once upon a time', raw=True, max_tokens=8, temperature=0))
assert text.startswith(', there'), text
print('ok', sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok []"


# Sampling itself: tests/test_sampling.py (distributions against softmax(z / T), top-k, top-p, defaults).


@pytest.fixture(scope="module")
def reasoning_model(tmp_path_factory, exported):
    """A random tiny Qwen3 whose tokenizer has <think> / </think> and a ChatML template."""
    src = make_checkpoint(tmp_path_factory.mktemp("reasoner"), "qwen3", vocab_size=516, head_dim=16)
    tok = json.loads((src / "tokenizer.json").read_text())
    for i, t in enumerate(["<|im_start|>", "<|im_end|>", "<think>", "</think>"]):
        tok["added_tokens"].append({"id": 512 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                                    "normalized": False, "special": True})
    (src / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    gen = json.loads((src / "generation_config.json").read_text())
    gen["eos_token_id"] = [2, 513]
    (src / "generation_config.json").write_text(json.dumps(gen))
    return src, exported(src, 8)


def test_chat_template_matches_transformers(reasoning_model):
    transformers = pytest.importorskip("transformers")
    import edgert
    src, art = reasoning_model
    llm = edgert.load(art)
    ref = transformers.AutoTokenizer.from_pretrained(src)
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    text = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    # the ids `tokenizers` gives for transformers' rendering (transformers itself re-tokenizes this
    # Llama-2-style tokenizer without the per-segment "▁" prefix, a legacy quirk no chat model has)
    tokenizers = pytest.importorskip("tokenizers")
    want = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert llm.encode("Why is the sky blue?") == want
    assert 514 in want[-3:]                                # the template opened the reasoning
    assert llm.encode("hi", raw=True)[0] == 1          # raw text gets the tokenizer's BOS


def test_think_budget_closes_reasoning(reasoning_model):
    import edgert
    _, art = reasoning_model
    llm = edgert.load(art)
    close = llm.tokenizer.encode("\n</think>\n\n", add_special_tokens=False)
    free = list(llm.generate("Solve it", max_tokens=30, temperature=0, ignore_eos=True))
    assert all(t.reasoning for t in free)               # a random model never closes its reasoning
    steps = list(llm.generate("Solve it", max_tokens=30, temperature=0, ignore_eos=True, think_budget=6))
    ids = [t.id for t in steps]
    assert ids[:6] == [t.id for t in free[:6]]          # the budget changes nothing before it runs out
    assert ids[6 : 6 + len(close)] == close and all(t.forced for t in steps[6 : 6 + len(close)])
    end = ids.index(515) + 1                            # reasoning runs through the </think> tag itself
    assert 6 < end <= 6 + len(close)
    assert all(t.reasoning for t in steps[:end]) and not any(t.reasoning for t in steps[end:])
    assert llm.stats.reasoning_tokens == end


def test_stop_reasons(reasoning_model):
    import edgert
    _, art = reasoning_model
    llm = edgert.load(art, context=40)
    n_prompt = len(llm.encode("Solve it"))
    list(llm.generate("Solve it", max_tokens=5, temperature=0, ignore_eos=True))
    assert llm.stats.stop_reason == "length" and llm.stats.generated == 5
    list(llm.generate("Solve it", max_tokens=500, temperature=0, ignore_eos=True))
    assert llm.stats.stop_reason == "context" and llm.stats.generated == 40 - n_prompt + 1
    # eos: make the end token the model's greedy choice by asking for it after the prompt
    first = next(iter(llm.generate("Solve it", max_tokens=1, temperature=0))).id
    llm.eos_ids = [first]
    assert list(llm.generate("Solve it", max_tokens=5, temperature=0)) == []
    assert llm.stats.stop_reason == "eos"


def test_missing_int8_kernel_runs_the_nibble_twin(exported, monkeypatch):
    """onnxruntime 1.22 on aarch64 (Termux) has no 8-bit MatMulNBits kernel: the probe notices at
    load and the default artifact (int4 layers, int8 lm_head) runs its nibble twin graph there."""
    from edgert import model as model_mod
    assert model_mod.int8_kernel_available()                 # the probe itself runs here
    monkeypatch.setattr(model_mod, "_int8_ok", False)
    assert model_mod.Model(exported(BUNDLED_STORIES, 4)).strategy == "nibbles"
    # uniform int4 with int4 tables: no int8 at all (stories260K's default budget holds some projections at int8)
    assert model_mod.Model(exported(BUNDLED_STORIES, 4, embed_bits=4, block_size=32)).strategy == "default"
    assert model_mod.Model(exported(BUNDLED_STORIES, 32)).strategy == "default"
