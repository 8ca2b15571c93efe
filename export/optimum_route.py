"""The optimum route: model_types edgert does not build natively (gpt2, stablelm, phi, falcon, ...).

optimum-onnx exports the fp32 graph with its KV cache (past in, past + new out), onnxruntime's
own MatMulNBits quantizer makes its MatMuls int4 or int8, and the artifact gets the same
manifest, tokenizer files and atomic write as a native one, marked `"io": "optimum"`: the
runtime feeds it through an adapter (edgert/model.py, `Model._run_concat`).

What it costs against the native path (README, "The optimum route"): the graph re-reads and
re-writes the whole past on every step (a Concat per layer), round-to-nearest instead of GPTQ,
and its attention is plain ops, not GroupQueryAttention.

Needs `pip install 'edgert[optimum]'` (torch, optimum-onnx; optimum-onnx 0.1 wants
transformers < 4.58), which the runtime install never does.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from .decoder import UnsupportedModel
from .validate import MAX_FFN, MAX_HEADS, MAX_HIDDEN, MAX_LAYERS, MAX_VOCAB

INSTALL = "pip install 'edgert[optimum]' (torch and optimum-onnx)"


class OptimumMissing(UnsupportedModel):
    pass


def available() -> bool:
    try:
        _modules()
        return True
    except OptimumMissing:
        return False


def _modules():
    try:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
        from optimum.exporters.onnx import main_export
    except Exception as e:     # ImportError, or optimum failing against a transformers it does not know
        raise OptimumMissing(f"the optimum route needs {INSTALL}: {type(e).__name__}: {str(e)[:160]}") from None
    return onnx, MatMulNBitsQuantizer, DefaultWeightOnlyQuantConfig, main_export


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


def _contract(model) -> dict:
    """What the runtime's adapter needs from optimum's graph: input_ids, attention_mask,
    (position_ids), past_key_values.{i}.key/value [batch, kv_heads, past, head_dim] and the
    matching present.{i}.*, logits [batch, sequence, vocab]."""
    ins = {i.name: i for i in model.graph.input}
    outs = {o.name: o for o in model.graph.output}
    layers = sum(1 for name in ins if name.startswith("past_key_values.") and name.endswith(".key"))
    want = ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    extra = sorted(set(ins) - set(want) - {"position_ids"})
    missing = [n for n in want if n not in ins] + [n for n in ["logits"] + [f"present.{i}.{k}" for i in range(layers)
                                                                         for k in ("key", "value")] if n not in outs]
    if not layers or missing or extra:
        raise UnsupportedModel(f"optimum-onnx's graph has inputs/outputs edgert's adapter does not know "
                               f"(missing: {', '.join(missing[:4]) or '-'}; unknown: {', '.join(extra[:4]) or '-'})")
    kv = _dims(ins["past_key_values.0.key"])
    vocab = _dims(outs["logits"])[-1]
    if len(kv) != 4 or not all(isinstance(d, int) and d > 0 for d in (kv[1], kv[3], vocab)):
        raise UnsupportedModel(f"optimum-onnx's KV cache is {kv}, not [batch, kv_heads, past, head_dim] "
                               f"(fused or multi-query caches are not supported by the adapter)")
    return {"layers": layers, "kv_heads": kv[1], "head_dim": kv[3], "vocab": vocab,
            "position_ids": "position_ids" in ins}


def _gemm_to_matmul(onnx, model) -> None:
    """Gemm(x, W, b) with a constant W (GPT-2's Conv1D, some others' Linear) as MatMul + Add,
    which the MatMulNBits quantizer takes (it leaves Gemm in fp32)."""
    from onnx import numpy_helper
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            w = inits[node.input[1]]
            w.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T), w.name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = node.output[0] + "/matmul" if has_bias else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], node.input[1]], [product], name=node.name + "/MatMul"))
        if has_bias:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name + "/Add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


# the config fields transformers builds a decoder from, under their usual names; checked before torch
# allocates anything (a 1e9-wide config would otherwise be built before its weights are read)
_SIZES = {"hidden": ("hidden_size", "n_embd", "d_model"), "layers": ("num_hidden_layers", "n_layer", "num_layers"),
          "heads": ("num_attention_heads", "n_head", "num_heads"), "vocab": ("vocab_size",),
          "ffn": ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")}
_LIMITS = {"hidden": MAX_HIDDEN, "layers": MAX_LAYERS, "heads": MAX_HEADS, "vocab": MAX_VOCAB, "ffn": MAX_FFN}


def check(src: Path, config: dict) -> None:
    """What the optimum route needs before it starts torch: tokenizer.json (the runtime's), sizes
    within edgert's limits, and an fp32 model that fits in this machine's memory."""
    if not (src / "tokenizer.json").is_file():
        raise UnsupportedModel(f"{src}: no tokenizer.json (the runtime needs the fast-tokenizer file)")
    cfg = {**config, **(config.get("text_config") or {})}
    size = {}
    for what, keys in _SIZES.items():
        for key in keys:
            v = cfg.get(key)
            if v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= _LIMITS[what]:
                raise UnsupportedModel(f"{src / 'config.json'}: {key} must be an integer 1..{_LIMITS[what]}, not {str(v)[:40]!r}")
            size[what] = v
            break
    hidden, layers = size.get("hidden", 1), size.get("layers", 1)
    params = size.get("vocab", 1) * hidden + layers * (4 * hidden * hidden + 3 * hidden * size.get("ffn", 4 * hidden))
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 1 << 40
    if 4 * params > memory:
        raise UnsupportedModel(f"{src}: its config describes ~{params / 1e9:.1f}B parameters, {4 * params / 1e9:.0f} GB "
                               f"in fp32, more than this machine's {memory / 1e9:.0f} GB: optimum-onnx exports in fp32")


def build(src: Path, tmp: Path, config: dict, bits: int, block_size: int, note=print) -> tuple[dict, dict, int]:
    """Export `src` with optimum-onnx into tmp/model.onnx (+ model.onnx.data), quantized; returns
    (the manifest's model fields, its quantization fields, the model's longest context)."""
    onnx, Quantizer, WeightConfig, main_export = _modules()
    work = tmp / "optimum"
    note(f"optimum-onnx: exporting {config.get('model_type')} (fp32, with its KV cache)")
    for name in ("optimum", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        main_export(str(src), output=str(work), task="text-generation-with-past", device="cpu",
                    no_post_process=True, do_validation=False, local_files_only=True)
    model = onnx.load(str(work / "model.onnx"))
    shape = _contract(model)
    parameters = int(sum(np.prod(t.dims) for t in model.graph.initializer
                         if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 1))
    if bits in (4, 8):
        _gemm_to_matmul(onnx, model)
        note(f"onnxruntime's MatMulNBits quantizer: int{bits}, block {block_size}")
        logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("onnxruntime.quantization"):
                logging.getLogger(name).setLevel(logging.ERROR)
        q = Quantizer(model, algo_config=WeightConfig(
            bits=bits, block_size=block_size, is_symmetric=bits == 8, accuracy_level=4,
            op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1))))  # embeddings too
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            q.process()
        model = q.model.model
    quantized = sum(1 for n in model.graph.node if n.op_type == "MatMulNBits")
    embed_quantized = any(n.op_type == "GatherBlockQuantized" for n in model.graph.node)
    model.ir_version = min(model.ir_version, 10)          # onnxruntime 1.22 refuses IR > 10
    onnx.save(model, str(tmp / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    cfg = {**config, **config.get("text_config", {})}

    def first(*keys, default=None):
        return next((cfg[k] for k in keys if isinstance(cfg.get(k), int)), default)
    heads = first("num_attention_heads", "n_head", "num_heads", default=shape["kv_heads"])
    fields = {"layers": shape["layers"], "hidden": first("hidden_size", "n_embd", "d_model", default=heads * shape["head_dim"]),
              "heads": heads, "kv_heads": shape["kv_heads"], "head_dim": shape["head_dim"], "vocab": shape["vocab"],
              "parameters": max(parameters, 1)}
    quant = {"attention": bits, "mlp": bits, "lm_head": bits if quantized else 32, "embed": bits if embed_quantized else 32,
             "kv_cache": "fp32", "quantizer": "onnxruntime MatMulNBits" if bits != 32 else "none",
             "quantized_matmuls": quantized, **({"block_size": block_size} if bits != 32 else {}),
             "int4": "asymmetric (zero point per block)", "int8": "symmetric", "accuracy_level": 4}
    return fields, quant, max_positions(cfg)


def max_positions(cfg: dict) -> int:
    return next((cfg[k] for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
                 if isinstance(cfg.get(k), int) and cfg[k] > 0), 2048)
