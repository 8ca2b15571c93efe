"""The trained reasoning fixtures (export/data/reasoning-*) and their task.

The fixtures are trained by fixtures/make_reasoning.py, which records the greedy answers of
transformers fp32 on the 200 held-out problems in each folder's fixture.json. These tests
check the task's construction, the tokenizer against edgert's pure-Python reader, that the
committed weights still give the recorded answers, and that edgert's int8 export gives the
same answers as transformers.
"""
from __future__ import annotations

import itertools
import json
import math
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path[:0] = [str(ROOT / "fixtures")]
import reasoning_task as task  # noqa: E402

DATA = ROOT / "export" / "data"
FIXTURES = [DATA / "reasoning-qwen2", DATA / "reasoning-qwen3moe", DATA / "reasoning-lfm2"]   # the last: hybrid (LFM2)
SUBSET = 24          # problems per model check: enough to catch a changed model, fast enough for CI


def test_held_out_split_is_fixed_disjoint_and_distinct():
    held = task.held_out_problems()
    assert len(held) == task.HELD_OUT_SIZE == len({p.expression for p in held})
    assert all(task.held_out(p) for p in held)
    assert held == task.held_out_problems()      # deterministic
    expressions = {p.expression for p in held}
    training = list(itertools.islice(task.training_problems(0), 20000))
    assert not any(p.expression in expressions or task.held_out(p) for p in training)


@pytest.mark.parametrize("problem", task.held_out_problems()[:50], ids=lambda p: p.expression)
def test_problem_text_means_what_the_reasoning_computes(problem):
    # the prompt is ordinary math: Python's precedence must give the left-to-right answer
    assert eval(problem.expression) == problem.answer   # noqa: S307 - digits and + - * ( ) only
    values = problem.values()
    assert all(0 <= v <= task.MAX_VALUE for v in values)
    assert task.MIN_STEPS <= len(problem.steps) <= task.MAX_STEPS
    lines = problem.target.split("\n")
    assert lines[:len(problem.steps)] == [f"{a}{op}{b}={c}" for (op, b), a, c in zip(problem.steps, values, values[1:])]
    assert task.extract_answer(problem.target) == problem.answer


def test_extract_answer():
    assert task.extract_answer("3+4=7\n</think>\n\nThe answer is 7.") == 7
    assert task.extract_answer("3+4=7\n</think>\n\nThe answer is 70") == 70
    assert task.extract_answer("3+4=7\n7*2=14") is None                 # never closed its reasoning
    assert task.extract_answer("</think>\n\nI do not know.") is None


