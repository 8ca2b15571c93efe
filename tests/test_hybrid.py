"""Hybrid recurrent models (LFM2's short convolutions, Qwen3.5's Gated DeltaNet) against transformers
fp32, and their recurrent state in the runtime: carried across forward calls, per slot in a batch,
reset for a new sequence, snapshot at turn boundaries for prefix reuse, never cut back blindly."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import ROOT, hf_greedy, hf_logits, hf_model, make_checkpoint
from edgert.model import Model

QWEN2_FIXTURE = ROOT / "export" / "data" / "reasoning-qwen2"     # its tokenizer + R1 chat template (512 tokens)
RNG = np.random.default_rng(7)
PROMPTS = {1: [1], 7: [1, 403, 407, 261, 378, 290, 300], 300: [1] + RNG.integers(3, 512, 299).tolist()}



def qwen3_5_tweak(model):
    """Qwen3.5 stores its RMSNorm weights as w for 1 + w (trained values near 0, not near 1). And at
    conftest's std the random Gated DeltaNet projections give each block a gain far above 1: the tiny
    model turns chaotic (int8 rounding of the weights alone, in transformers, moves its logits by 9%),
    which says nothing about the export; halved, int8/int4 errors are those of the other families."""
    for name, p in model.named_parameters():
        if "norm" in name and p.dim() == 1 and "linear_attn.norm" not in name:   # the gated norm is a plain one
            p.sub_(1.0)
        elif "linear_attn" in name and p.dim() >= 2:
            p.mul_(0.5)


CONFIGS = {
    # conv, attention, conv, conv: a conv layer first (its state starts the stack) and last
    "lfm2": ("lfm2", dict(num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "conv"], head_dim=16,
                          tie_word_embeddings=True, norm_eps=1e-5, max_position_embeddings=512)),
    # three Gated DeltaNet layers, then attention; 2 key heads serve 4 value heads; rotary on 8 of 32 dims
    "qwen3_5": ("qwen3_5_text", dict(num_hidden_layers=4, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                                     linear_key_head_dim=16, linear_value_head_dim=16, max_position_embeddings=512,
                                     tweak=qwen3_5_tweak)),
}



def random_expert_bias(model):
    """LFM2-MoE's expert_bias (a buffer, zeros at init) shifts which experts are chosen: make it matter."""
    for name, buf in model.named_buffers():
        if name.endswith("expert_bias"):
            buf.normal_(0, 0.1)


MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
MOE_CONFIGS = {
    "lfm2_moe": ("lfm2_moe", {**CONFIGS["lfm2"][1], **MOE, "num_dense_layers": 1, "routed_scaling_factor": 2.0,
                              "tweak": random_expert_bias}),
    "qwen3_5_moe": ("qwen3_5_moe_text", {**CONFIGS["qwen3_5"][1], **MOE, "shared_expert_intermediate_size": 48}),
}


def checkpoint(out, name):
    model_type, overrides = {**CONFIGS, **MOE_CONFIGS}[name]
    src = make_checkpoint(out, model_type, **overrides)
    for f in ("tokenizer.json", "tokenizer_config.json"):      # a chat template with <think> (same 512-token size)
        shutil.copyfile(QWEN2_FIXTURE / f, src / f)
    return src


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    src = checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return src, hf_model(src)


GRAPHS = ("scan", "fused")


