"""A Hugging Face folder through transformers in fp32: the numerical reference for `edgert eval
--reference MODEL_DIR`. Kept out of the runtime package (edgert/), which never imports torch or
transformers; torch and transformers are imported here only when a reference is asked for."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgert.evaluate import EvalError
from edgert.tokenizer import Tokenizer


class TransformersScorer:
    """A Hugging Face folder through transformers in fp32, the numerical reference."""

    def __init__(self, path: Path, window: int, threads: int | None = None):
        try:
            import torch
            import transformers
        except ImportError as e:
            raise EvalError(f"{path} is a Hugging Face folder: using it as the reference needs transformers and "
                            f"torch ({e.name} is missing); or pass an fp32 artifact (edgert export --bits 32)") from None
        if not (path / "tokenizer.json").is_file():
            raise EvalError(f"{path}: no tokenizer.json, so its tokens cannot be compared with the artifact's")
        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()      # its load report is ours to give, in one line
        try:
            self.model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                                 output_loading_info=True)
            self.model.eval()
        except Exception as e:    # transformers raises many types, with long texts
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EvalError(f"{path}: transformers cannot load the reference: {first[:300]}") from None
        # a tensor the checkpoint lacks would be random weights: a reference that means nothing
        missing = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
        if missing:
            raise EvalError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) the reference needs "
                            f"(e.g. {str(missing[0])[:80]}): transformers would fill them with random weights")
        self.tokenizer = Tokenizer.from_dir(path)
        self.context = getattr(self.model.config, "max_position_embeddings", None) or window

    def logits(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            return self.model(self.torch.tensor([ids])).logits[0].float().numpy()
