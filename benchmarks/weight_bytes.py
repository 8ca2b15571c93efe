"""Weight bytes a decode step reads, per runner's own model file: the numerator of the roofline.

A decode step reads every weight once, except (a) tables that are only looked up (an embedding
gathers one row per token; a tied table used as lm_head is read whole) and (b) MoE experts, of
which a token reads top-k of E. Counting from each runner's own file (ONNX initializers, GGUF
tensors) rather than from its size on disk keeps fp32 embedding tables and duplicated tied
weights out of the figure.
"""
from __future__ import annotations

from pathlib import Path

GRAPH_PREFERENCE = ("model.qmoe.onnx", "model.onnx", "model_quantized.onnx")


def _graph(folder: Path) -> Path:
    for name in GRAPH_PREFERENCE:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.onnx"))
    if not found:
        raise FileNotFoundError(f"no .onnx graph in {folder}")
    return found[0]


def _nodes(graph):
    import onnx
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(a.g)


def onnx_bytes_per_token(folder, expert_share: float = 1.0) -> int:
    """Initializer bytes of the folder's graph, lookup-only tables out, QMoE expert weights x expert_share."""
    import onnx
    from onnx import helper

    g = onnx.load(str(_graph(Path(folder))), load_external_data=False).graph
    lookup_only: dict[str, bool] = {}
    experts: set[str] = set()
    for n in _nodes(g):
        for i, name in enumerate(n.input):
            is_lookup = n.op_type.startswith("Gather") and i == 0
            lookup_only[name] = lookup_only.get(name, True) and is_lookup
            if n.op_type == "QMoE" and i >= 2:
                experts.add(name)
    total = 0.0
    for t in g.initializer:
        if lookup_only.get(t.name, False):
            continue
        count = 1
        for d in t.dims:
            count *= d
        if t.data_type in (onnx.TensorProto.UINT4, onnx.TensorProto.INT4):
            size = count / 2
        else:
            size = count * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += size * (expert_share if t.name in experts else 1.0)
    return int(total)


def gguf_bytes_per_token(path, expert_share: float = 1.0) -> int:
    """GGUF tensor bytes; token_embd is a lookup unless the model has no output.weight (tied)."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    total = 0.0
    for t in tensors:
        if t.name == "token_embd.weight" and not tied:
            continue
        total += int(t.n_bytes) * (expert_share if "_exps." in t.name else 1.0)
    return int(total)


def hf_bytes_per_token(config: dict, active_params: int, bytes_per_param: int = 4) -> int:
    """A transformers model in memory: active parameters, less an untied input embedding."""
    read = active_params
    if not config.get("tie_word_embeddings", False):
        read -= config["vocab_size"] * config["hidden_size"]
    return read * bytes_per_param


def expert_share(config: dict) -> float:
    """top-k / E for MoE configs, else 1."""
    experts = config.get("num_experts") or config.get("num_local_experts")
    return config["num_experts_per_tok"] / experts if experts else 1.0