def graph_of(art, kind: str) -> str:
    """The artifact's graph of a kind: "scan", standard ops (any onnxruntime), or "fused", the
    recurrent blocks as contrib ops (CausalConvWithState, LinearAttention: onnxruntime >= 1.25)."""
    from edgert.artifact import read_manifest
    from edgert.model import FUSED_SINCE, ort_version
    graphs = read_manifest(art)["graphs"]
    if kind == "fused":
        if ort_version() < FUSED_SINCE:
            pytest.skip("the fused graphs need onnxruntime >= 1.25")
        return "fused" if "fused" in graphs else "qmoe+fused"
    return next(n for n in ("default", "plain") if n in graphs)


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("length", sorted(PROMPTS))
def test_fp32_logits_and_greedy_match_transformers(case, exported, length, graph):
    src, ref = case
    art = exported(src, 32)
    model = Model(art, context=512, threads=1, strategy=graph_of(art, graph))
    prompt = PROMPTS[length]
    want = hf_logits(ref, prompt)
    got = model.forward(prompt, num_logits=length)
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-3
    assert greedy_no_eos(model, prompt, 12) == hf_greedy(ref, prompt, 12)


def greedy_no_eos(model, ids, n, eos=2):
    """Greedy through Model.forward with EOS masked, as hf_greedy's min_new_tokens does."""
    model.reset()
    logits, out = model.forward(ids)[-1], []
    for _ in range(n):
        logits[eos] = -np.inf
        out.append(int(np.argmax(logits)))
        logits = model.forward([out[-1]])[-1]
    return out


@pytest.mark.parametrize("graph", GRAPHS)
def test_state_carried_across_forward_calls(case, exported, graph):
    """The prompt fed in pieces (a chunk, single tokens, a chunk) gives the logits of one pass."""
    src, ref = case
    art = exported(src, 32)
    model = Model(art, context=512, threads=1, strategy=graph_of(art, graph))
    prompt = PROMPTS[300][:40]
    want = hf_logits(ref, prompt)
    cuts = [0, 9, 10, 11, 25, 40]
    got = np.concatenate([model.forward(prompt[a:b], num_logits=b - a) for a, b in zip(cuts, cuts[1:])])
    assert np.abs(got - want).max() < 1e-3
    model.reset()                                   # a new sequence starts from a zero state
    assert np.abs(model.forward(prompt[:9], num_logits=9) - want[:9]).max() < 1e-3


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_exports_stay_close(case, exported, bits):
    src, ref = case
    prompt = PROMPTS[300][:64]
    got = Model(exported(src, bits), context=512, threads=1).forward(prompt, num_logits=len(prompt))
    want = hf_logits(ref, prompt)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < (0.05 if bits == 8 else 0.35), rel
    if bits == 8:
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.85


def test_manifest_lists_the_state(case, exported):
    from edgert.artifact import read_manifest
    src, ref = case
    m = read_manifest(exported(src, 32))["model"]
    kinds = ref.config.layer_types
    assert m["attention_layers"] == [i for i, k in enumerate(kinds) if k == "full_attention"]
    assert m["state"] and all(s["dtype"] == "float32" and s["layer"] not in m["attention_layers"] for s in m["state"])


def test_batch_of_different_lengths_equals_each_alone(case, exported):
    """Staggered sequences stepped together (idle slots inside the span fed dummy tokens) give the
    tokens each gives alone: every row's state is its own, and an idle row's is left untouched."""
    import edgert
    from test_engine import greedy_together
    src, _ = case
    llm = edgert.load(exported(src, 32), context=512, slots=4, threads=1)
    prompts = [PROMPTS[7], PROMPTS[300][:23], PROMPTS[1], PROMPTS[300][100:111]]
    together = greedy_together(llm, prompts, 10)
    llm.engine.forget()
    assert together == [greedy(llm, p, 10) for p in prompts]


def test_rewind_needs_a_snapshot_and_speculation_falls_back(case, exported):
    import edgert
    from edgert.engine import StateRewind
    src, _ = case
    llm = edgert.load(exported(src, 32), context=512, threads=1)
    eng = llm.engine
    assert eng.recurrent
    prompt = PROMPTS[300][:30]
    seq = eng.open(prompt)
    eng.step({seq: prompt})
    eng.step({seq: [5]})
    eng.step({seq: [6]})
    with pytest.raises(StateRewind, match="cannot be cut back to position 31"):
        eng.rewind(seq, 31)
    assert seq.pos == 32
    eng.rewind(seq, 30)                         # the end of the prompt: a snapshot is kept there
    assert np.abs(eng.step({seq: [5]})[seq] - eng_fresh_logits(llm, prompt + [5])).max() < 1e-4
    eng.close(seq)
    plain, spec = greedy(llm, prompt, 12), greedy(llm, prompt, 12, speculate=4)
    assert spec == plain and "drafted" not in llm.stats.extra


