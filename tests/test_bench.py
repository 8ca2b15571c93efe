"""`edgert bench`: synthetic models against real exports of the same config, the roofline
arithmetic, the memory refusal, CPU feature parsing and the JSON the command prints."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from conftest import BUNDLED_STORIES, make_checkpoint
from edgert.bench import cpu_info, decode_bytes_per_token
from edgert.cli import _bench_json_value, app
from edgert.model import Model
from edgert_export.checkpoint import Checkpoint
from edgert_export.synthetic import SHAPES, SyntheticCheckpoint, SyntheticError, build, weight_bytes
from edgert_export.graph import Recipe

# 128 wide: a narrower model's export spends a default budget chosen from its calibration
# (quantize.default_budget), which a synthetic build's random codes have not; bench shapes are wider
TINY = {   # a dense Qwen2 with tied embeddings (q/k/v bias) and an OLMoE (q/k norm over all heads, experts)
    "qwen2": ("qwen2", dict(hidden_size=128, tie_word_embeddings=True, intermediate_size=160)),
    "olmoe": ("olmoe", dict(hidden_size=128, num_experts=8, num_experts_per_tok=2, intermediate_size=64,
                            norm_topk_prob=False)),
    # a vocabulary past split_head_min_vocab, untied: the lm_head as split int8 planes
    "qwen2-split-head": ("qwen2", dict(hidden_size=128, vocab_size=20000, intermediate_size=160)),
}


def _graph_summary(graph: onnx.GraphProto, ops: Counter, inits: list) -> None:
    for t in graph.initializer:
        inits.append((t.name, tuple(t.dims), t.data_type))
    for n in graph.node:
        ops[(n.domain, n.op_type)] += 1
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _graph_summary(a.g, ops, inits)


def summary(path) -> tuple:
    model = onnx.load(str(path), load_external_data=False)
    ops, inits = Counter(), []
    _graph_summary(model.graph, ops, inits)
    return ops, inits, [(v.name, str(v.type)) for v in (*model.graph.input, *model.graph.output)]


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request, tmp_path_factory):
    """(real export of a random tiny checkpoint, synthetic build of the same config, the checkpoint)."""
    model_type, overrides = TINY[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    src = make_checkpoint(tmp / "hf", model_type, **overrides)
    from edgert_export import export
    export(src, tmp / "real", bits=4, progress=False)
    config = json.loads((src / "config.json").read_text())
    return tmp / "real", build(f"tiny-{request.param}", 4, folder=tmp / "syn", config=config, progress=False), src


def test_synthetic_graph_equals_real_export(pair):
    """Same tensors in the checkpoint, same nodes, initializers, inputs and outputs in every graph,
    the same data file size: the bench measures what a real export would run."""
    real, syn, src = pair
    ckpt = Checkpoint(src)
    fake = SyntheticCheckpoint(ckpt.config)
    assert {n: ckpt.shape(n) for n in ckpt.names} == {n: fake.shape(n) for n in fake.names}
    real_m, syn_m = (json.loads((p / "edgert.json").read_text()) for p in (real, syn))
    for key in ("model", "quantization", "context_length", "graphs", "architecture"):
        if key == "quantization":   # random codes need no calibration: only how codes were chosen differs
            for m in (real_m, syn_m):
                for k in ("recipe", "calibration", "calibration_tokens", "calibration_seed"):
                    m[key].pop(k, None)
        assert real_m[key] == syn_m[key], key
    for name in real_m["graphs"].values():
        assert summary(real / name) == summary(syn / name), name
    real_bytes = (real / "model.onnx.data").stat().st_size
    assert (syn / "model.onnx.data").stat().st_size == real_bytes
    # the size estimate of the memory check: exact but for the 4 kB alignment of each external
    # tensor and the small tensors kept inline in the graph
    first = real / next(iter(real_m["graphs"].values()))
    tensors = len(onnx.load(str(first), load_external_data=False).graph.initializer)
    assert abs(real_bytes - weight_bytes(ckpt.config, Recipe())) <= 4096 * tensors


def test_synthetic_model_runs_like_a_real_one(pair):
    """Finite logits of a spread like the real random model's; the synthetic model's routing uses
    every expert (the real export's untrained router, quantization noise on its inputs, may starve one on 64 tokens)."""
    real, syn, _ = pair
    ids = list(range(10, 74))
    stds = []
    for path in (real, syn):
        model = Model(path, context=128)
        model.track_experts()
        logits = model.forward(ids, num_logits=len(ids))
        assert np.isfinite(logits).all()
        stds.append(float(logits.std()))
        if model.expert_counts is not None and path == syn:
            assert (model.expert_counts > 0).all(), model.expert_counts
    assert 0.2 < stds[1] / stds[0] < 5, stds


def test_synthetic_build_is_cached(pair, tmp_path):
    _, syn, src = pair
    config = json.loads((src / "config.json").read_text())
    mtime = (syn / "model.onnx.data").stat().st_mtime_ns
    assert build(syn.name.rsplit("-int", 1)[0], 4, folder=syn.parent, config=config, progress=False) == syn
    assert (syn / "model.onnx.data").stat().st_mtime_ns == mtime


def test_a_stale_synthetic_build_is_rebuilt(pair, tmp_path):
    """A cached build from another generator (its key differs) is replaced, not refused as a folder
    holding a file that an export does not write."""
    config = json.loads((pair[2] / "config.json").read_text())
    art = build("tiny-stale", 4, folder=tmp_path, config=config, progress=False)
    stamp = json.loads((art / "synthetic.json").read_text())
    (art / "synthetic.json").write_text(json.dumps({**stamp, "key": "from an older generator"}))
    assert build("tiny-stale", 4, folder=tmp_path, config=config, progress=False) == art
    assert json.loads((art / "synthetic.json").read_text()) == stamp


def test_builtin_shapes_have_the_real_parameter_counts():
    counts = {name: sum(int(np.prod(s)) for s in map(SyntheticCheckpoint(c).shape, SyntheticCheckpoint(c).names))
              for name, c in SHAPES.items()}
    assert counts["qwen2.5-0.5b"] == 494_032_768              # Qwen2.5-0.5B
    assert counts["r1-distill-qwen-1.5b"] == 1_777_088_000     # DeepSeek-R1-Distill-Qwen-1.5B
    assert round(counts["r1-distill-qwen-7b"] / 1e9, 2) == 7.62
    assert round(counts["qwen3-0.6b"] / 1e9, 2) == 0.60
    assert round(counts["olmoe-1b-7b"] / 1e9, 2) == 6.92
    assert round(counts["qwen3.5-35b-a3b"] / 1e9, 2) == 34.66    # Qwen3.5-35B-A3B's text model
    assert counts["qwen3.5-0.8b"] == 752_393_024                  # Qwen3.5-0.8B's text model
    assert counts["qwen3.5-2b"] == 1_881_825_088                  # the 2B's model-card sizes, tied as the 0.8B


def test_refuses_when_memory_is_short(tmp_path):
    with pytest.raises(SyntheticError, match=r"needs 5\.\d GiB of memory \(weights \+ KV cache \+ runtime\) but 1\.0 GiB is available") as e:
        build("r1-distill-qwen-7b", 4, folder=tmp_path, available=2**30)
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())        # refused before writing anything
    with pytest.raises(SyntheticError, match="unknown shape 'nope'; built-in shapes: qwen2.5-0.5b"):
        build("nope", 4, folder=tmp_path)
    with pytest.raises(SyntheticError, match="--context must be at most 4096"):
        build("olmoe-1b-7b", 4, context=5000, folder=tmp_path)


