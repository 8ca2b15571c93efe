"""The batch engine (edgert/engine.py): sequences of different lengths stepped together give the
tokens each gives alone; prefix reuse, copies and rewinds give the logits a fresh computation
gives; speculation gives the tokens plain greedy gives; votes are a real majority."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, make_checkpoint

sys.path[:0] = [str(ROOT / "fixtures")]
import reasoning_task as task  # noqa: E402

QWEN2 = ROOT / "export" / "data" / "reasoning-qwen2"
MOE = ROOT / "export" / "data" / "reasoning-qwen3moe"


def greedy_alone(llm, ids, n, speculate=0):
    return [t.id for t in llm.generate(ids, max_tokens=n, temperature=0, ignore_eos=True, speculate=speculate)]


def greedy_together(llm, prompts, n, stagger=True):
    """All prompts decoded in one batch; with stagger, each joins a few steps after the previous
    (so rows differ in length and some slots idle inside the span being stepped)."""
    from edgert.generate import Decoding, Sampling
    eng = llm.engine
    decs, out, logits, waiting = {}, {}, {}, list(enumerate(prompts))
    active = []
    steps = 0
    while waiting or active:
        if waiting and (not stagger or steps % 3 == 0):
            i, ids = waiting.pop(0)
            seq = eng.open(ids)
            logits.update(eng.step({seq: ids[seq.cached:]}))
            decs[seq] = Decoding(ids, n, Sampling(0.0))
            out[seq] = (i, [])
            active.append(seq)
        feeds = {}
        for seq in active:
            step = decs[seq].next(logits[seq])
            if step is not None:
                out[seq][1].append(step.id)
                if not decs[seq].done:
                    feeds[seq] = [step.id]
        for seq in active:
            if seq not in feeds:
                eng.close(seq)
        active = list(feeds)
        if feeds:
            logits.update(eng.step(feeds))
        steps += 1
    return [toks for _, toks in sorted(out.values())]


@pytest.fixture(scope="module")
def qwen2_int4(exported):
    return exported(QWEN2, bits=4)


@pytest.mark.parametrize("kv", ["int8", "fp16"])
def test_batch_equals_each_alone_dense(exported, kv):
    """The default int8 cache (its own attention graph, rows written by the runtime) and
    GroupQueryAttention's fp16 cache: rows of different lengths stepped together, bit for bit."""
    import edgert
    qwen2_int4 = exported(QWEN2, bits=4, kv_cache=kv)
    probs = task.held_out_problems()[:5]
    alone_llm = edgert.load(qwen2_int4, context=256)
    prompts = [alone_llm.encode(p.prompt) for p in probs]
    prompts[2] = prompts[2] + prompts[0][3:20]          # a longer row
    alone = [greedy_alone(alone_llm, ids, 24) for ids in prompts]
    batch_llm = edgert.load(qwen2_int4, context=256, slots=5)
    assert greedy_together(batch_llm, prompts, 24) == alone
    assert greedy_together(batch_llm, prompts, 24, stagger=False) == alone     # again: slots hold old rows


@pytest.mark.parametrize("strategy", ["qmoe", "plain"])
def test_batch_equals_each_alone_moe(exported, strategy):
    import edgert
    from edgert.model import QMOE_SINCE, ort_version
    if strategy == "qmoe" and ort_version() < QMOE_SINCE:
        pytest.skip("QMoE needs onnxruntime >= 1.23")
    art = exported(MOE, bits=4)
    probs = task.held_out_problems()[5:9]
    one = edgert.load(art, context=256, moe_strategy=strategy)
    prompts = [one.encode(p.prompt) for p in probs]
    alone = [greedy_alone(one, ids, 16) for ids in prompts]
    many = edgert.load(art, context=256, moe_strategy=strategy, slots=4)
    assert greedy_together(many, prompts, 16) == alone


def test_batch_on_the_nibble_twin(exported, tmp_path, monkeypatch):
    """int8 layers read as nibbles (onnxruntime 1.22 on ARM): the twin's halves split per batch."""
    import edgert
    art = exported(QWEN2, bits=8)
    monkeypatch.setenv("EDGERT_INT8_KERNEL", "0")
    many = edgert.load(art, context=128, slots=3)
    assert many.model.strategy == "nibbles"
    prompts = [many.encode(p.prompt) for p in task.held_out_problems()[:3]]
    alone = [greedy_alone(many, ids, 12) for ids in prompts]
    assert greedy_together(many, prompts, 12) == alone


