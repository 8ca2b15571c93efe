"""export/onnx_proto.py against the real `onnx` package: the same helper calls must give the same
bytes, and exporting must not need `onnx` at all."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper as onnx_helper, numpy_helper as onnx_numpy_helper

from conftest import BUNDLED_STORIES, ROOT, make_checkpoint
from edgert_export import decoder, export, graph, moe
from edgert_export import onnx_proto as P


@pytest.mark.parametrize("value", [3, -7, 2**40, np.int64(-1), True, 1e-6, 0.5, "swiglu", b"raw",
                                   [1, 0], [-1], [0.5, 2.0], [1, 2.5], ["a", "bc"]])
def test_attribute_bytes_equal_onnx_helper(value):
    ours = P.make_attribute("attr", value).SerializeToString()
    assert ours == onnx_helper.make_attribute("attr", value).SerializeToString()


@pytest.mark.parametrize("array", [np.arange(6, dtype=np.float32).reshape(2, 3), np.array(5, np.int64),
                                   np.array([0], np.int64), np.array([True, False]), np.zeros((0, 4), np.uint8),
                                   np.array([[1, -2]], np.int32), np.array([1.5], np.float16)])
def test_tensor_bytes_equal_numpy_helper(array):
    assert P.from_array(array, "t").SerializeToString() == onnx_numpy_helper.from_array(array, "t").SerializeToString()
    assert P.from_array(array).SerializeToString() == onnx_numpy_helper.from_array(array).SerializeToString()


@pytest.mark.parametrize("shape", [None, [], [1, "sequence"], [1, 4, "max_sequence", 16], ["a", 0]])
def test_value_info_bytes_equal_onnx_helper(shape):
    ours = P.make_tensor_value_info("x", P.TensorProto.INT64, shape).SerializeToString()
    assert ours == onnx_helper.make_tensor_value_info("x", onnx.TensorProto.INT64, shape).SerializeToString()


def _real_onnx(monkeypatch):
    """Point the graph code at the real onnx package instead of onnx_proto."""
    monkeypatch.setattr(graph, "proto", onnx)
    monkeypatch.setattr(graph, "OPSETS", [onnx_helper.make_opsetid("", 17), onnx_helper.make_opsetid("com.microsoft", 1)])
    for module in (graph, decoder, moe):
        monkeypatch.setattr(module, "TensorProto", onnx.TensorProto)
    for module in (graph, moe):
        monkeypatch.setattr(module, "helper", onnx_helper)
        monkeypatch.setattr(module, "numpy_helper", onnx_numpy_helper)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """Group-limited sigmoid routing (Cast to bool, OneHot, ReduceMax with axes), shared experts,
    16 experts in If groups of 8 with ConstantOfShape's tensor attribute: every construct we emit."""
    return make_checkpoint(tmp_path_factory.mktemp("ds3"), "deepseek_v3", n_routed_experts=16, num_experts_per_tok=3,
                           moe_intermediate_size=32, n_shared_experts=1, kv_lora_rank=32, q_lora_rank=24,
                           qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, first_k_dense_replace=1,
                           num_key_value_heads=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)


@pytest.mark.parametrize("case", ["stories-int4", "stories-fp32", "deepseek_v3-int4"])
def test_export_bytes_equal_onnx(case, deepseek, tmp_path, monkeypatch):
    """A whole export written through onnx_proto is byte-identical to one written through onnx
    (If subgraphs, tensor attributes, external and inline initializers, both MoE graphs)."""
    src = deepseek if case.startswith("deepseek") else BUNDLED_STORIES
    bits = 32 if case.endswith("fp32") else 4
    ours = export(src, tmp_path / "ours", bits=bits, progress=False)
    with monkeypatch.context() as m:
        _real_onnx(m)
        export(src, tmp_path / "onnx", bits=bits, progress=False)
    for name in [*ours["graphs"].values(), "model.onnx.data"]:
        a, b = (tmp_path / "ours" / name).read_bytes(), (tmp_path / "onnx" / name).read_bytes()
        assert a == b, f"{name} differs"
        if name.endswith(".onnx"):   # (onnx.checker refuses ORT's SimplifiedLayerNormalization in the "" domain)
            assert onnx.load_from_string(a).SerializeToString() == a
    if src is deepseek:     # the subgraph path was covered
        assert set(ours["graphs"]) == {"plain", "qmoe", "plain+nibbles"}
        plain = onnx.load(str(tmp_path / "ours" / "model.plain.onnx"), load_external_data=False)
        assert any(n.op_type == "If" for n in plain.graph.node)


def test_export_imports_no_onnx(tmp_path):
    """The exporter and the synthetic models of `edgert bench --synthetic` run where onnx is not
    installed (sys.modules['onnx'] = None makes importing it fail)."""
    code = (
        "import sys; sys.modules['onnx'] = None\n"
        "from edgert_export import export\n"
        f"export({str(BUNDLED_STORIES)!r}, {str(tmp_path / 'art')!r}, bits=4, progress=False)\n"
        "from edgert.model import Model; Model(sys.argv[1]).forward([1, 2, 3])\n"
        "from edgert_export.synthetic import SHAPES, build\n"
        "tiny = dict(SHAPES['qwen3-0.6b'], num_hidden_layers=1, hidden_size=128, intermediate_size=256, vocab_size=512,\n"
        "            bos_token_id=1, eos_token_id=2)  # token ids inside the small vocabulary (export checks them)\n"
        f"Model(build('tiny', 4, folder={str(tmp_path)!r}, config=tiny, progress=False)).forward([1, 2, 3])\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "art")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
