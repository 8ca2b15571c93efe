"""The sparse-expert FFN shared by every MoE architecture: each token computes only the experts
its router picks, so cost per token follows the active parameters.

Expert weights are quantized once per layer into stacked tensors [E, ...] (QMoE's layout); the
plain graph reads each expert's slice of the same bytes as MatMulNBits weights. Two strategies,
one artifact, one copy of the weights:
  qmoe  - com.microsoft QMoE (CPU kernel since onnxruntime 1.23): routing + experts in one node;
  plain - standard ops + MatMulNBits for any onnxruntime: tokens are sorted by expert (NonZero on
          the routing mask), each expert runs once on its rows inside an If that skips it when no
          token chose it, and results are gathered back and weighted. Experts sit in groups under
          a second level of If, so a decode step touches ~E/group + k*group branches, not E.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import graph as G
from .decoder import Decoder
from .graph import Graph
from .onnx_proto import TensorProto, helper, numpy_helper
from .quantize import auto_block


@dataclass(frozen=True)
class Routing:
    experts: int
    top_k: int
    renormalize: bool            # top-k weights divided by their sum (Mixtral, Granite, Qwen3-MoE usually)
    # DeepSeek-style extras (defaults = plain softmax routing)
    scoring: str = "softmax"     # or "sigmoid" (V3)
    scale: float = 1.0           # routed_scaling_factor, applied to the final weights
    groups: int = 1              # experts come in groups; only the best `top_groups` may be picked
    top_groups: int = 1
    group_score: str = "max"     # V2: best expert of the group; V3: "top2" = sum of its two best
    masked: float = 0.0          # what a masked-out expert scores (V2 0, V3 -inf)
    bias: tuple | None = None    # V3 e_score_correction_bias: shifts the choice, not the weights
    norm_min: float = 0.0        # renormalise by max(sum, norm_min) (ERNIE 4.5's moe_norm_min)

    @property
    def simple(self) -> bool:
        return self.scoring == "softmax" and self.scale == 1.0 and self.groups == 1 and self.bias is None


@dataclass(frozen=True)
class GLU:
    """The experts' gated activation: down((up + beta) * gate * sigmoid(alpha * gate)) with gate <= limit
    and |up| <= limit (limit 0: none). The default is SwiGLU; gpt-oss uses 1.702, 1 and 7."""
    alpha: float = 1.0
    beta: float = 0.0
    limit: float = 0.0


def glu(g: Graph, gate: str, up: str, act: GLU, name: str) -> str:
    if act == GLU():
        return G.silu_mul(g, gate, up, name)
    if act.limit:
        lim, neg = (g.const(name + n, np.array(v, np.float32)) for n, v in ((".lim", act.limit), (".nlim", -act.limit)))
        gate = g.op("Clip", [gate, "", lim], name + ".gate_clip")
        up = g.op("Clip", [up, neg, lim], name + ".up_clip")
    if act.beta:
        up = g.op("Add", [up, g.const(name + ".beta", np.array(act.beta, np.float32))], name + ".up_beta")
    return g.op("Mul", [g.ms("QuickGelu", [gate], name + ".gate_act", alpha=float(act.alpha)), up], name)


def _i64(g: Graph, name: str, values) -> str:
    return g.const(name, np.array(values, np.int64))


def route(g: Graph, logits: str, r: Routing, name: str) -> tuple[str, str]:
    """router logits [T,E] -> (weights [T,k], expert ids [T,k]) by the architecture's rule."""
    k = _i64(g, name + ".k", [r.top_k])
    if r.simple and r.renormalize:   # softmax over all, renormalised top-k == softmax over the top-k logits
        top, ids = g.op("TopK", [logits, k], name + ".topk", outputs=2, axis=-1)
        return g.op("Softmax", [top], name + ".weights", axis=-1), ids
    scores, choice = choice_scores(g, logits, r, name)
    ids = g.op("TopK", [choice, k], name + ".topk", outputs=2, axis=-1)[1]
    weights = g.op("GatherElements", [scores, ids], name + ".picked", axis=-1) if choice != scores else None
    if weights is None:
        weights = g.op("TopK", [scores, k], name + ".topk_w", outputs=2, axis=-1)[0]
    if r.renormalize:
        total = g.op("ReduceSum", [weights, _i64(g, name + ".ax", [-1])], name + ".total", keepdims=1)
        floor = g.const(name + ".tiny", np.array(r.norm_min or 1e-20, np.float32))
        weights = g.op("Div", [weights, g.op("Max" if r.norm_min else "Add", [total, floor], name + ".total_eps")],
                       name + ".renorm")
    if r.scale != 1.0:
        weights = g.op("Mul", [weights, g.const(name + ".scale", np.array(r.scale, np.float32))], name + ".scaled")
    return weights, ids


