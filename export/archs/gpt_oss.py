"""gpt-oss (20b, 120b): learned attention sinks per head (with an fp16/fp32 cache GroupQueryAttention's
head_sink, which onnxruntime has from 1.23: the artifact records that minimum and older ones refuse
it; the default int8 cache's standard-op attention adds them itself and runs on 1.22), sliding
window (128) and full attention alternating, q/k/v/o biases, YaRN; a router with a bias whose
top-k logits are softmaxed; experts with biases, gate/up rows interleaved and a clamped SwiGLU
((up + 1) * gate * sigmoid(1.702 gate), gate <= 7, |up| <= 7). The hub's checkpoints store the
experts as MXFP4 (blocks of 32 4-bit floats sharing a power-of-two scale); they are decoded
exactly to fp32 one expert at a time, then quantized like any other weight, except at
`--bits 8` (blocks of 32, its default), where int8 holds them exactly (`ExactInt8`)."""
import numpy as np

from ..moe import GLU, MoEDecoder, Routing
from ..quantize import Quantized, quantize

FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def _codes(blocks: np.ndarray) -> np.ndarray:
    """[rows, groups, 16] uint8, two 4-bit codes per byte, low nibble first -> [rows, groups, 32]."""
    codes = np.empty((*blocks.shape, 2), np.uint8)
    codes[..., 0], codes[..., 1] = blocks & 15, blocks >> 4
    return codes.reshape(*blocks.shape[:-1], -1)


def mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[rows, groups, 16] uint8 codes and [rows, groups] uint8 exponents (bias 127) -> [rows, groups * 32]
    float32, exactly."""
    return np.ldexp(FP4[_codes(blocks)], scales.astype(np.int32)[..., None] - 127).reshape(blocks.shape[0], -1)


class ExactInt8:
    """MXFP4 rows kept as codes for an int8 export with 32-wide blocks: a value c * 2^(s - 127) has
    2c an integer in [-12, 12], so int8 code 128 + 2c with the block scale 2^(s - 128) stores it
    exactly. Row slices, np.stack and reshape (how the exporter interleaves gate/up rows) act on codes
    and exponents alike; quantize() takes the codes through `quantized` (the hook synthetic weights
    use); anything else reads the values."""

    def __init__(self, twice: np.ndarray, exps: np.ndarray):      # int8 [N, K] of 2c, int32 [N, K/32] of s - 128
        self.twice, self.exps, self.shape, self.ndim = twice, exps, twice.shape, twice.ndim

    @classmethod
    def from_mxfp4(cls, blocks, scales):
        return cls((2 * FP4[_codes(blocks)]).astype(np.int8).reshape(blocks.shape[0], -1), scales.astype(np.int32) - 128)

    def __getitem__(self, rows):
        return ExactInt8(self.twice[rows], self.exps[rows])

    def reshape(self, *shape):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return ExactInt8(self.twice.reshape(shape), self.exps.reshape(*shape[:-1], shape[-1] // 32))

    def __array_function__(self, func, types, args, kwargs):
        if func is not np.stack:
            return NotImplemented
        axis = kwargs.get("axis", args[1] if len(args) > 1 else 0)
        return ExactInt8(*(np.stack([getattr(p, a) for p in args[0]], axis=axis) for a in ("twice", "exps")))

    def __array__(self, dtype=None, copy=None):
        return np.ldexp(self.twice.astype(np.float32), np.repeat(self.exps, 32, axis=-1)).astype(dtype or np.float32)

    def quantized(self, bits: int, block_size: int, symmetric: bool) -> Quantized:
        if (bits, block_size, symmetric) != (8, 32, True):
            return quantize(np.asarray(self), bits, block_size, symmetric)
        n, k = self.shape
        return Quantized((self.twice.astype(np.int16) + 128).astype(np.uint8).reshape(n, k // 32, 32),
                         np.ldexp(np.float32(1), self.exps).astype(np.float32), None, 8, 32, k)


class Model(MoEDecoder):
    model_type = "gpt_oss"
    router_name = "router.weight"
    gqa_min_onnxruntime = "1.23"    # GroupQueryAttention's head_sink input
    fold_heads = False              # a sink per query head: decode cannot fold them (graph.Fold)

    def __init__(self, config: dict):
        k = config.get("num_experts_per_tok") or config.get("experts_per_token")     # (the hub's config has both names)
        super().__init__({**config, "num_experts_per_tok": k} if k else config)
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
        exact = packed and (self.recipe.bits, self.recipe.block_for(self.hidden)) == (8, 32)
        for e in range(self.routing.experts):
            if packed:      # stored as the linear's [out, in]
                gate_up, down = ((ExactInt8.from_mxfp4 if exact else mxfp4)(
                    *(rows(f"{pre}{proj}_{k}")[e : e + 1][0].astype(np.uint8) for k in ("blocks", "scales")))
                    for proj in ("gate_up_proj", "down_proj"))
            else:           # stored as [in, out]
                gate_up, down = rows(pre + "gate_up_proj")[e : e + 1][0].T, rows(pre + "down_proj")[e : e + 1][0].T
            bias = rows(pre + "gate_up_proj_bias")[e : e + 1][0]
            yield gate_up[0::2], gate_up[1::2], down, bias[0::2], bias[1::2], rows(pre + "down_proj_bias")[e : e + 1][0]

    def extra_manifest(self):
        # parameters, not stored elements: an MXFP4 byte holds two, the exponents are not parameters
        n = sum(int(np.prod(self.ckpt.shape(x))) * (2 if x.endswith("_blocks") else 0 if x.endswith("_scales") else 1)
                for x in self.ckpt.names)
        return {**super().extra_manifest(), "parameters": n, "min_onnxruntime": self.min_onnxruntime(self.recipe.kv_cache)}
