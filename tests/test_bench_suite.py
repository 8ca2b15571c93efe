"""The benchmark suite's own logic: the timed greedy loop of the HF peers, the roofline and ratio
arithmetic, refusals as rows, and one-line worker errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT, hf_greedy, hf_model, make_checkpoint

sys.path.insert(0, str(ROOT / "benchmarks"))
import checkpoints  # noqa: E402
import report  # noqa: E402
import suite  # noqa: E402


def test_transformers_loop_matches_generate(tmp_path):
    """The hand-written prefill + cached decode loop feeds back exactly what generate() picks."""
    import hf_peers
    ckpt = make_checkpoint(tmp_path / "ck", "qwen2")
    ids = [5, 17, 99, 3, 250, 41, 7, 300]
    runner = hf_peers.TransformersRunner(ckpt, "transformers fp32")
    m = runner.measure(ids, 12, threads=1)
    assert (m["n_prompt"], m["n_decode"]) == (8, 12)
    assert runner.last_tokens == hf_greedy(hf_model(ckpt), ids, 12)


def test_hf_bytes_per_token_follows_tied_and_untied_embeddings():
    import weight_bytes
    tied = checkpoints.SHAPES["qwen2.5-0.5b"].config
    assert weight_bytes.hf_bytes_per_token(tied, 494_032_768) == 4 * 494_032_768
    untied = checkpoints.SHAPES["r1-distill-qwen-1.5b"].config
    assert weight_bytes.hf_bytes_per_token(untied, 1_777_088_000) == 4 * (1_777_088_000 - 151936 * 1536)
    moe = checkpoints.SHAPES["qwen3-moe-small"].config
    assert weight_bytes.expert_share(moe) == 4 / 64 and weight_bytes.expert_share(tied) == 1.0


def test_onnx_bytes_per_token_leaves_out_lookup_tables(tmp_path):
    """An embedding only gathered from is read one row per token; one shared with the lm_head is read whole."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    import weight_bytes

    table = numpy_helper.from_array(np.zeros((100, 8), np.float32), "table")       # 3200 bytes
    w = numpy_helper.from_array(np.zeros((8, 8), np.uint8), "w")                    # 64 bytes

    def save(folder, shared):
        nodes = [helper.make_node("Gather", ["table", "ids"], ["x"]),
                 helper.make_node("MatMulInteger", ["x8", "w"], ["y"])]
        if shared:
            nodes.append(helper.make_node("MatMul", ["h", "table"], ["logits"]))
        g = helper.make_graph(nodes, "g", [], [], [table, w])
        folder.mkdir()
        onnx.save(helper.make_model(g), str(folder / "model.onnx"))
        return folder

    assert weight_bytes.onnx_bytes_per_token(save(tmp_path / "a", shared=False)) == 64
    assert weight_bytes.onnx_bytes_per_token(save(tmp_path / "b", shared=True)) == 64 + 3200


def _rounds(pre, dec):
    return [{"prefill_tok_s": p, "decode_tok_s": d, "peak_rss_mb": 100.0 + i, "load_s": 1.0, "other_load": 0.0}
            for i, (p, d) in enumerate(zip(pre, dec))]