def test_roofline_arithmetic():
    """A tied int8 table read whole by lm_head, 2 int4 layers, 2 of 8 experts active, KV at position 100."""
    manifest = {"model": {"hidden": 64, "vocab": 1000, "head_dim": 16, "layers": 2, "kv_heads": 2,
                          "idle_expert_parameters": 6 * 3 * 64 * 32 * 2},
                "quantization": {"embed": 8, "lm_head": 8, "mlp": 4, "block_size": 32}, "context_length": 512}
    data = 10_000_000
    rope = 2 * 4 * 511 * 8                               # cos + sin tables but one row
    idle = 6 * 3 * 64 * 32 * 2 * (0.5 + 4.5 / 32)       # int4 codes + fp32 scale + 4-bit zero point per 32
    kv = 2 * 4 * 2 * 2 * 16 * 100                        # K and V, 2 layers, 2 heads x 16, 100 positions
    tied = decode_bytes_per_token(manifest, {"tie_word_embeddings": True}, data, 100)
    assert tied == pytest.approx(data - rope - idle + kv)
    untied = decode_bytes_per_token(manifest, {}, data, 100)
    table = 1000 * 64 * (1 + 4 / 32)                    # int8 codes + a scale per 32
    assert untied == pytest.approx(tied - table * (1 - 1 / 1000))


