"""Every `edgert run` option the README promises, through the real command (a fresh process), checked
against something other than edgert: the trained reasoning fixtures' known steps, transformers'
chat template and router, the model's own logits for top-k, closed-form seeding; plus prompts
longer than one prefill chunk through generate(), and SIGTERM during an export."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import BUNDLED_STORIES, ROOT, hf_greedy, hf_model, make_checkpoint
from test_cli import assert_one_line_error, edgert

DATA = ROOT / "export" / "data"
DENSE, MOE = DATA / "reasoning-qwen2", DATA / "reasoning-qwen3moe"
QUESTION = "What is (3+4)*5-6?"
STEPS = "3+4=7\n7*5=35\n35-6=29\n</think>"       # what both fixtures think, greedy (fixtures/reasoning_task.py)


def run_json(*args) -> dict:
    r = edgert("run", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def hf_chat_ids(fixture, messages) -> list[int]:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(fixture)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_greedy_reasoning_and_answer(exported):
    out = run_json(exported(DENSE, 8), QUESTION, "--temperature", "0")
    assert out["reasoning"] == STEPS and out["answer"] == "The answer is 29." and out["stop_reason"] == "eos"


def test_think_budget_closes_the_reasoning_after_n_tokens(exported):
    art = exported(DENSE, 8)
    free = run_json(art, QUESTION, "--temperature", "0")
    out = run_json(art, QUESTION, "--temperature", "0", "--think-budget", "3")
    assert out["tokens"][:3] == free["tokens"][:3]                  # "3", "+", "4": then the budget is spent
    assert out["reasoning"] == "3+4\n</think>"                       # "\n</think>\n\n" fed by edgert
    assert out["answer"].startswith("The answer is ") and out["stop_reason"] == "eos"
    assert len(out["tokens"]) < len(free["tokens"])
    out = run_json(art, QUESTION, "--temperature", "0", "--think-budget", "0")
    assert out["reasoning"] == "\n</think>"                          # closed before any step


def test_system_message_goes_through_the_chat_template(exported):
    art = exported(DENSE, 8)
    plain = run_json(art, QUESTION, "--temperature", "0", "--max-tokens", "1")
    system = run_json(art, QUESTION, "--temperature", "0", "--max-tokens", "1", "--system", "Think step by step.")
    user = [{"role": "user", "content": QUESTION}]
    assert plain["prompt_tokens"] == len(hf_chat_ids(DENSE, user))
    assert system["prompt_tokens"] == len(hf_chat_ids(DENSE, [{"role": "system", "content": "Think step by step."}, *user]))
    assert system["prompt_tokens"] > plain["prompt_tokens"]


def test_stats_expert_usage_matches_transformers_router(exported):
    """--stats on the trained MoE (fp32: routing exactly as transformers): the parameter counts by
    hand from the config, and each layer's expert counts from transformers' own router logits over
    the same tokens."""
    import torch
    out = run_json(exported(MOE, 32), QUESTION, "--temperature", "0", "--stats")
    assert out["reasoning"] == STEPS
    stats = out["stats"]
    cfg = json.loads((MOE / "config.json").read_text())
    experts, k, layers = cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["num_hidden_layers"]
    per_expert = 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"]
    assert stats["parameters"] == 1_054_080                          # README's fixture table
    assert stats["active_parameters_per_token"] == stats["parameters"] - layers * (experts - k) * per_expert
    ids = hf_chat_ids(MOE, [{"role": "user", "content": QUESTION}]) + out["tokens"]   # every fed token
    ref = hf_model(MOE)
    with torch.no_grad():
        router = ref(torch.tensor([ids]), output_router_logits=True).router_logits
    for layer, logits in enumerate(router):
        picks = logits.reshape(len(ids), experts).topk(k, dim=-1).indices.flatten().numpy()
        assert stats["expert_usage"][str(layer)] == np.bincount(picks, minlength=experts).tolist(), layer
    r = edgert("run", exported(MOE, 32), QUESTION, "--temperature", "0", "--stats")
    assert r.returncode == 0 and "active" in r.stderr and "expert" in r.stderr


def test_moe_strategy_flag(exported):
    """Both expert graphs of an int8 MoE give the fixture's steps, the flag reaches the model (the
    strategy reported under --stats; a graph the artifact lacks is refused in one line)."""
    from edgert.model import QMOE_SINCE, ort_version
    art = exported(MOE, 8)
    runs = {}
    for strategy in ("plain", "qmoe") if ort_version() >= QMOE_SINCE else ("plain",):
        runs[strategy] = run_json(art, QUESTION, "--temperature", "0", "--stats", "--moe-strategy", strategy)
        assert runs[strategy]["stats"]["strategy"] == strategy and runs[strategy]["reasoning"] == STEPS
    assert len({tuple(r["tokens"]) for r in runs.values()}) == 1
    assert_one_line_error(edgert("run", exported(MOE, 32), QUESTION, "--moe-strategy", "qmoe"), "'qmoe' is not in this artifact")
    assert_one_line_error(edgert("run", art, QUESTION, "--moe-strategy", "fastest"), "fastest")
    if ort_version() < QMOE_SINCE:
        pytest.skip("QMoE needs onnxruntime >= 1.23 (plain checked)")


STORY = ("Once upon a time", "--raw", "--ignore-eos", "--max-tokens", "40")


def test_seed_temperature_and_top_k(exported):
    import edgert
    from edgert.model import Model
    art = exported(BUNDLED_STORIES, 8)
    greedy = run_json(art, *STORY, "--temperature", "0")["tokens"]
    a = run_json(art, *STORY, "--temperature", "1", "--seed", "1")["tokens"]
    assert a == run_json(art, *STORY, "--temperature", "1", "--seed", "1")["tokens"]      # seeded: reproducible
    assert a != run_json(art, *STORY, "--temperature", "1", "--seed", "2")["tokens"]      # the seed matters
    assert a != greedy                                                                   # temperature > 0 samples
    assert run_json(art, *STORY, "--temperature", "1.5", "--top-k", "1", "--seed", "5")["tokens"] == greedy
    # --top-k 3: every sampled token is among the 3 most likely of the model's logits at its step
    hot = run_json(art, *STORY, "--temperature", "2", "--top-k", "3", "--seed", "9")["tokens"]
    model = Model(art)
    logits = model.forward(edgert.load(art).encode("Once upon a time", raw=True))[-1]
    ranks = []
    for t in hot:                                            # step by step, as the run decoded
        ranks.append(int((logits > logits[t]).sum()))
        logits = model.forward([t])[-1]
    assert max(ranks) <= 2, ranks
    assert sum(r > 0 for r in ranks) >= 5                    # at temperature 2 it did not just pick the best


def test_generation_config_sampling_defaults_via_cli(tmp_path, exported):
    from edgert.generate import Sampling, generate
    import edgert
    src = make_checkpoint(tmp_path / "hf", "llama")
    (src / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 12}))
    art = exported(src, 8)
    out = run_json(art, *STORY, "--seed", "4")
    llm = edgert.load(art)
    ids = llm.encode("Once upon a time", raw=True)
    assert out["tokens"] == [s.id for s in generate(llm.model, ids, 40, Sampling(0.7, 0.9, 12, seed=4))]
    assert out["tokens"] != run_json(art, *STORY, "--temperature", "0")["tokens"]


def test_long_prompt_through_generate_matches_transformers(tmp_path, exported):
    """A 1,100-token prompt is prefilled in chunks of 512: greedy tokens as transformers fp32 from
    the whole prompt at once, and the same as a one-shot prefill."""
    import edgert
    src = make_checkpoint(tmp_path / "hf", "llama", max_position_embeddings=2048)
    art = exported(src, 32)
    prompt = [1] + [int(i) for i in np.random.default_rng(3).integers(3, 512, 1099)]
    llm = edgert.load(art, context=1200)
    got = [t.id for t in llm.generate(prompt, max_tokens=16, temperature=0, ignore_eos=True) if t.id >= 0]
    assert llm.stats.prompt_tokens == 1100
    assert got == hf_greedy(hf_model(src), prompt, 16)
    model = llm.model
    model.reset()
    one_shot = [int(np.argmax(model.forward(prompt)[-1]))]
    assert one_shot[0] == got[0]


def test_sigterm_during_export_leaves_nothing_behind(tmp_path):
    out = tmp_path / "art"
    p = subprocess.Popen([sys.executable, "-m", "edgert.cli", "export", str(MOE), "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".art.partial-*")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, "the export finished before it could be interrupted"
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "Traceback" not in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())
