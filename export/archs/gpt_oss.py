"""gpt-oss (20b, 120b): learned attention sinks per head (GroupQueryAttention's head_sink, which
onnxruntime has from 1.23: the artifact records that minimum and older ones refuse it), sliding
window (128) and full attention alternating, q/k/v/o biases, YaRN; a router with a bias whose
top-k logits are softmaxed; experts with biases, gate/up rows interleaved and a clamped SwiGLU
((up + 1) * gate * sigmoid(1.702 gate), gate <= 7, |up| <= 7). The hub's checkpoints store the
experts as MXFP4 (blocks of 32 4-bit floats sharing a power-of-two scale); they are decoded
exactly to fp32 one expert at a time, then quantized like any other weight."""
import numpy as np

from ..moe import GLU, MoEDecoder, Routing

MIN_ONNXRUNTIME = "1.23"       # GroupQueryAttention's head_sink input
FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[rows, groups, 16] uint8 (two codes per byte, low nibble first) and [rows, groups] uint8
    exponents (bias 127) -> [rows, groups * 32] float32, exactly."""
    codes = np.empty((*blocks.shape, 2), np.uint8)
    codes[..., 0], codes[..., 1] = blocks & 15, blocks >> 4
    values = FP4[codes.reshape(*blocks.shape[:-1], -1)]
    return np.ldexp(values, scales.astype(np.int32)[..., None] - 127).reshape(blocks.shape[0], -1)


class Model(MoEDecoder):
    model_type = "gpt_oss"
    router_name = "router.weight"

    def __init__(self, config: dict):
        super().__init__(config)
        self.qkv_bias = True
        self.routing = Routing(self.routing.experts, self.routing.top_k, renormalize=True)
        self.glu = GLU(config.get("swiglu_alpha", 1.702), 1.0, config.get("swiglu_limit", 7.0))

    def attention_kind(self, g, i, io):
        io, options = super().attention_kind(g, i, io)
        sinks = self.ckpt.get(self.layer_prefix(i) + "self_attn.sinks")
        return io, {**options, "sink": g.const(f"layers.{i}.attn.sinks", sinks)}

    def router_bias(self, i):
        return self.ckpt.get(self.layer_prefix(i) + "mlp.router.bias")

    def experts(self, i):
        pre = self.layer_prefix(i) + "mlp.experts."
        rows = self.ckpt.rows
        packed = pre + "gate_up_proj_blocks" in self.ckpt
        for e in range(self.routing.experts):
            if packed:      # stored as the linear's [out, in]
                gate_up = mxfp4(*(rows(pre + f"gate_up_proj_{k}")[e : e + 1][0].astype(np.uint8) for k in ("blocks", "scales")))
                down = mxfp4(*(rows(pre + f"down_proj_{k}")[e : e + 1][0].astype(np.uint8) for k in ("blocks", "scales")))
            else:           # stored as [in, out]
                gate_up, down = rows(pre + "gate_up_proj")[e : e + 1][0].T, rows(pre + "down_proj")[e : e + 1][0].T
            bias = rows(pre + "gate_up_proj_bias")[e : e + 1][0]
            yield (gate_up[0::2], gate_up[1::2], np.ascontiguousarray(down), bias[0::2], bias[1::2],
                   rows(pre + "down_proj_bias")[e : e + 1][0])

    def extra_manifest(self):
        return {**super().extra_manifest(), "min_onnxruntime": MIN_ONNXRUNTIME}