def greedy(llm, ids, n, **kw):
    return [t.id for t in llm.generate(ids, max_tokens=n, temperature=0, ignore_eos=True, **kw) if t.id >= 0]


def eng_fresh_logits(llm, ids):
    m = llm.model
    fresh = Model(m.path, context=m.context, threads=1)
    return fresh.forward(ids)[-1]


def test_prefix_reuse_only_at_snapshots(case, exported):
    """A new prompt sharing a prefix resumes at the longest snapshot inside it, with fresh logits."""
    import edgert
    src, _ = case
    llm = edgert.load(exported(src, 32), context=512, threads=1)
    eng = llm.engine
    a = PROMPTS[300][:50]
    seq = eng.open(a)
    eng.step({seq: a})
    for t in (7, 8, 9):
        eng.step({seq: [t]})
    eng.close(seq)
    b = a + [7, 8, 11, 12]                         # shares 52 tokens; the snapshot is at 50
    seq = eng.open(b)
    assert seq.cached == 50
    got = eng.step({seq: b[seq.cached:]})[seq]
    assert np.abs(got - eng_fresh_logits(llm, b)).max() < 1e-4
    eng.step({seq: [13]})
    eng.close(seq)
    c = b + [13, 20]                               # continues what the slot holds: resumes at its live end
    seq = eng.open(c)
    assert seq.cached == 55
    assert np.abs(eng.step({seq: c[seq.cached:]})[seq] - eng_fresh_logits(llm, c)).max() < 1e-4
    eng.close(seq)
    seq = eng.open(a + [1, 2])                     # back to the first snapshot (50), kept through all this
    assert seq.cached == 50



def test_two_turn_chat_reuses_the_turn_boundary(case, exported):
    """llm.chat(): turn 2 resumes from the state kept where the template's rendering of turn 1 departs
    from what was generated, and answers as a fresh run of the whole conversation."""
    import edgert
    src, _ = case
    art = exported(src, 32)
    llm = edgert.load(art, context=512, threads=1)
    conv = llm.chat()
    list(conv.send("What is 3+4?", temperature=0, max_tokens=12))
    first = llm.encode_messages(conv.messages[:1])
    got = [t.id for t in conv.send("And 5*6?", temperature=0, max_tokens=12) if t.id >= 0]
    fresh = edgert.load(art, context=512, threads=1)
    ids = fresh.encode_messages(conv.messages[:-1])
    assert len(ids) == conv.stats.prompt_tokens
    # R1's template renders the answer without its reasoning: the prompts share only up to the
    # assistant header, before the end of turn 1's prompt, where the state was kept
    shared = next(i for i, (x, y) in enumerate(zip(first, ids)) if x != y)
    assert 5 < shared < len(first) and conv.stats.cached_tokens == shared
    want = [t.id for t in fresh.generate(ids, max_tokens=12, temperature=0) if t.id >= 0]
    assert got[:len(want)] == want