def test_summary_medians_ratios_roofline_and_refusals():
    runners = [suite.Prepared(suite.BASELINE, "edgert", bytes_per_token=50e6, disk_bytes=120e6),
               suite.Prepared("llama.cpp Q4_0", "llamacpp", bytes_per_token=100e6, disk_bytes=200e6),
               suite.Prepared("onnxruntime-genai int4", refused="NotImplementedError: not supported")]
    rounds = {suite.BASELINE: _rounds([400, 500, 600], [50, 40, 60]),
              "llama.cpp Q4_0": _rounds([1000, 900, 1100], [20, 30, 25])}
    rows = suite.summarise(runners, rounds)
    suite.add_roofline(rows, 10e9)
    base, llama, genai = rows
    assert (base["prefill_tok_s"], base["decode_tok_s"]) == (500, 50)
    assert base["roofline_tok_s"] == pytest.approx(10e9 / 50e6) and base["roofline_pct"] == pytest.approx(25)
    assert llama["prefill_vs_edgert"] == pytest.approx(2.0) and llama["decode_vs_edgert"] == pytest.approx(0.5)
    assert llama["peak_rss_mb"] == 102 and llama["decode_range"] == [20, 30]
    assert genai["refused"] == "NotImplementedError: not supported" and "decode_tok_s" not in genai

    rep = {"command": "python benchmarks/suite.py --work W", "started": "a", "finished": "b", "threads": 2,
           "prompt_len": 128, "decode": 64, "repeat": 3, "bandwidth_gbs": [10.0, 10.0],
           "machine": {"cpu": "x", "cores": 2, "memory_gib": 1, "machine": "x86_64", "simd": "", "kernel": "k"},
           "versions": {"onnxruntime": "1", "optimum venv": {"transformers": "4.57"}},
           "shapes": [{"shape": "s", "architecture": "A", "params": 10, "active_params": 10,
                       "loadavg_before": [0.1], "loadavg_after": [0.2], "measure_s": 1, "rows": rows}]}
    md = report.markdown(rep)
    assert "| llama.cpp Q4_0 | 1000.0 | 25.0 | 2.00x | 0.50x | 20.0–30.0 | 100 | 100.0 | 25% | 102 | 200 |" in md
    assert "| onnxruntime-genai int4 | refused: NotImplementedError: not supported |" in md
    assert "python benchmarks/suite.py --work W" in md and "transformers 4.57" in md


def test_worker_reports_one_line_errors(tmp_path):
    p = suite.Prepared("edgert int4", "edgert", str(tmp_path / "missing"))
    r = suite.run_worker(p, [1, 2, 3], 2, 1)
    assert set(r) == {"error"} and "\n" not in r["error"] and "Traceback" not in r["error"]