def test_fixtures_are_small_and_complete():
    total = 0
    for d in FIXTURES:
        for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "fixture.json"):
            assert (d / f).is_file(), d / f
        total += sum(f.stat().st_size for f in d.iterdir())
    assert total <= 10_000_000


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda d: d.name)
def test_tokenizer_backends_agree_and_digits_are_single_tokens(fixture):
    pytest.importorskip("tokenizers")
    from edgert.chat import load_chat_template, render_chat
    from edgert.tokenizer import Tokenizer
    rust, py = Tokenizer.from_dir(fixture, "tokenizers"), Tokenizer.from_dir(fixture, "python")
    template = load_chat_template(fixture)
    cfg = json.loads((fixture / "tokenizer_config.json").read_text())
    texts = ["Hello there! Why is the sky blue?  Tabs\tand\nnewlines, ünïcode 日本 🙂"]
    for p in task.held_out_problems()[:40]:
        prompt = render_chat(template, [{"role": "user", "content": p.prompt}], bos_token=cfg["bos_token"])
        assert prompt == f"{cfg['bos_token']}<｜User｜>{p.prompt}<｜Assistant｜><think>\n"
        texts.append(prompt + p.target + cfg["eos_token"])
    for text in texts:
        ids = rust.encode(text, add_special_tokens=False)
        assert py.encode(text, add_special_tokens=False) == ids
        assert rust.decode(ids) == py.decode(ids) == text
    digits = [rust.encode(str(d), add_special_tokens=False) for d in range(10)]
    assert all(len(ids) == 1 for ids in digits)
    assert len(rust.encode("1234", add_special_tokens=False)) == 4


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda d: d.name)
def test_chat_template_matches_transformers(fixture):
    transformers = pytest.importorskip("transformers")
    from edgert.chat import load_chat_template, render_chat
    hf = transformers.AutoTokenizer.from_pretrained(fixture)
    cfg = json.loads((fixture / "tokenizer_config.json").read_text())
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "2+3=5\n</think>\n\nThe answer is 5."}, {"role": "user", "content": "What is 4*5?"}]
    ours = render_chat(load_chat_template(fixture), chat, bos_token=cfg["bos_token"], eos_token=cfg["eos_token"])
    assert ours == hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert "2+3=5" not in ours          # earlier reasoning is dropped, as R1's template does


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda d: d.name)
def test_committed_weights_give_the_recorded_generations(fixture):
    """One teacher-forced forward pass: at every recorded token, transformers fp32 on the
    committed weights must still pick that token (the same as regenerating, much faster)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    from make_reasoning import prompt_ids
    record = json.loads((fixture / "fixture.json").read_text())
    problems = task.held_out_problems()
    assert sum(a == p.answer for a, p in zip(record["held_out_answers"], problems)) / len(problems) \
        == record["held_out_accuracy"]
    assert record["held_out_accuracy"] >= 0.5          # trained, not a random init
    tok = Tokenizer.from_file(str(fixture / "tokenizer.json"))
    rows = [(prompt_ids(tok, p), g) for p, g in zip(problems[:SUBSET], record["held_out_ids"])]
    for (prompt, gen), answer in zip(rows, record["held_out_answers"]):
        assert task.extract_answer(tok.decode(gen, skip_special_tokens=True)) == answer
    width = max(len(p) + len(g) for p, g in rows)
    ids = torch.tensor([p + g + [0] * (width - len(p) - len(g)) for p, g in rows])
    model = transformers.AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32).eval()
    with torch.no_grad():
        picks = model(input_ids=ids).logits.argmax(-1)
    for r, (prompt, gen) in enumerate(rows):
        assert picks[r, len(prompt) - 1:len(prompt) + len(gen) - 1].tolist() == gen, r


@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda d: d.name)
def test_edgert_export_answers_as_transformers_fp32(fixture, bits, exported):
    """fp32: the very tokens transformers generated; int8 and int4 (the default, calibrated GPTQ):
    the same answers (int4 on all 200: 198/200 for each fixture, benchmarks/reasoning_accuracy.py;
    on these 24: all)."""
    import edgert
    problems = task.held_out_problems()[:SUBSET]
    record = json.loads((fixture / "fixture.json").read_text())
    llm = edgert.load(exported(fixture, bits))
    eos = llm.eos_ids[0]
    for p, ref_ids, ref_answer in zip(problems, record["held_out_ids"], record["held_out_answers"]):
        tokens = list(llm.generate(p.prompt, max_tokens=len(ref_ids), temperature=0.0))
        ids = [t.id for t in tokens] + ([eos] if llm.stats.stop_reason == "eos" else [])
        assert task.extract_answer("".join(t.text for t in tokens)) == ref_answer, p.prompt
        if bits == 32:
            assert ids == ref_ids, p.prompt


# Mean KL(transformers fp32 || edgert) over the 24 problems' prompt + recorded generation, teacher
# forced; bounds ~1.2x what was measured here (onnxruntime 1.32, x86-64):
# measured with the self-calibrated default: qwen2 int4 0.0059, int8 0.0002; qwen3moe int4 0.0127, int8
# 0.0008; lfm2 (hybrid: conv state + int8 KV) int4 0.0072, int8 0.00025. Two experts swapped in the MoE's last layer at int4 raise it to 0.0191 (the answers stay
# right: the KL is what sees it), hence the MoE's int4 bound at 1.22x (re-measure if calibration changes).
# Re-measured 2026-12-03 with the bfloat16 calibration inputs (c446626 in brackets): qwen2 int4 0.0026;
# qwen3moe int4 0.0063 default, 0.0060 plain and QMoE (0.0059), int8 0.0017; lfm2 int4 0.0062, int8
# 0.00026. The swapped experts now give 0.0133-0.0137, under the old MoE bound of 0.0155: that bound
# is 0.0100 now, 1.6x the measurement and 0.75x the swap.
KL_BOUND = {("reasoning-qwen2", 4): 0.0067, ("reasoning-qwen2", 8): 0.0005,
            ("reasoning-qwen3moe", 4): 0.0100, ("reasoning-qwen3moe", 8): 0.0020,
            ("reasoning-lfm2", 4): 0.0086, ("reasoning-lfm2", 8): 0.0003}


@pytest.fixture(scope="module")
def teacher_forced():
    """fixture -> (sequences, transformers fp32 logits) for the first SUBSET held-out problems."""
    from tokenizers import Tokenizer
    from conftest import hf_logits, hf_model
    from make_reasoning import prompt_ids
    cache = {}

    def get(fixture):
        if fixture not in cache:
            tok = Tokenizer.from_file(str(fixture / "tokenizer.json"))
            record = json.loads((fixture / "fixture.json").read_text())
            seqs = [prompt_ids(tok, p) + g for p, g in zip(task.held_out_problems()[:SUBSET], record["held_out_ids"])]
            ref = hf_model(fixture)
            cache[fixture] = seqs, [hf_logits(ref, s).astype(np.float64) for s in seqs]
        return cache[fixture]
    return get


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("fixture,strategy", [(FIXTURES[0], None), (FIXTURES[1], None), (FIXTURES[1], "plain"),
                                              (FIXTURES[1], "qmoe"), (FIXTURES[2], None)],
                         ids=["qwen2", "qwen3moe", "qwen3moe-plain", "qwen3moe-qmoe", "lfm2"])
def test_quantized_kl_against_transformers_fp32(fixture, bits, strategy, exported, teacher_forced):
    """An independent reference for quantized MoE (the expert graphs read the same bytes, so
    comparing them with each other cannot see a wrong expert)."""
    from edgert.model import QMOE_SINCE, Model, ort_version
    if strategy == "qmoe" and ort_version() < QMOE_SINCE:
        pytest.skip("QMoE needs onnxruntime >= 1.23")
    seqs, wants = teacher_forced(fixture)
    model = Model(exported(fixture, bits), strategy=strategy)
    kls, agree = [], []
    for ids, want in zip(seqs, wants):
        model.reset()
        got = model.forward(ids, num_logits=len(ids)).astype(np.float64)
        lp, lq = (x - x.max(-1, keepdims=True) for x in (want, got))
        lp, lq = (x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in (lp, lq))
        kls.append((np.exp(lp) * (lp - lq)).sum(-1))
        agree.append(got.argmax(-1) == want.argmax(-1))
    kl, top1 = float(np.concatenate(kls).mean()), float(np.concatenate(agree).mean())
    print(f"\n{fixture.name} int{bits} {strategy or 'default'}: KL {kl:.5f} top-1 {top1:.4f}")
    assert kl < KL_BOUND[fixture.name, bits] and top1 >= 0.98


def test_moe_fixture_routing_is_trained_and_not_uniform():
    record = json.loads((DATA / "reasoning-qwen3moe" / "fixture.json").read_text())
    entropy = record["expert_usage_entropy_bits"]
    config = json.loads((DATA / "reasoning-qwen3moe" / "config.json").read_text())
    assert len(entropy) == config["num_hidden_layers"]
    uniform = math.log2(config.get("num_experts") or config["num_local_experts"])
    assert all(0 < e < uniform - 0.05 for e in entropy), (entropy, uniform)


def test_demo_asks_a_held_out_problem_and_answers_it(tmp_path):
    from edgert.cli import DEMO_PROMPT
    problem = next(p for p in task.held_out_problems() if p.prompt == DEMO_PROMPT)
    from typer.testing import CliRunner
    from edgert.cli import app
    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    assert problem.reasoning in r.stdout and r.stdout.rstrip().endswith(f"The answer is {problem.answer}.")