def test_int8_cache_in_groupqueryattention_beside_the_state(case, exported):
    """The int8 KV cache in GroupQueryAttention (onnxruntime >= 1.27, the twin the runtime picks)
    against the same weights with an fp32 cache; a prompt fed at once, in pieces and
    token by token (cache rows and recurrent state carried together) gives the same logits; rows of
    different lengths in one batch as each alone."""
    from edgert.model import KV8GQA_SINCE, ort_version
    if ort_version() < KV8GQA_SINCE:
        pytest.skip("GroupQueryAttention's int8 cache needs onnxruntime >= 1.27")
    src, _ = case
    # blocks of 32, as when the 2% bound was measured (the default gives this case's 128-wide rows blocks of 64)
    art = exported(src, 4, kv_cache="int8", block_size=32)
    model = Model(art, context=512, threads=1)
    assert model.strategy == "fused+kv8gqa" and all(c.dtype == np.int8 for c in model.cache)
    ref = Model(exported(src, 4, kv_cache="fp32", block_size=32), context=512, threads=1, strategy="fused")
    prompt = PROMPTS[300]
    got, want = model.forward(prompt, num_logits=len(prompt)), ref.forward(prompt, num_logits=len(prompt))
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 1e-6 < rel < 0.02, rel
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95
    model.reset()
    pieces = np.concatenate([model.forward(prompt[:100], num_logits=100), model.forward(prompt[100:107], num_logits=7)]
                            + [model.forward([t]) for t in prompt[107:120]])
    assert np.abs(pieces - got[:120]).max() < 1e-4
    batch = Model(art, context=64, threads=1, slots=3)
    seq = np.array(prompt[:12], np.int64)
    for slot, n in enumerate((9, 4, 11)):
        batch.run(slot, seq[None, :n], np.array([0]))
    rows = batch.run(0, seq[None, [9, 4, 11]].T, np.array([9, 4, 11]))
    for r, n in enumerate((9, 4, 11)):
        assert np.abs(rows[r, -1] - got[n]).max() < 1e-4


@pytest.mark.skipif(not __import__("os").environ.get("EDGERT_ORT_PYTHON"),
                    reason="set EDGERT_ORT_PYTHON to a Python with onnxruntime 1.22.x (.ci/run does)")
def test_old_onnxruntime_gives_identical_tokens(case, exported):
    """The standard-op recurrent graphs on onnxruntime 1.22 (Termux): fp32 identical greedy steps,
    quantized ones identical but at near-ties (teacher-forced along the newest release's path)."""
    import os
    from test_onnxruntime_versions import same_choices
    src, _ = case
    from edgert.artifact import read_manifest
    from edgert.model import FUSED_SINCE, KV8GQA_SINCE, ort_version
    jobs = [(str(exported(src, bits)), PROMPTS[7]) for bits in (32, 4)]
    old, new = same_choices(os.environ["EDGERT_ORT_PYTHON"], jobs, exact=[True, False])
    assert old["version"].startswith("1.22") and set(old["strategies"]) == {"default"}, old
    if ort_version() >= FUSED_SINCE:      # so the standard-op graph on 1.22 against the contrib-op one here
        int8 = read_manifest(exported(src, 4))["quantization"]["kv_cache"] == "int8"   # (qwen3_5's 32-wide heads)
        gqa = "fused+kv8gqa" if int8 and ort_version() >= KV8GQA_SINCE else "fused"  # and its int8 cache in GQA
        assert new["strategies"] == ["fused", gqa], new["strategies"]


# ---- the MoE variants: the same recurrent layers, sparse experts from export/moe.py -------------

@pytest.fixture(scope="module", params=sorted(MOE_CONFIGS))
def moe_case(request, tmp_path_factory):
    src = checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return src, hf_model(src)


@pytest.mark.parametrize("graph", GRAPHS)
def test_moe_fp32_matches_transformers(moe_case, exported, graph):
    src, ref = moe_case
    art = exported(src, 32)
    model = Model(art, context=512, threads=1, strategy=graph_of(art, graph))
    for prompt in (PROMPTS[7], PROMPTS[300]):
        model.reset()
        assert np.abs(model.forward(prompt, num_logits=len(prompt)) - hf_logits(ref, prompt)).max() < 1e-3
    assert greedy_no_eos(model, PROMPTS[7], 12) == hf_greedy(ref, PROMPTS[7], 12)
    model.reset()                                 # carried across calls
    want = hf_logits(ref, PROMPTS[300][:20])
    got = np.concatenate([model.forward(PROMPTS[300][a:b], num_logits=b - a) for a, b in ((0, 9), (9, 10), (10, 20))])
    assert np.abs(got - want).max() < 1e-3


