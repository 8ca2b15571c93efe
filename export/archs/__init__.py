"""One small module per architecture; each defines `Model`, a subclass of decoder.Decoder."""
from __future__ import annotations

import importlib

from ..decoder import Decoder, UnsupportedModel

# model_type in config.json -> module in this package
ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "olmoe": "olmoe",
    "granitemoe": "granitemoe",
    "deepseek_v2": "deepseek_v2",
    "deepseek_v3": "deepseek_v3",
    "smollm3": "smollm3",
    "phi3": "phi3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "ernie4_5": "ernie4_5",
    "ernie4_5_moe": "ernie4_5_moe",
    "gpt_oss": "gpt_oss",
    "lfm2": "lfm2",
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
    "lfm2_moe": "lfm2_moe",
    "qwen3_5_moe": "qwen3_5_moe",
    "qwen3_5_moe_text": "qwen3_5_moe",
}


def model_for(config: dict) -> Decoder:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModel(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
    module = importlib.import_module(f".{ARCHITECTURES[model_type]}", __package__)
    try:
        return module.Model(config)
    except KeyError as e:
        raise UnsupportedModel(f"config.json lacks {e.args[0]!r}, which a {model_type} model needs") from None