def test_suite_cli_rejects_bad_shapes(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        suite.main(["--work", str(tmp_path), "--shapes", "gpt-9"])
    assert e.value.code != 0
    assert "unknown shape 'gpt-9'" in capsys.readouterr().err


def test_lfm2_checkpoint_shape_is_transformers_own():
    """The LFM2.5-1.2B benchmark checkpoint names and shapes every tensor as transformers' Lfm2 does
    (built on the meta device: no memory), and counts the published 1.17B parameters."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = checkpoints.SHAPES["lfm2.5-1.2b"].config
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}     # tied
    assert {name: shape for name, shape, _ in checkpoints.tensor_specs(config)} == want
    assert checkpoints.param_count(config) == 1_170_340_608


def test_gpt_oss_checkpoint_is_the_hubs_mxfp4_layout(tmp_path, monkeypatch):
    """The gpt-oss benchmark checkpoint stores its experts as the hub does (MXFP4 blocks + exponents,
    which onnxruntime-genai's builder requires): transformers loads a small one with nothing missing or
    left over, counts the parameters checkpoints.py counts, and gives finite logits; edgert exports it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = {**checkpoints.SHAPES["gpt-oss-20b-8x"].config, "hidden_size": 64, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "num_local_experts": 4, "num_experts_per_tok": 2, "experts_per_token": 2, "vocab_size": 2048,
              "layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 4096}
    monkeypatch.setitem(checkpoints.SHAPES, "gpt-oss-tiny", checkpoints.Shape("gpt-oss-tiny", config))
    src = checkpoints.make_checkpoint("gpt-oss-tiny", tmp_path / "ckpt")
    from safetensors import safe_open
    with safe_open(str(src / "model.safetensors"), "np") as f:
        names = set(f.keys())
    assert {n for n in names if "experts" in n} >= {"model.layers.0.mlp.experts.gate_up_proj_blocks",
                                                    "model.layers.0.mlp.experts.down_proj_scales"}
    model, info = transformers.AutoModelForCausalLM.from_pretrained(src, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert sum(p.numel() for p in model.parameters()) == checkpoints.param_count(config)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    from edgert_export import export
    export(src, tmp_path / "art", bits=4, recipe="rtn", progress=False)
    assert json.loads((tmp_path / "art" / "edgert.json").read_text())["model"]["parameters"] == checkpoints.param_count(config)


def test_llamacpp_mxfp4_runner_only_for_mxfp4_checkpoints(tmp_path, monkeypatch):
    """llama.cpp's own gpt-oss form (MXFP4 experts kept) is a runner only where the checkpoint holds
    MXFP4 experts; for any other checkpoint prepare_all leaves it out instead of listing a refusal."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert suite._llamacpp(tmp_path, tmp_path, "x", "MXFP4_MOE") is None
    monkeypatch.setattr(suite, "checkpoint", lambda shape, work: tmp_path)
    labels = [p.name for p in suite.prepare_all("x", tmp_path, lambda label: label == "llama.cpp MXFP4_MOE")[1]]
    assert labels == []


def test_votes_cost_times_one_answer_and_the_votes_of_each_round(tmp_path, exported):
    """benchmarks/votes_cost.py on a tiny model: each round times one answer and N votes of at most
    the asked length (a vote may end at EOS), and the ratio it reports is of the medians."""
    import statistics

    import votes_cost
    art = exported(make_checkpoint(tmp_path / "ck", "qwen2"), 4)
    out = tmp_path / "votes.json"
    assert votes_cost.main([str(art), "--votes", "3", "--tokens", "6", "--rounds", "3", "--threads", "1",
                            "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert len(r["one_s"]) == len(r["votes_s"]) == 3 and all(len(v) == 3 for v in r["vote_lengths"])
    assert all(1 <= n <= 6 for v in r["vote_lengths"] for n in v)
    assert r["ratio"] == pytest.approx(statistics.median(r["votes_s"]) / statistics.median(r["one_s"]), abs=5e-4)


def test_ab_decode_alternates_and_compares_each_turn_with_the_turns_around_it(tmp_path, exported, capsys):
    """benchmarks/ab_decode.py: two legs (A loaded first, then B), in each the two artifacts decode
    in one process strictly X Y X Y ... X; each Y turn is compared with the mean of the X turns on
    either side, a leg's ratio is the median of those, and the result is the geometric mean of both
    legs as B / A. Two builds of different vocabularies, or more turns than the context holds, are
    refused in one line."""
    import statistics

    import ab_decode
    art = exported(make_checkpoint(tmp_path / "ck", "qwen2"), 4)
    out = tmp_path / "ab.json"
    assert ab_decode.main([str(art), str(art), "--rounds", "4", "--steps", "3", "--prompt-len", "5", "--threads", "1",
                           "--context", "64", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    for leg in r["legs"]:
        x, y = leg["first_ms"], leg["second_ms"]
        assert len(x) == 5 and len(y) == 4 and min(x + y) > 0
        want = [y[i] / ((x[i] + x[i + 1]) / 2) for i in range(4)]
        assert leg["ratios"] == pytest.approx(want) and leg["ratio"] == pytest.approx(statistics.median(want))
    ab, ba = r["legs"]
    assert r["ratio_by_leg"] == pytest.approx([ab["ratio"], 1 / ba["ratio"]])     # both as B / A
    assert r["ratio"] == pytest.approx((ab["ratio"] / ba["ratio"]) ** 0.5)
    assert r["a_median_ms"] == pytest.approx(statistics.median(ab["first_ms"] + ba["second_ms"]))
    other = exported(make_checkpoint(tmp_path / "ck2", "qwen2", vocab_size=640), 4)
    for argv, why in (([str(art), str(art), "--rounds", "30", "--context", "64"], "do not fit the context"),
                      ([str(art), str(other), "--rounds", "2", "--steps", "2", "--context", "64"], "different vocabularies")):
        capsys.readouterr()
        assert ab_decode.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], err