def test_moe_strategies_agree_and_int4_top1(moe_case, exported):
    from test_export_moe import QMOE
    src, ref = moe_case
    art = exported(src, 4)
    prompt = PROMPTS[300][:64]
    plain = Model(art, context=512, threads=1, strategy="plain").forward(prompt, num_logits=len(prompt))
    # a layout or routing bug: ~1/vocab. The random model's int4 top-1 moves with the calibration's
    # sampled text: 0.34-0.53 measured over probe settings (12/16 rows, fp16/fp32 probe cache)
    assert (plain.argmax(-1) == hf_logits(ref, prompt).argmax(-1)).mean() >= 0.25
    from edgert.model import FUSED_SINCE, ort_version
    for strategy in ("qmoe", "qmoe+fused")[:2 if ort_version() >= FUSED_SINCE else 1] if QMOE else ():
        q = Model(art, context=512, threads=1, strategy=strategy).forward(prompt, num_logits=len(prompt))
        # equal up to the kernels' rounding of int8 activations (one position may differ by ~0.014:
        # measured on both models here), until a routing near-tie flips one token's expert; the
        # recurrent state carries that token's difference to every later position
        same = np.abs(q - plain).max(-1) < 0.05
        assert same[:32].all() and same.mean() >= 0.75, (strategy, np.flatnonzero(~same))


def test_each_graph_kind_holds_its_ops_and_the_newest_onnxruntime_picks_fused(case, exported, monkeypatch):
    """The standard-op graph has no contrib recurrent op (it must run on 1.22); the fused one has one
    per recurrent block and no Scan; load picks fused where the ops exist and refuses it in one line
    where they do not."""
    import onnx
    from edgert import model as model_module
    from edgert.artifact import ArtifactError, read_manifest
    src, ref = case
    art = exported(src, 4, kv_cache="int8")
    graphs = read_manifest(art)["graphs"]
    # each with its twin on GroupQueryAttention's int8 cache (nibbles: ARM's 1.22)
    assert {"default", "fused", "kv8gqa", "fused+kv8gqa"} <= set(graphs) <= \
        {"default", "fused", "nibbles", "kv8gqa", "fused+kv8gqa"}
    ops = {kind: [n.op_type for n in onnx.load(str(art / graphs[kind]), load_external_data=False).graph.node]
           for kind in graphs}
    convs = sum(k == "conv" or k == "linear_attention" for k in ref.config.layer_types)
    attends = len(ref.config.layer_types) - convs
    for kind in ("fused", "fused+kv8gqa"):
        assert ops[kind].count("CausalConvWithState") == convs and "Scan" not in str(ops[kind])
        assert ops[kind].count("LinearAttention") == (convs if ref.config.model_type.startswith("qwen3_5") else 0)
    for kind in set(graphs) - {"fused", "fused+kv8gqa"}:
        assert "CausalConvWithState" not in ops[kind] and "LinearAttention" not in ops[kind]
    for kind in graphs:     # the int8 cache in GroupQueryAttention only in the twins, standard ops elsewhere
        assert ops[kind].count("GroupQueryAttention") == (attends if kind.endswith("kv8gqa") else 0), kind
    if model_module.ort_version() >= model_module.KV8GQA_SINCE:
        assert Model(art, context=64, threads=1).strategy == "fused+kv8gqa"
    elif model_module.ort_version() >= model_module.FUSED_SINCE:
        assert Model(art, context=64, threads=1).strategy == "fused"
    monkeypatch.setattr(model_module, "ort_version", lambda: (1, 26))
    assert model_module.choose_graph(graphs, None) == "fused"
    monkeypatch.setattr(model_module, "ort_version", lambda: (1, 22))
    assert model_module.choose_graph(graphs, None) == "default"
    with pytest.raises(ArtifactError, match=r"needs onnxruntime >= 1.25 \(this is .*\); use default"):
        model_module.choose_graph(graphs, "fused")


