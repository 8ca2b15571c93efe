"""Check a Hugging Face checkpoint before anything is built from it (README: Security).

`validate(ckpt)` runs before any graph, temporary folder or large array exists: config.json's
values against what the architectures read (types, > 0, divisibility, the limits below),
token ids and generation settings, and every tensor the decoder reads by name against the
shapes the config implies, with a floating-point dtype. The safetensors headers themselves
(offsets inside the file and not overlapping, shapes matching byte counts, shard names) are
checked when they are opened (checkpoint.py), and NaN/Inf weights as each tensor is read.
"""
from __future__ import annotations

import math
import re

from .checkpoint import CheckpointError

# ---- limits --------------------------------------------------------------------------------------
MAX_HIDDEN = 1 << 16
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_VOCAB = 1 << 22
MAX_FFN = 1 << 18
MAX_EXPERTS = 4096
MAX_POSITIONS = 1 << 24
MAX_TOKEN_IDS = 64
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, want: str, value):
        shown = repr(value)[:40]
        raise CheckpointError(f"{self.where}: {key} must be {want}, not {shown}")

    def int(self, d: dict, key: str, lo: int, hi: int, required=False, allow_null=False):
        if key not in d or (d[key] is None and allow_null):
            if required:
                raise CheckpointError(f"{self.where}: {key} is missing (an integer {lo}..{hi})")
            return None
        v = d[key]
        if not _int(v) or not lo <= v <= hi:
            self.fail(key, f"an integer {lo}..{hi}", v)
        return v

    def number(self, d: dict, key: str, lo: float, hi: float, positive=False):
        if d.get(key) is None:
            return None
        v = d[key]
        if not _finite(v) or not lo <= v <= hi or (positive and v <= 0):
            self.fail(key, f"a finite number {'> 0' if positive else f'{lo}..{hi}'}" + (f" and <= {hi:g}" if positive else ""), v)
        return v

    def bool(self, d: dict, key: str):
        if d.get(key) is not None and not isinstance(d[key], bool):
            self.fail(key, "true or false", d[key])

    def token_ids(self, d: dict, key: str, vocab: int):
        v = d.get(key)
        if v is None:
            return
        ids = v if isinstance(v, list) else [v]
        if not ids and isinstance(v, list):
            return
        if len(ids) > MAX_TOKEN_IDS or not all(_int(i) and 0 <= i < vocab for i in ids):
            self.fail(key, f"a token id (or list of them) below vocab_size {vocab}", v)