def choice_scores(g: Graph, logits: str, r: Routing, name: str) -> tuple[str, str]:
    """(scores the weights come from, scores the experts are chosen by)."""
    scores = g.op("Softmax" if r.scoring == "softmax" else "Sigmoid", [logits], name + ".scores",
                  **({"axis": -1} if r.scoring == "softmax" else {}))
    choice = scores
    if r.bias is not None:
        choice = g.op("Add", [scores, g.const(name + ".bias", np.array(r.bias, np.float32))], name + ".biased")
    if r.groups > 1:
        per = r.experts // r.groups
        grouped = g.op("Reshape", [choice, _i64(g, name + ".gshape", [-1, r.groups, per])], name + ".grouped")
        if r.group_score == "max":
            best = g.op("ReduceMax", [grouped], name + ".gbest", axes=[-1], keepdims=0)   # (opset 17: axes attribute)
        else:   # sum of the two best experts of each group
            two = g.op("TopK", [grouped, _i64(g, name + ".k2", [2])], name + ".gtop2", outputs=2, axis=-1)[0]
            best = g.op("ReduceSum", [two, _i64(g, name + ".gax", [-1])], name + ".gbest", keepdims=0)
        keep = g.op("TopK", [best, _i64(g, name + ".kg", [r.top_groups])], name + ".gtopk", outputs=2, axis=-1)[1]
        onehot = g.op("OneHot", [keep, _i64(g, name + ".ng", [r.groups]), g.const(name + ".01", np.array([0, 1], np.float32))],
                      name + ".gonehot", axis=-1)                                         # [T, top_groups, groups]
        mask = g.op("ReduceMax", [onehot], name + ".gmask", axes=[1], keepdims=0)           # [T, groups]
        mask = g.op("Expand", [g.op("Unsqueeze", [mask, _i64(g, name + ".uax", [-1])], name + ".gmask3"),
                               _i64(g, name + ".eshape", [1, 1, per])], name + ".gmask_e")
        mask = g.op("Reshape", [mask, _i64(g, name + ".mshape", [-1, r.experts])], name + ".emask")
        choice = g.op("Where", [g.op("Cast", [mask], name + ".bmask", to=TensorProto.BOOL), choice,
                                g.const(name + ".masked", np.array(r.masked, np.float32))], name + ".choice")
    return scores, choice