def test_a_hard_linked_data_file_gets_one_clear_line(case, exported, tmp_path):
    """onnxruntime 1.32 refuses external data with several hard links for the tensors inside If
    subgraphs (the standard-op graph's chunked delta rule / decode step), naming the reason only after
    the node and tensor names, past the 300 characters a load error keeps: edgert says it first."""
    from edgert.artifact import ArtifactError
    from edgert.model import ort_version
    src, ref = case
    if not ref.config.model_type.startswith("qwen3_5"):
        pytest.skip("LFM2's graphs have no If subgraph, where onnxruntime checks the links")
    art = tmp_path / "art"
    shutil.copytree(exported(src, 4), art)
    (tmp_path / "second_name").hardlink_to(art / "model.onnx.data")
    try:
        model = Model(art, context=64, threads=1, strategy="default")
    except ArtifactError as e:
        msg = str(e)
        assert "\n" not in msg and "has 2 hard links" in msg and "cp -r" in msg and str(art) in msg, msg
    else:
        assert ort_version() < (1, 32), "onnxruntime >= 1.32 loaded a hard-linked data file: the check moved?"
        assert model.forward([1, 5]).shape == (1, model.vocab)


def test_fused_graphs_hold_the_convolution_state_channel_first(case, exported):
    """CausalConvWithState works channel-first: the fused graphs declare a convolution's state
    [batch, C, K-1] and feed it to the op as it is (no Transpose of the state per step, which cost
    ~1 ms a step on the 2B shape); the standard-op graphs keep [batch, K-1, C]. The runtime holds
    each graph's own layout, and both graphs continue a state alike (the other tests: transformers)."""
    import onnx
    from edgert.artifact import read_manifest
    from edgert.model import FUSED_SINCE, ort_version
    src, ref = case
    art = exported(src, 4)
    graphs = read_manifest(art)["graphs"]
    kernel = ref.config.conv_L_cache if hasattr(ref.config, "conv_L_cache") else ref.config.linear_conv_kernel_dim
    for kind, path in graphs.items():
        g = onnx.load(str(art / path), load_external_data=False).graph
        dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim[1:]] for v in [*g.input, *g.output]}
        convs = [n for n in dims if n.endswith(".conv")]
        assert convs and all(dims[n][1 if "fused" in kind else 0] + 1 == kernel for n in convs), (kind, dims)
        readers = {n.op_type for n in g.node for i in n.input if i.startswith("past_state.") and i.endswith(".conv")}
        assert readers == ({"CausalConvWithState"} if "fused" in kind else {"Concat"}), (kind, readers)
    if ort_version() >= FUSED_SINCE:
        model = Model(art, context=64, threads=1, slots=2)
        assert "fused" in model.strategy
        held = [s.shape for s, spec in zip(model.state, read_manifest(art)["model"]["state"]) if spec["name"] == "conv"]
        assert held and all(shape[0] == 2 and shape[2] + 1 == kernel for shape in held), held
        model.run(0, np.array([[1, 5, 9], [1, 7, 3]]), np.array([0, 0]))      # runs with the state so held


@pytest.mark.skipif(not __import__("os").environ.get("EDGERT_ORT_PYTHON"),
                    reason="set EDGERT_ORT_PYTHON to a Python with onnxruntime 1.22.x (.ci/run does)")
def test_moe_old_onnxruntime_gives_identical_tokens(moe_case, exported):
    """1.22 runs the plain expert graph; the newest release QMoE (int4) or plain (fp32)."""
    import os
    from test_onnxruntime_versions import same_choices
    src, _ = moe_case
    jobs = [(str(exported(src, bits)), PROMPTS[7]) for bits in (32, 4)]
    old, _ = same_choices(os.environ["EDGERT_ORT_PYTHON"], jobs, exact=[True, False])
    assert old["version"].startswith("1.22") and set(old["strategies"]) == {"plain"}