def validate_config(config, generation: dict | None = None, where: str = "config.json") -> None:
    c = _Checker(where)
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    if not isinstance(config.get("model_type"), str):
        c.fail("model_type", "a string", config.get("model_type"))
    hidden = c.int(config, "hidden_size", 1, MAX_HIDDEN, required=True)
    layers = c.int(config, "num_hidden_layers", 1, MAX_LAYERS, required=True)
    heads = c.int(config, "num_attention_heads", 1, MAX_HEADS, required=True)
    vocab = c.int(config, "vocab_size", 1, MAX_VOCAB, required=True)
    kv = c.int(config, "num_key_value_heads", 1, heads, allow_null=True) or heads
    if heads % kv:
        c.fail("num_key_value_heads", f"a divisor of num_attention_heads ({heads})", kv)
    head_dim = c.int(config, "head_dim", 1, MAX_HEAD_DIM, allow_null=True)
    if head_dim is None and hidden % heads:
        c.fail("hidden_size", f"a multiple of num_attention_heads ({heads}) when head_dim is not given", hidden)
    if head_dim is None and hidden // heads > MAX_HEAD_DIM:
        c.fail("hidden_size / num_attention_heads", f"at most {MAX_HEAD_DIM}", hidden // heads)
    for key in ("intermediate_size", "moe_intermediate_size"):
        c.int(config, key, 1, MAX_FFN, allow_null=True)
    c.int(config, "shared_expert_intermediate_size", 0, MAX_FFN, allow_null=True)
    experts = None
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        experts = c.int(config, key, 0, MAX_EXPERTS, allow_null=True) or experts
    if experts:
        c.int(config, "num_experts_per_tok", 1, experts, required=True)
    c.int(config, "max_position_embeddings", 1, MAX_POSITIONS)
    c.int(config, "decoder_sparse_step", 0, layers, allow_null=True)
    c.int(config, "first_k_dense_replace", 0, layers, allow_null=True)
    for key in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
        c.int(config, key, 1, MAX_HIDDEN, allow_null=True)
    groups = c.int(config, "n_group", 1, MAX_EXPERTS, allow_null=True)
    c.int(config, "topk_group", 1, groups or MAX_EXPERTS, allow_null=True)
    if groups and experts and experts % groups:
        c.fail("n_group", f"a divisor of the expert count ({experts})", groups)
    mlp_only = config.get("mlp_only_layers")
    if mlp_only is not None and (not isinstance(mlp_only, list) or not all(_int(i) and 0 <= i < layers for i in mlp_only)):
        c.fail("mlp_only_layers", f"a list of layer numbers below {layers}", mlp_only)
    c.number(config, "rms_norm_eps", 0, 1, positive=True)
    c.number(config, "rope_theta", 0, 1e12, positive=True)
    for key in ("routed_scaling_factor", "embedding_multiplier", "residual_multiplier", "attention_multiplier"):
        c.number(config, key, -1e6, 1e6)
    c.number(config, "logits_scaling", 0, 1e6, positive=True)
    c.number(config, "clip_qkv", 0, 1e6, positive=True)
    c.number(config, "partial_rotary_factor", 0, 1, positive=True)
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias", "norm_topk_prob", "rope_interleave"):
        c.bool(config, key)
    for key in ("rope_scaling", "rope_parameters"):
        p = config.get(key)
        if p is None:
            continue
        if not isinstance(p, dict):
            c.fail(key, "an object (or null)", p)
        pc = _Checker(f"{where}: {key}")
        kind = p.get("rope_type", p.get("type", "default"))
        if not isinstance(kind, str):
            pc.fail("rope_type", "a string", kind)
        pc.number(p, "rope_theta", 0, 1e12, positive=True)
        pc.number(p, "factor", 0, 1e6, positive=True)
        pc.int(p, "original_max_position_embeddings", 1, MAX_POSITIONS, allow_null=True)
        for k in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor", "mscale",
                  "mscale_all_dim"):
            pc.number(p, k, 0, 1e6, positive=k in ("low_freq_factor", "high_freq_factor"))
        if kind == "llama3":
            for k in ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"):
                if p.get(k) is None:
                    raise CheckpointError(f"{where}: {key}.{k} is missing (llama3 rope scaling needs it)")
            if p["low_freq_factor"] >= p["high_freq_factor"]:
                pc.fail("low_freq_factor", "below high_freq_factor", p["low_freq_factor"])
        if kind == "yarn" and p.get("factor") is None:
            raise CheckpointError(f"{where}: {key}.factor is missing (yarn rope scaling needs it)")
    for d, name in ((config, where), (generation or {}, "generation_config.json")):
        t = _Checker(name)
        for key in ("bos_token_id", "eos_token_id"):
            t.token_ids(d, key, vocab)
        if d.get("pad_token_id") is not None and not _int(d["pad_token_id"]):     # -1 (none) is common
            t.fail("pad_token_id", "an integer", d["pad_token_id"])
        if d is generation:
            t.bool(d, "do_sample")
            t.number(d, "temperature", 0, 100)
            t.number(d, "top_p", 0, 1)
            t.int(d, "top_k", 0, MAX_VOCAB, allow_null=True)
            t.number(d, "repetition_penalty", 1e-3, 100, positive=True)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def expected_shapes(config: dict) -> dict:
    """name suffix -> shape, for the tensors every Llama-family layer names the same way."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or hidden // heads
    shapes = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,)}
    q_rows = heads * hd * (2 if str(config.get("model_type", "")).startswith("qwen3_5") else 1)  # Qwen3.5: + output gate
    if not str(config.get("model_type", "")).startswith("deepseek"):     # MLA names its own projections
        shapes.update({"self_attn.q_proj.weight": (q_rows, hidden), "self_attn.k_proj.weight": (kv * hd, hidden),
                       "self_attn.v_proj.weight": (kv * hd, hidden), "self_attn.o_proj.weight": (hidden, heads * hd),
                       "self_attn.q_proj.bias": (heads * hd,), "self_attn.k_proj.bias": (kv * hd,),
                       "self_attn.v_proj.bias": (kv * hd,)})
    ffn = config.get("intermediate_size")
    if ffn and config.get("model_type") in ("llama", "qwen2", "qwen3"):
        shapes.update({"mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden),
                       "mlp.down_proj.weight": (hidden, ffn)})
    moe_ffn = config.get("moe_intermediate_size") or ffn
    if moe_ffn:
        shapes.update({"gate_proj": (moe_ffn, hidden), "up_proj": (moe_ffn, hidden), "down_proj": (hidden, moe_ffn)})
    if ffn:
        shapes.update({"w1": (ffn, hidden), "w3": (ffn, hidden), "w2": (hidden, ffn)})
    return shapes


_EXPERT = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")


# a multimodal checkpoint's text model (Gemma 3): its names as a text-only checkpoint's
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))


def _text_name(name: str) -> str:
    for prefix, plain in _TEXT_PREFIXES:
        if name.startswith(prefix):
            return plain + name[len(prefix):]
    return name


def validate_tensors(ckpt) -> None:
    """Dtypes and shapes of the tensors the decoder reads by name, against config.json."""
    cfg = text_config(ckpt.config)
    vocab, hidden, layers = cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]
    shapes = expected_shapes(cfg)
    seen_layers = set()
    names = {_text_name(n): n for n in ckpt.names}
    for name, stored in names.items():
        dtype, shape = ckpt.dtype(stored), tuple(ckpt.shape(stored))
        if (name.endswith(".weight") or name.endswith(".bias")) and dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{ckpt.dir.name}: tensor {stored} has dtype {dtype}; weights must be "
                                  f"{', '.join(FLOAT_DTYPES)}")
        want = None
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            want = (vocab, hidden)
        elif name == "model.norm.weight":
            want = (hidden,)
        else:
            m = _LAYER.match(name)
            if m:
                seen_layers.add(int(m.group(1)))
                rest = m.group(2)
                e = _EXPERT.search(rest)
                want = shapes.get(e.group(1)) if e else shapes.get(rest)
        if want is not None and shape != want:
            raise CheckpointError(f"{ckpt.dir.name}: tensor {stored} has shape {list(shape)}, config.json implies "
                                  f"{list(want)}")
    if "model.embed_tokens.weight" not in names:
        raise CheckpointError(f"{ckpt.dir.name}: tensor model.embed_tokens.weight is missing from the checkpoint")
    # layers past num_hidden_layers would be dropped without a word (a truncated model); DeepSeek-style
    # multi-token-prediction layers (num_nextn_predict_layers) follow the last one and are not built
    mtp = cfg.get("num_nextn_predict_layers")
    extra = sorted(i for i in seen_layers if i >= layers + (mtp if _int(mtp) and 0 <= mtp <= MAX_LAYERS else 0))
    if extra:
        raise CheckpointError(f"{ckpt.dir.name}: config.json says {layers} layers but the checkpoint has weights for "
                              f"layer {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + "; refused rather than exporting a truncated model")
    missing = sorted(set(range(layers)) - seen_layers)
    if missing:
        raise CheckpointError(f"{ckpt.dir.name}: config.json says {layers} layers but the checkpoint has no weights "
                              f"for layer {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def text_config(config: dict) -> dict:
    """A multimodal checkpoint's text-model settings (Qwen3.5 keeps them under text_config)."""
    text = config.get("text_config") if isinstance(config, dict) else None
    return {**config, **text} if isinstance(text, dict) and "hidden_size" not in config else config


def validate(ckpt, tensors: bool = True) -> None:
    """Everything above; raises CheckpointError with one line."""
    folder = getattr(ckpt, "dir", None)
    validate_config(text_config(ckpt.config), getattr(ckpt, "generation_config", {}),
                    f"{folder.name}/config.json" if folder is not None else "config.json")
    if tensors:
        validate_tensors(ckpt)
