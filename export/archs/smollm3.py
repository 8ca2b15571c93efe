"""SmolLM3: Llama whose every 4th layer (`no_rope_layers[i] == 0`) attends without rotary
position encoding (NoPE); GroupQueryAttention runs those layers with do_rotary=0."""
from ..decoder import Decoder, UnsupportedModel


class Model(Decoder):
    model_type = "smollm3"

    def __init__(self, config: dict):
        super().__init__(config)
        if config.get("mlp_bias"):
            raise UnsupportedModel("smollm3 with mlp_bias is not supported")
        self.rotary = config.get("no_rope_layers") or [int((i + 1) % config.get("no_rope_layer_interval", 4) != 0)
                                                       for i in range(self.n_layers)]

    def attention_kind(self, g, i, io):
        io, options = super().attention_kind(g, i, io)
        return io, {**options, "rotary": bool(self.rotary[i])}