def test_qwen3_5_multimodal_layout_exports_its_text_model(case, exported, tmp_path):
    """Qwen3.5 as published: model_type qwen3_5 with the text settings under text_config, weights under
    model.language_model. beside a vision tower and an MTP head: the same artifact as the text model's."""
    import json
    from safetensors.numpy import load_file, save_file
    src, _ = case
    if json.loads((src / "config.json").read_text())["model_type"] != "qwen3_5_text":
        pytest.skip("Qwen3.5 only")
    weights = {k.replace("model.", "model.language_model.", 1): v for k, v in load_file(src / "model.safetensors").items()}
    weights["model.visual.patch_embed.proj.weight"] = np.ones((4, 3), np.float32)
    weights["mtp.fc.weight"] = np.ones((4, 4), np.float32)
    nested = tmp_path / "nested"
    shutil.copytree(src, nested)
    save_file(weights, nested / "model.safetensors")
    text = json.loads((src / "config.json").read_text())
    (nested / "config.json").write_text(json.dumps({"model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"],
                                                    "tie_word_embeddings": text["tie_word_embeddings"],
                                                    "text_config": text, "vision_config": {"depth": 1}}))
    prompt = PROMPTS[7]
    want = Model(exported(src, 32), context=512, threads=1).forward(prompt, num_logits=len(prompt))
    got = Model(exported(nested, 32), context=512, threads=1).forward(prompt, num_logits=len(prompt))
    assert np.array_equal(got, want)
    from edgert.artifact import read_manifest
    assert read_manifest(exported(nested, 32))["model"]["parameters"] == read_manifest(exported(src, 32))["model"]["parameters"]


def test_votes_share_the_prompt_state(case, exported):
    """--votes: the prompt is computed once; the other slots resume from the state kept one token
    before its end (copied), so greedy votes all equal one greedy run."""
    import edgert
    src, _ = case
    llm = edgert.load(exported(src, 32), context=512, slots=3, threads=1)
    prompt = PROMPTS[300][:40]
    calls = []
    run = llm.model.run
    llm.model.run = lambda first, ids, *a, **k: calls.append(ids.shape) or run(first, ids, *a, **k)
    result = llm.vote(prompt, 3, max_tokens=8, temperature=0)
    assert calls[:3] == [(1, 39), (1, 1), (2, 1)]       # prefill to the mark, its last token, the two others' last token
    llm.model.run = run
    llm.engine.forget()
    alone = greedy(llm, prompt, 8)
    assert all(v["tokens"] == alone for v in result["votes"])


def norm(text: str) -> str:
    """Generated text as the server splits it (reasoning apart, an incomplete last character held back)."""
    return text.replace("<think>", "").replace("</think>", "").replace("\ufffd", "").strip()


def test_serve_choices_and_turns(case, exported):
    """`edgert serve` (a real server process, the openai client): n greedy choices share the prompt's
    state and equal one greedy run; a second turn of the conversation resumes at the turn boundary
    the first kept and answers as a fresh run does."""
    import edgert
    from test_serve import Server
    src, _ = case
    art = exported(src, 32)
    llm = edgert.load(art, context=512, threads=1)
    server = Server(art, "--parallel", "3", "--context", "512")
    try:
        client = server.client()
        messages = [{"role": "user", "content": "What is 3+4?"}]
        r = client.chat.completions.create(model="art", messages=messages, n=3, temperature=0, max_tokens=8)
        want = llm.tokenizer.decode(greedy(llm, llm.encode_messages(messages), 8))
        texts = {(c.message.reasoning_content or "") + (c.message.content or "") for c in r.choices}
        assert len(r.choices) == 3 and len(texts) == 1
        messages += [{"role": "assistant", "content": r.choices[0].message.content or "x"},
                     {"role": "user", "content": "And 5*6?"}]
        r2 = client.chat.completions.create(model="art", messages=messages, temperature=0, max_tokens=8)
        from edgert.engine import common_prefix
        shared = common_prefix(llm.encode_messages(messages[:1]), llm.encode_messages(messages))
        assert r2.usage.prompt_tokens_details.cached_tokens == shared > 5      # resumed at the turn boundary it kept
        llm.engine.forget()
        want2 = llm.tokenizer.decode(greedy(llm, llm.encode_messages(messages), 8))
        got2 = (r2.choices[0].message.reasoning_content or "") + (r2.choices[0].message.content or "")
        assert norm(got2) == norm(want2) and norm(texts.pop()) == norm(want)
    finally:
        server.stop()
    assert "Traceback" not in server.output(), server.output()[-3000:]