X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni amx_tile amx_int8 avx_vnni
processor\t: 1
physical id\t: 0
core id\t\t: 0
processor\t: 2
physical id\t: 0
core id\t\t: 1
"""
PI5 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b

processor\t: 1
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp

Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""
PHONE = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp i8mm sve sve2
CPU implementer\t: 0x41
CPU part\t: 0xd46
"""


def test_cpu_info_parsing():
    x86 = cpu_info(X86)
    assert x86 == {"model": "Intel(R) Xeon(R) Platinum 8480+", "cores": 2,        # SMT siblings count once
                   "features": ["amx", "avx2", "avx512", "avx512_vnni", "avx_vnni"]}
    assert cpu_info(PI5) == {"model": "Raspberry Pi 5 Model B Rev 1.0", "cores": 2, "features": ["dotprod", "neon"]}
    phone = cpu_info(PHONE)
    assert phone["features"] == ["dotprod", "i8mm", "neon", "sve", "sve2"]
    assert phone["model"] == "ARM implementer 0x41 part 0xd46" and phone["cores"] == 1


KEYS = {"decode_tok_s", "prefill_tok_s", "ttft_s", "load_s", "peak_rss_mb", "model_mb", "bits_per_weight",
        "bandwidth_gbs", "roofline_tok_s", "roofline_pct", "threads", "cpu", "onnxruntime", "cpu_features",
        "active_parameters_per_token", "decode_tok_s_min", "decode_tok_s_max", "prefill_tok_s_min", "ttft_s_max"}


def test_bench_json(exported, tmp_path):
    art = exported(BUNDLED_STORIES, 4)
    args = ["bench", str(art), "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "2", "--threads", "1"]
    r = CliRunner().invoke(app, _bench_json_value(args + ["--json"]))
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)             # one JSON object and nothing else on stdout
    assert KEYS <= set(result)
    assert result["threads"] == 1 and result["decode_tok_s_min"] <= result["decode_tok_s"] <= result["decode_tok_s_max"]
    assert result["roofline_pct"] == pytest.approx(100 * result["decode_tok_s"] / result["roofline_tok_s"])
    assert result["bits_per_weight"] == pytest.approx(8 * (art / "model.onnx.data").stat().st_size / result["parameters"])
    # with a FILE: the table on stdout, the same keys in the file (the old behaviour)
    out = tmp_path / "b.json"
    r = CliRunner().invoke(app, args + ["--json", str(out)])
    assert r.exit_code == 0 and "roofline" in r.stdout and KEYS <= set(json.loads(out.read_text()))


def test_bench_json_flag_takes_no_value_before_another_option():
    assert _bench_json_value(["bench", "A", "--json"]) == ["bench", "A", "--json", "-"]
    assert _bench_json_value(["bench", "--json", "--synthetic", "x"]) == ["bench", "--json", "-", "--synthetic", "x"]
    assert _bench_json_value(["bench", "A", "--json", "f.json"]) == ["bench", "A", "--json", "f.json"]
    assert _bench_json_value(["run", "A", "--json"]) == ["run", "A", "--json"]


def test_bench_bad_input_is_one_line():
    for args, message in ((["bench"], "give an artifact folder or --synthetic SHAPE"),
                          (["bench", "--synthetic", "nope"], "unknown shape 'nope'"),
                          (["bench", "--synthetic", "qwen3-0.6b", "--bits", "3"], "--bits must be 4 or 8"),
                          (["bench", "some-artifact", "--bits", "8"], "--bits applies to --synthetic models only"),
                          (["bench", "--synthetic", "qwen3-0.6b", "--context", "100"], "--context 100 cannot hold")):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