class ExpertWeights:
    """All experts of one layer, quantized and written once, stacked as QMoE wants them.
    (fp32, the reference export, keeps plain per-expert MatMul weights: QMoE is integer-only.)
    `experts` yields (gate, up, down) or, with biases, (gate, up, down, gate_bias, up_bias, down_bias)."""

    def __init__(self, g: Graph, experts, hidden: int, ffn: int, bits: int, block_size: int, name: str):
        block_size = block_size or auto_block(hidden, ffn, bits=bits)     # one block for fc1 and fc2 (QMoE's)
        self.hidden, self.ffn, self.bits, self.block_size, self.name = hidden, ffn, bits, block_size, name
        self.arrays, self.fp32 = {}, []
        self.qmoe_ok = bits != 32 and hidden % block_size == 0 and ffn % block_size == 0
        if bits == 32:
            for e, (gate, up, dn, *b) in enumerate(experts):
                self.fp32.append((G.linear_operands(g, np.concatenate([gate, up]), f"{name}.e{e}.gate_up", 32, 0,
                                                    np.concatenate(b[:2]) if b else None),
                                  G.linear_operands(g, dn, f"{name}.e{e}.down", 32, 0, b[2] if b else None)))
            return
        gate_up, down, biases = [], [], []
        for gate, up, dn, *b in experts:        # one expert in fp32 at a time
            if b:                               # interleaved like the rows
                biases.append((np.stack(b[:2], axis=1).reshape(-1).astype(np.float32), b[2].astype(np.float32)))
            # QMoE's CPU kernel reads gate/up rows interleaved: g0 u0 g1 u1 ...
            # the router reads the experts' input: its statistics serve gate/up (see calibrate.py)
            gate_up.append(g.quantizer(np.stack([gate, up], axis=1).reshape(2 * ffn, hidden), bits, block_size,
                                       name + ".router", record=name + ".experts.gate_up"))
            down.append(g.quantizer(dn, bits, block_size, record=name + ".experts.down"))
        for proj, qs in (("fc1", gate_up), ("fc2", down)):
            rows = qs[0].packed.shape[0]
            self._write(g, f"{proj}.weight", np.stack([q.packed.reshape(rows, -1) for q in qs]))
            self._write(g, f"{proj}.scales", np.stack([q.scales for q in qs]))
            if qs[0].zero_points is not None:
                self._write(g, f"{proj}.zero_points", np.stack([q.zero_points for q in qs]))
        for j, proj in enumerate(("fc1", "fc2") if biases else ()):
            self._write(g, f"{proj}.bias", np.stack([b[j] for b in biases]))
        self.kb = {"fc1": gate_up[0].scales.shape[1], "fc2": down[0].scales.shape[1]}

    def _write(self, g: Graph, key: str, array: np.ndarray):
        self.arrays[key] = (g.const(f"{self.name}.{key}", array), array)

    def qmoe_inputs(self) -> dict:
        return {k: v[0] for k, v in self.arrays.items()}

    def expert_operands(self, g: Graph, e: int, proj: str) -> tuple:
        """Operands for expert e's projection; quantized ones read its slice of the stacked tensors."""
        if self.fp32:
            return self.fp32[e][0 if proj == "fc1" else 1]
        name = f"{self.name}.e{e}.{proj}"
        n, k = (2 * self.ffn, self.hidden) if proj == "fc1" else (self.hidden, self.ffn)
        ops = []
        for key in ("weight", "scales", "zero_points"):
            if f"{proj}.{key}" not in self.arrays:
                ops.append("")
                continue
            stacked, array = self.arrays[f"{proj}.{key}"]
            # MatMulNBits wants B as [N, k_blocks, blob]; scales and zero points flat
            shape = [n, self.kb[proj], array[e].size // (n * self.kb[proj])] if key == "weight" else [array[e].size]
            ops.append(g.slice_of(stacked, array, e, f"{name}.{key}", shape))
        if f"{proj}.bias" in self.arrays:       # MatMulNBits' inputs 4 and 5: g_idx (none), bias
            stacked, array = self.arrays[f"{proj}.bias"]
            ops += ["", g.slice_of(stacked, array, e, f"{name}.bias")]
        return ("MatMulNBits", ops, dict(K=k, N=n, bits=self.bits, block_size=self.block_size, accuracy_level=4))


def qmoe(g: Graph, x2: str, logits: str, ew: ExpertWeights, r: Routing, name: str, act: GLU = GLU()) -> str:
    """One QMoE node. It picks experts by top-k of `router_probs` and, given `router_weights`,
    gathers the weights from those (renormalised when normalize_routing_weights); without them
    it uses the softmax over the top-k logits, which is exactly renormalised softmax routing."""
    a = ew.qmoe_inputs()
    probs, weights = logits, ""
    if not (r.simple and r.renormalize):
        weights, probs = choice_scores(g, logits, r, name)
        if r.scale != 1.0 and not r.renormalize:
            weights = g.op("Mul", [weights, g.const(name + ".scale", np.array(r.scale, np.float32))], name + ".scaled")
    ins = [x2, probs, a["fc1.weight"], a["fc1.scales"], a.get("fc1.bias", ""), a["fc2.weight"], a["fc2.scales"],
           a.get("fc2.bias", ""), "", "", "", a.get("fc1.zero_points", ""), a.get("fc2.zero_points", ""), "", weights]
    y = g.ms("QMoE", ins, name, k=r.top_k, expert_weight_bits=ew.bits, block_size=ew.block_size,
             activation_type="swiglu", swiglu_fusion=1, activation_alpha=float(act.alpha), activation_beta=float(act.beta),
             normalize_routing_weights=int(r.renormalize), accuracy_level=4,
             **({"swiglu_limit": float(act.limit)} if act.limit else {}))
    if r.scale != 1.0 and r.renormalize:     # renormalising inside would cancel a scale given before
        y = g.op("Mul", [y, g.const(name + ".out_scale", np.array(r.scale, np.float32))], name + ".out_scaled")
    return y


def sorted_experts(g: Graph, x2: str, weights: str, ids: str, ew: ExpertWeights, r: Routing, name: str,
                   group: int, act: GLU = GLU()) -> str:
    """Tokens grouped per expert with standard ops; every expert runs at most once per step."""
    E, k = r.experts, r.top_k
    # mask [E, T]: 1 where token t chose expert e (expert-major, so NonZero sorts rows by expert)
    ids_t = g.op("Transpose", [ids], name + ".ids_t", perm=[1, 0])                           # [k, T]
    zeros = g.op("ConstantOfShape", [g.op("Concat", [_i64(g, name + ".E", [E]),
                 g.op("Shape", [ids], name + ".T", start=0, end=1)], name + ".ET_shape", axis=0)], name + ".zeros",
                 value=numpy_helper.from_array(np.array([0], np.int64)))
    ones = g.op("ConstantOfShape", [g.op("Shape", [ids_t], name + ".kT")], name + ".ones",
                value=numpy_helper.from_array(np.array([1], np.int64)))
    mask = g.op("ScatterElements", [zeros, ids_t, ones], name + ".mask", axis=0)              # [E, T]
    token = g.op("Gather", [g.op("NonZero", [mask], name + ".nonzero"), _i64(g, name + ".one", 1)], name + ".token",
                 axis=0)                                                                       # [M] token per row
    rows = g.op("Gather", [x2, token], name + ".rows", axis=0)                                # [M, H]
    counts = g.op("ReduceSum", [mask, _i64(g, name + ".ax1", [1])], name + ".counts", keepdims=0)   # [E]
    # where (token t, slot j) landed among the sorted rows: inclusive prefix count - 1
    flat = g.op("Reshape", [mask, _i64(g, name + ".flat", [-1])], name + ".mask_flat")
    rank = g.op("Reshape", [g.op("CumSum", [flat, _i64(g, name + ".ax0s", 0)], name + ".cumsum"),
                            g.op("Shape", [mask], name + ".ET")], name + ".rank")
    pos = g.op("Sub", [g.op("GatherElements", [rank, ids_t], name + ".pos1", axis=0), _i64(g, name + ".one1", [1])],
               name + ".pos")                                                                  # [k, T]

    def expert(e: int, x_e: str) -> str:
        label = f"{name}.e{e}"
        gu = G.apply_linear(g, x_e, *ew.expert_operands(g, e, "fc1"), label + ".gate_up")
        if not ew.fp32:     # rows are interleaved g0 u0 g1 u1 ... (the layout QMoE shares)
            pairs = g.op("Reshape", [gu, _i64(g, label + ".pairs", [0, ew.ffn, 2])], label + ".pairs")
            gate = g.op("Gather", [pairs, _i64(g, label + ".g", 0)], label + ".gate", axis=-1)
            up = g.op("Gather", [pairs, _i64(g, label + ".u", 1)], label + ".up", axis=-1)
        else:
            gate, up = g.op("Split", [gu, _i64(g, label + ".split", [ew.ffn, ew.ffn])], label + ".split", outputs=2,
                            axis=-1)
        return G.apply_linear(g, glu(g, gate, up, act, label + ".act"), *ew.expert_operands(g, e, "fc2"),
                              label + ".down")

    def guarded(cond: str, x_e: str, build, label: str) -> str:
        """If any row: build(x_e), else the (empty) rows themselves."""
        then = g.branch(build, label + ".then")
        other = g.branch(lambda: g.op("Identity", [x_e], label + ".none"), label + ".else")
        return g.op("If", [cond], label, then_branch=then, else_branch=other)

    def run_experts(first: int, n: int, x_rows: str, cnt: str, label: str) -> str:
        """Experts first..first+n-1 on their rows (x_rows sorted by expert, cnt their counts)."""
        parts = g.op("Split", [x_rows, cnt], label + ".split", outputs=n, axis=0) if n > 1 else [x_rows]
        has = g.op("Greater", [cnt, _i64(g, label + ".zero", [0])], label + ".has")
        flags = g.op("Split", [has], label + ".flags", outputs=n, axis=0) if n > 1 else [has]
        outs = []
        for j in range(n):
            e = first + j
            flag = g.op("Squeeze", [flags[j]], f"{label}.flag{j}")
            outs.append(guarded(flag, parts[j], lambda e=e, xp=parts[j]: expert(e, xp), f"{name}.e{e}.if"))
        return g.op("Concat", outs, label + ".concat", axis=0) if n > 1 else outs[0]

    if group and group < E and E % group == 0:
        n_groups = E // group
        per_group = g.op("Reshape", [counts, _i64(g, name + ".gshape", [n_groups, group])], name + ".gcounts")
        g_counts = g.op("ReduceSum", [per_group, _i64(g, name + ".gax", [1])], name + ".gsum", keepdims=0)
        g_rows = g.op("Split", [rows, g_counts], name + ".gsplit", outputs=n_groups, axis=0)
        g_has = g.op("Split", [g.op("Greater", [g_counts, _i64(g, name + ".gzero", [0])], name + ".ghas")],
                     name + ".gflags", outputs=n_groups, axis=0)
        g_cnt = g.op("Split", [per_group], name + ".gcnt", outputs=n_groups, axis=0)
        outs = []
        for j in range(n_groups):
            label = f"{name}.g{j}"

            def body(j=j, label=label):
                cnt = g.op("Reshape", [g_cnt[j], _i64(g, label + ".flat", [-1])], label + ".cnt")
                return run_experts(j * group, group, g_rows[j], cnt, label)
            outs.append(guarded(g.op("Squeeze", [g_has[j]], label + ".flag"), g_rows[j], body, label + ".if"))
        done = g.op("Concat", outs, name + ".concat", axis=0)
    else:
        done = run_experts(0, E, rows, counts, name)
    picked = g.op("Gather", [done, pos], name + ".picked", axis=0)                            # [k, T, H]
    w = g.op("Unsqueeze", [g.op("Transpose", [weights], name + ".w_t", perm=[1, 0]), _i64(g, name + ".wax", [-1])],
             name + ".w")
    return g.op("ReduceSum", [g.op("Mul", [picked, w], name + ".weighted"), _i64(g, name + ".kax", [0])], name + ".sum",
                keepdims=0)


def moe_block(g: Graph, x: str, router: np.ndarray, experts, r: Routing, hidden: int, ffn: int, bits: int,
              block_size: int, name: str, group: int, stats_output: str, act: GLU = GLU(), router_bias=None) -> str:
    """x [1, S, H] -> sparse-expert FFN output [1, S, H], once per strategy the weights allow."""
    x2 = g.op("Reshape", [x, _i64(g, name + ".x2", [-1, hidden])], name + ".x2d")
    # the router stays fp32: routing decisions flip easily
    logits = g.op("MatMul", [x2, g.const(name + ".router_t", np.ascontiguousarray(router.T))], name + ".router")
    if router_bias is not None:
        logits = g.op("Add", [logits, g.const(name + ".router_bias", router_bias)], name + ".router_biased")
    ew = ExpertWeights(g, experts, hidden, ffn, bits, block_size, name)
    shape = g.op("Shape", [x], name + ".shape")
    # Which experts each token used, as a graph output, for `edgert run --stats`.
    with g.only("plain"):
        weights, ids = route(g, logits, r, name)
        y_plain = sorted_experts(g, x2, weights, ids, ew, r, name + ".plain", group, act)
        out = g.op("Reshape", [y_plain, shape], name + ".out")
        g.op("Identity", [ids], name + ".experts", out=stats_output)
    # QMoE renormalises by the plain sum; a softmax's top-k sum is at least k/E, so a smaller floor never acts
    if ew.qmoe_ok and (not r.norm_min or r.scoring == "softmax" and r.norm_min <= r.top_k / r.experts):
        with g.only("qmoe"):
            g.op("Reshape", [qmoe(g, x2, logits, ew, r, name + ".qmoe", act), shape], name + ".out_q", out=out)
            choice = logits if r.simple else choice_scores(g, logits, r, name + ".stats")[1]
            g.op("TopK", [choice, _i64(g, name + ".k_stats", [r.top_k])], name + ".experts_q", outputs=2, axis=-1,
                 outs=[name + ".unused_values", stats_output])
    return out


class MoEDecoder(Decoder):
    """A Llama-family decoder whose FFN is a sparse mixture of SwiGLU experts (Qwen2/3-MoE,
    Mixtral, OLMoE, Granite-MoE). Subclasses name the weights and the routing rule."""
    moe_prefix = "mlp."                                      # router and experts live under this
    router_name = "gate.weight"
    expert_names = ("experts.{e}.gate_proj", "experts.{e}.up_proj", "experts.{e}.down_proj")
    expert_group = 8                                          # experts per second-level If (plain path)
    glu = GLU()                                               # the experts' activation

    def __init__(self, config: dict):
        super().__init__(config)
        c = config
        n = c.get("num_experts") or c.get("num_local_experts") or c.get("n_routed_experts")
        self.routing = Routing(int(n), int(c["num_experts_per_tok"]), bool(c.get("norm_topk_prob", False)))
        self.expert_ffn = c.get("moe_intermediate_size") or c["intermediate_size"]
        self.sparse_step = c.get("decoder_sparse_step", 1) or 1
        self.dense_layers = set(c.get("mlp_only_layers") or [])

    def is_sparse(self, i: int) -> bool:
        return i not in self.dense_layers and (i + 1) % self.sparse_step == 0

    def experts(self, i: int):
        """(gate [F,H], up [F,H], down [H,F]) per expert, loaded one at a time: one tensor per expert
        and projection (the hub's layout), or transformers' fused 3-D `experts.gate_up_proj` [E, 2F, H]
        (gate rows, then up) and `experts.down_proj` [E, H, F]."""
        pre = self.layer_prefix(i) + self.moe_prefix
        if pre + "experts.gate_up_proj" in self.ckpt:
            gate_up, down = self.ckpt.get(pre + "experts.gate_up_proj"), self.ckpt.get(pre + "experts.down_proj")
            f = gate_up.shape[1] // 2
            for e in range(self.routing.experts):
                yield gate_up[e, :f], gate_up[e, f:], down[e]
            return
        for e in range(self.routing.experts):
            yield tuple(self.ckpt.get(pre + n.format(e=e) + ".weight") for n in self.expert_names)

    def shared_expert(self, g: Graph, i: int, x: str) -> str | None:
        return None

    def router_bias(self, i: int) -> np.ndarray | None:
        return None

    def routing_for(self, i: int) -> Routing:
        return self.routing

    def ffn(self, g: Graph, i: int, x: str) -> str:
        if not self.is_sparse(i):
            return super().ffn(g, i, x)
        pre = self.layer_prefix(i) + self.moe_prefix
        stats = f"router.{i}.experts"
        out = moe_block(g, x, self.ckpt.get(pre + self.router_name), self.experts(i), self.routing_for(i), self.hidden,
                        self.expert_ffn, self.recipe.bits, self.recipe.block_size, f"layers.{i}.moe", self.expert_group,
                        stats, self.glu, self.router_bias(i))
        g.outputs.append(helper.make_tensor_value_info(stats, TensorProto.INT64, ["sequence", self.routing.top_k]))
        shared = self.shared_expert(g, i, x)
        return out if shared is None else g.op("Add", [out, shared], f"layers.{i}.moe.with_shared")

    def extra_manifest(self) -> dict:
        sparse = [i for i in range(self.n_layers) if self.is_sparse(i)]
        idle = (self.routing.experts - self.routing.top_k) * 3 * self.hidden * self.expert_ffn * len(sparse)
        block = self.recipe.bits != 32 and self.recipe.block_for(self.hidden, self.expert_ffn)
        return {"experts": self.routing.experts, "experts_per_token": self.routing.top_k,
                "expert_ffn": self.expert_ffn, "moe_layers": sparse, "idle_expert_parameters": idle,
                **({"expert_block_size": block} if block else {})}
