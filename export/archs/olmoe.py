"""OLMoE: RMSNorm over the whole q and k projections (not per head) + softmax top-k experts."""
from ..decoder import UnsupportedModel
from ..moe import MoEDecoder


class Model(MoEDecoder):
    model_type = "olmoe"
    qk_norm = "full"

    def __init__(self, config: dict):
        super().__init__(config)
        if config.get("clip_qkv") is not None:
            raise UnsupportedModel("olmoe with clip_qkv is not supported")