@pytest.mark.parametrize("kv", ["int8", "int8-ops", "fp16"])
def test_prefix_reuse_copy_and_rewind_give_fresh_logits(exported, kv, monkeypatch):
    """Rows copied between slots (the standard-op int8 graph's keys hold positions on their last
    axis; int8 alone is GroupQueryAttention's cache where onnxruntime >= 1.27 has it), cut back, re-fed."""
    import edgert
    if kv == "int8-ops":
        monkeypatch.setenv("EDGERT_KV8_GRAPH", "ops")
    qwen2_int4 = exported(QWEN2, bits=4, kv_cache=kv[:4])
    llm = edgert.load(qwen2_int4, context=128, slots=3)
    if kv == "int8-ops":                     # the graph whose new rows the runtime writes, keys transposed
        assert llm.model.strategy == "default" and llm.model._row_axis is not None
    eng = llm.engine
    ids = llm.encode(task.held_out_problems()[0].prompt)
    more = ids + [18, 10, 19, 28]
    fresh = edgert.load(qwen2_int4, context=128).model
    ref = fresh.forward(more, num_logits=len(more))

    a = eng.open(ids)
    assert a.cached == 0
    la = eng.step({a: ids})[a]
    np.testing.assert_allclose(la, ref[len(ids) - 1], atol=1e-4)
    b = eng.open(more)                       # a is busy: its rows are copied
    assert b.slot != a.slot and b.cached == len(ids)
    np.testing.assert_allclose(eng.step({b: more[b.cached:]})[b], ref[-1], atol=1e-4)
    eng.close(a)
    c = eng.open(more)                       # b (busy) holds all of it: copied, all but the last token
    assert c.slot == a.slot and c.cached == len(more) - 1
    eng.rewind(c, 5)                         # cut back, then re-feed
    assert c.pos == 5
    np.testing.assert_allclose(eng.step({c: more[5:]})[c], ref[-1], atol=1e-4)
    eng.close(b), eng.close(c)
    eng.forget()
    assert eng.open(more).cached == 0


def test_step_past_the_context_changes_nothing(qwen2_int4):
    import edgert
    from edgert.model import ContextFull
    llm = edgert.load(qwen2_int4, context=32, slots=2)
    eng = llm.engine
    seq = eng.open([1] * 30)
    eng.step({seq: [1] * 30})
    with pytest.raises(ContextFull):
        eng.step({seq: [1, 2, 3]})
    assert seq.pos == 30


def test_old_artifact_refuses_slots(qwen2_int4, tmp_path):
    import shutil
    import edgert
    from edgert.artifact import ArtifactError
    old = tmp_path / "old"
    shutil.copytree(qwen2_int4, old)
    m = json.loads((old / "edgert.json").read_text())
    del m["batch"]
    (old / "edgert.json").write_text(json.dumps(m))
    edgert.load(old, context=64)             # one sequence still runs
    with pytest.raises(ArtifactError, match="re-export"):
        edgert.load(old, context=64, slots=2)


def test_speculation_gives_plain_greedy_tokens(qwen2_int4):
    import edgert
    llm = edgert.load(qwen2_int4, context=256)
    accepted = 0
    for p in task.held_out_problems()[:6]:
        plain = [t.id for t in llm.generate(p.prompt, max_tokens=60, temperature=0)]
        spec = [t.id for t in llm.generate(p.prompt, max_tokens=60, temperature=0, speculate=4)]
        assert spec == plain
        accepted += llm.stats.extra.get("accepted", 0)
    assert accepted > 0                      # the drafts were used, not just thrown away