@pytest.mark.parametrize("name,shape", [("qwen3_5", "qwen3.5-0.8b"), ("qwen3_5_moe", "qwen3.5-35b-a3b"),
                                        ("lfm2", "lfm2.5-1.2b")])
def test_synthetic_shapes_name_the_tensors_transformers_saves(name, shape, tmp_path):
    """`edgert bench --synthetic` builds a hybrid shape from shape-only weights under the names and
    shapes it generates: a transformers checkpoint of the family (a small config) must hold exactly
    those tensors, experts and shared expert included; and the full-size shape generates the same
    kinds of tensors (layer and expert numbers aside) as that checkpoint."""
    import re
    from edgert_export.checkpoint import Checkpoint
    from edgert_export.synthetic import SHAPES, SyntheticCheckpoint
    real = Checkpoint(checkpoint(tmp_path, name))
    fake = SyntheticCheckpoint(real.config)
    assert {n: real.shape(n) for n in real.names} == {n: fake.shape(n) for n in fake.names}
    full = SyntheticCheckpoint(SHAPES[shape])
    kinds = lambda names: {re.sub(r"\.\d+\.", ".#.", n) for n in names}
    assert kinds(full.names) == kinds(real.names) - ({"lm_head.weight"} if SHAPES[shape]["tie_word_embeddings"] else set())


def test_serve_keeps_the_turn_boundary_of_a_conversation_with_tools(tmp_path, exported):
    """A recurrent model can only resume where it kept a state: that boundary must be found in the
    prompt as rendered with the request's tools (the tools block comes first in the template), or
    the next turn is prefilled again from the start."""
    import edgert
    from edgert.engine import common_prefix
    from test_serve import Server
    from test_serve_tools import TEMPLATE, TOOLS
    src = checkpoint(tmp_path / "lfm2", "lfm2")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    prompt_end = "{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
    assert prompt_end in TEMPLATE        # a prompt that opens the answer as no earlier turn is rendered: only the
    template = TEMPLATE.replace(prompt_end, prompt_end.replace("<|assistant|>", "<|assistant|>Sure,"))   # boundary resumes
    (src / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    art = exported(src, 32)
    llm = edgert.load(art, context=512, threads=1)
    server = Server(art, "--context", "512")
    try:
        client = server.client()
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        r = client.chat.completions.create(model="art", messages=messages, tools=TOOLS, temperature=0, max_tokens=6)
        messages += [{"role": "assistant", "content": r.choices[0].message.content or "x"},
                     {"role": "user", "content": "And in Rome?"}]
        r2 = client.chat.completions.create(model="art", messages=messages, tools=TOOLS, temperature=0, max_tokens=6)
        render = lambda m: llm.encode_messages(m, template_kwargs={"tools": TOOLS})      # noqa: E731
        shared = common_prefix(render(messages[:1]), render(messages))
        assert shared > len(llm.tokenizer.encode(json.dumps(TOOLS[0]), add_special_tokens=False))   # past the tools block
        assert r2.usage.prompt_tokens_details.cached_tokens == shared
    finally:
        server.stop()
    assert "Traceback" not in server.output(), server.output()[-3000:]