def test_speculation_on_stories_fp32_exact_quantized_but_near_ties(tmp_path):
    """A raw story, where repeats are long. fp32: the same tokens as plain greedy. int8: the verify
    forward runs MatMulNBits on several rows, whose kernel rounds activations differently from
    the one-row kernel, so the tokens may part only where plain greedy's top-2 margin is tiny."""
    import edgert
    from edgert_export import export
    for bits in (32, 8):
        art = tmp_path / f"s{bits}"
        export(ROOT / "export" / "data" / "stories260K", art, bits=bits, progress=False)
        llm = edgert.load(art, context=512)
        plain = [t.id for t in llm.generate("Once upon a time", raw=True, max_tokens=200, temperature=0, ignore_eos=True)]
        spec = [t.id for t in llm.generate("Once upon a time", raw=True, max_tokens=200, temperature=0,
                                           ignore_eos=True, speculate=6)]
        assert llm.stats.extra["accepted"] > 20
        assert llm.stats.extra["verify_steps"] + llm.stats.extra["accepted"] <= 200
        if bits == 32:
            assert spec == plain
            continue
        part = next((i for i, (a, b) in enumerate(zip(plain, spec)) if a != b), None)
        if part is not None:
            llm.model.reset()
            logits = llm.model.forward(llm.encode("Once upon a time", raw=True) + plain[:part])[-1]
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] < 0.1, (part, top2)


def test_speculation_across_a_think_budget(qwen2_int4):
    import edgert
    llm = edgert.load(qwen2_int4, context=256)
    for budget in (1, 3, 7):
        p = task.held_out_problems()[3].prompt
        plain = [(t.id, t.forced) for t in llm.generate(p, max_tokens=50, temperature=0, think_budget=budget)]
        spec = [(t.id, t.forced) for t in llm.generate(p, max_tokens=50, temperature=0, think_budget=budget, speculate=4)]
        assert spec == plain and any(f for _, f in plain)


def test_ngram_draft():
    from edgert.generate import ngram_draft
    assert ngram_draft([5, 6, 7, 8, 5, 6], 3) == [7, 8, 5]          # "5 6" seen before: what followed
    assert ngram_draft([1, 2, 3, 9, 2, 3, 4, 2, 3], 2) == [4, 2]     # the latest occurrence wins
    assert ngram_draft([1, 2, 3, 4], 3) == []                         # nothing repeats
    assert ngram_draft([4, 4], 5) == [4]
    assert ngram_draft([1, 2, 1, 2], 0) == []


def test_answer_key():
    from edgert.votes import answer_key
    assert answer_key("The answer is 29.") == "29"
    assert answer_key("so \\boxed{x+1} and 3") == "x+1"
    assert answer_key("1,024 apples") == "1024"
    assert answer_key("  Paris. ") == "paris"


def test_votes_cli_json(qwen2_int4):
    prompt = task.held_out_problems()[7].prompt
    r = subprocess.run([sys.executable, "-m", "edgert.cli", "run", str(qwen2_int4), prompt, "--votes", "5",
                        "--temperature", "3", "--seed", "4", "--max-tokens", "80", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    votes = out["votes"]
    assert len(votes) == 5 and sum(out["counts"].values()) == sum(bool(v["key"]) for v in votes)
    keys = [v["key"] for v in votes if v["key"]]
    assert out["answer"] == max(set(keys), key=lambda k: (keys.count(k), sum(v["logprob"] for v in votes if v["key"] == k)))
    assert all(v["logprob"] < 0 for v in votes)                       # sampled at T=3: every path has a cost
    assert len({tuple(v["tokens"]) for v in votes}) > 1              # independent samples, not one path 5 times
    # seeded: the same command gives the same votes
    again = subprocess.run(r.args, capture_output=True, text=True, timeout=120)
    assert json.loads(again.stdout)["votes"] == votes
    # without --json: the best vote's answer, after its reasoning
    plain = subprocess.run([a for a in r.args if a != "--json"], capture_output=True, text=True, timeout=120)
    assert plain.stdout.strip() == (out["answer_text"] or out["text"]).strip() != out["votes"][0]["text"].strip()


def test_votes_beat_one_sample_at_high_temperature(qwen2_int4):
    """cons@5 at T=1.3 on held-out problems is at least as accurate as the first sample alone."""
    import edgert
    llm = edgert.load(qwen2_int4, context=256, slots=5)
    single = majority = 0
    for i, p in enumerate(task.held_out_problems()[:24]):
        r = llm.vote(p.prompt, 5, max_tokens=80, temperature=1.3, seed=i)
        single += task.extract_answer(r["votes"][0]["text"]) == p.answer
        majority += r["answer"] == str(p.answer)
    assert majority >= single and majority >= 20


def test_batched_decode_on_onnxruntime_122(qwen2_int4, old_ort_python):
    from test_onnxruntime_versions import run_on
    script = """
import json, sys
import numpy as np, edgert
from edgert.generate import Decoding, Sampling
art, prompts = json.loads(sys.argv[1])
one = edgert.load(art, context=128, threads=1)
alone = [[t.id for t in one.generate(p, max_tokens=12, temperature=0, ignore_eos=True)] for p in prompts]
many = edgert.load(art, context=128, threads=1, slots=len(prompts))
eng = many.engine
seqs = [eng.open(p) for p in prompts]
logits = {}
for s, p in zip(seqs, prompts):
    logits.update(eng.step({s: p}))
out = [[] for _ in prompts]
for _ in range(12):
    toks = {s: int(np.argmax(logits[s])) for s in seqs}
    for i, s in enumerate(seqs):
        out[i].append(toks[s])
    logits = eng.step({s: [t] for s, t in toks.items()})
print(json.dumps({"alone": alone, "together": out}))
"""
    import edgert
    llm = edgert.load(qwen2_int4, context=128)
    prompts = [llm.encode(p.prompt) for p in task.held_out_problems()[:3]]
    res = run_on(old_ort_python, script, [str(qwen2_int4), prompts])
    assert res["together"] == res["alone"]


def test_bench_batch_reports_aggregate_decode(qwen2_int4):
    r = subprocess.run([sys.executable, "-m", "edgert.cli", "bench", str(qwen2_int4), "--batch", "3", "--repeat", "1",
                        "--gen-tokens", "8", "--prompt-tokens", "16", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["batch"] == 3 and out["batch_decode_tok_s"] > 0
    assert out["batch_speedup"] == pytest.approx(out["batch_decode_tok_s"] / out["decode_tok_s"])


def test_batch_through_the_split_head_at_a_real_vocabulary(tmp_path, exported):
    """The int8 lm_head stored as int4 planes (vocab >= 16k: every real model) rescoring its
    TopK candidates per row: a batch of rows gives each row's own logits."""
    import edgert
    src = make_checkpoint(tmp_path / "big", "qwen2", vocab_size=20000, tie_word_embeddings=True)
    art = exported(src, bits=4)
    assert "lm_head_int8_candidates" in json.loads((art / "edgert.json").read_text())["quantization"]
    one = edgert.load(art, context=64)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 20000, n).tolist() for n in (5, 11, 3)]
    alone = []
    for p in prompts:
        one.model.reset()
        alone.append(one.model.forward(p)[-1])
    many = edgert.load(art, context=64, slots=3)
    eng = many.engine
    seqs = [eng.open(p[:-1]) for p in prompts]
    for s, p in zip(seqs, prompts):
        eng.step({s: p[:-1]})
    together = eng.step({s: p[-1:] for s, p in zip(seqs, prompts)})       # one forward, three rows
    for s, ref in zip(seqs, alone):
        np.testing.assert_allclose(together[s], ref, atol=2e-3)


def test_draft_model_speculation_gives_plain_greedy_tokens(exported):
    """stories260K fp32 drafted by its own int4 export (the same tokenizer): identical tokens,
    most drafts accepted, fewer forwards of the target than tokens."""
    import edgert
    stories = ROOT / "export" / "data" / "stories260K"
    llm = edgert.load(exported(stories, bits=32), context=256)
    plain = [t.id for t in llm.generate("Once upon a time", raw=True, max_tokens=120, temperature=0, ignore_eos=True)]
    llm.use_draft(exported(stories, bits=4))
    spec = [t.id for t in llm.generate("Once upon a time", raw=True, max_tokens=120, temperature=0, ignore_eos=True,
                                       speculate=4)]
    assert spec == plain
    extra = llm.stats.extra
    assert extra["accepted"] > 0.5 * extra["drafted"] and extra["verify_steps"] < 60


def test_draft_with_another_tokenizer_is_one_line(exported):
    stories = ROOT / "export" / "data" / "stories260K"
    r = subprocess.run([sys.executable, "-m", "edgert.cli", "run", str(exported(stories, bits=32)), "Once", "--raw",
                        "--draft", str(exported(QWEN2, bits=4))], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "tokenizer differs" in r.stderr and len(r.stderr.strip().splitlines()) == 1
