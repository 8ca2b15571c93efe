"""One ONNX Runtime session over an artifact, with a static KV cache.

The cache is one preallocated buffer per layer, sized by the context the user asks for, bound
as both the past input and the present output of GroupQueryAttention: a step writes only its
new rows in place, nothing is copied or reallocated per token.
"""
from __future__ import annotations

import math
import os
import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .artifact import ArtifactError, read_manifest
from .device import check_fit, default_threads, kv_headroom, weights_held_once
from .limits import check_threads

DEFAULT_CONTEXT = 4096
QMOE_SINCE = (1, 23)        # first onnxruntime with a CPU QMoE kernel
FUSED_SINCE = (1, 25)       # first with CPU CausalConvWithState and LinearAttention (hybrid models' "fused" graphs)
KV8GQA_SINCE = (1, 27)      # first whose CPU GroupQueryAttention reads and writes an int8 cache ("kv8gqa" graphs)


def ort_version() -> tuple[int, int]:
    return tuple(int(p) for p in ort.__version__.split(".")[:2])


# One MatMulNBits node with 8-bit weights (y = ones(32) @ W.T with every weight 1 -> 32): some
# builds (onnxruntime 1.22 on aarch64, as Termux ships it) have no 8-bit kernel and fail only
# at the first run, deep in generation. Probed once per process when an artifact needs it.
_INT8_PROBE = (
    "CAo60gIKcwoBQQoBQgoBUxIBWSILTWF0TXVsTkJpdHMqCAoBSxggoAECKggKAU4YBKABAioVCg5hY2N1cmFjeV9sZXZlbBgEoAEC"
    "KgsKBGJpdHMYCKABAioRCgpibG9ja19zaXplGCCgAQI6DWNvbS5taWNyb3NvZnQSBXByb2JlKo4BCAQIAQggEAJCAUJKgAGBgYGB"
    "gYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGB"
    "gYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgSoZCAQQAUIBU0oQAACAPwAAgD8AAIA/AACA"
    "P1oTCgFBEg4KDAgBEggKAggBCgIIIGITCgFZEg4KDAgBEggKAggBCgIIBEIECgAQEUIRCg1jb20ubWljcm9zb2Z0EAE=")
_int8_ok: bool | None = None


def int8_kernel_available() -> bool:
    global _int8_ok
    if os.environ.get("EDGERT_INT8_KERNEL") == "0":     # act as if it were missing (tests, comparisons)
        return False
    if _int8_ok is None:
        import base64
        try:
            sess = ort.InferenceSession(base64.b64decode(_INT8_PROBE), providers=["CPUExecutionProvider"])
            y = sess.run(None, {"A": np.ones((1, 32), np.float32)})[0]
            _int8_ok = bool(np.allclose(y, 32.0))
        except Exception:
            _int8_ok = False
    return _int8_ok


def uses_int8_matmul(manifest: dict) -> bool:
    """An 8-bit MatMulNBits in the graphs: int8 layers, an int8 lm_head, or a budget's int8 projections
    (`quantization.tensors`; the embedding is a gather, not a MatMulNBits)."""
    q = manifest.get("quantization", {})
    head = None if "lm_head_int8_candidates" in q else q.get("lm_head")   # int8 split in int4 planes: int4 kernels only
    tensors = q.get("tensors") if isinstance(q.get("tensors"), dict) else {}
    mixed = any(isinstance(v, dict) and v.get("bits") == 8 for t, v in tensors.items() if t not in ("embed_tokens", "lm_head"))
    return 8 in (q.get("attention"), q.get("mlp"), head) or mixed


def choose_graph(graphs: dict, strategy: str | None, needs_int8: bool = False) -> str:
    """The graph variant to run: what the user asked for, else the fastest this onnxruntime has.
    Without an 8-bit MatMulNBits kernel, the twin that reads the int8 weights as nibbles."""
    if strategy:
        if strategy not in graphs:
            raise ArtifactError(f"--moe-strategy {strategy!r} is not in this artifact (it has: {', '.join(sorted(graphs))})")
        if strategy == "qmoe" and ort_version() < QMOE_SINCE:
            raise ArtifactError(f"--moe-strategy qmoe needs onnxruntime >= 1.23 (this is {ort.__version__}); use plain")
        if strategy.endswith("kv8gqa") and ort_version() < KV8GQA_SINCE:
            raise ArtifactError(f"--moe-strategy {strategy} needs onnxruntime >= 1.27 (this is {ort.__version__}); "
                                f"use {strategy[:-len('+kv8gqa')] if '+' in strategy else 'default'}")
        if strategy.endswith("fused") and ort_version() < FUSED_SINCE:
            raise ArtifactError(f"--moe-strategy {strategy} needs onnxruntime >= 1.25 (this is {ort.__version__}); "
                                f"use {strategy[:-len('+fused')] if '+' in strategy else 'default'}")
        ranked = [strategy]
    else:   # a hybrid model's contrib-op graph first where this onnxruntime has the ops
        ranked = [name for name in ("fused", "qmoe+fused", "default", "qmoe", "plain") if name in graphs
                  and (not name.endswith("fused") or ort_version() >= FUSED_SINCE)
                  and (not name.startswith("qmoe") or ort_version() >= QMOE_SINCE)]
    if not strategy and ort_version() >= KV8GQA_SINCE and os.environ.get("EDGERT_KV8_GRAPH") != "ops":
        # the int8 cache in GroupQueryAttention where this onnxruntime has it (the twin of each graph;
        # a graph asked for by name is run as named)
        twin = {n: "kv8gqa" if n == "default" else f"{n}+kv8gqa" for n in ranked}
        ranked = [twin[n] for n in ranked if twin[n] in graphs] + ranked
    if needs_int8 and not int8_kernel_available():
        twins = [n if n.endswith("nibbles") else "nibbles" if n == "default" else f"{n}+nibbles" for n in ranked]
        ranked = [n for n in twins if n in graphs]
        if not ranked:
            raise ArtifactError(f"this onnxruntime ({ort.__version__} on {platform.machine()}) has no 8-bit MatMulNBits "
                                f"kernel and this artifact's int8 weights have no 4-bit form here: re-export with "
                                f"--bits 4, or install onnxruntime >= 1.23")
    return ranked[0] if ranked else "plain"


def check_onnxruntime(manifest: dict) -> None:
    """An artifact whose graph needs a newer onnxruntime (gpt-oss's attention sinks: 1.23) is refused in one line."""
    need = manifest.get("model", {}).get("min_onnxruntime")
    if need and ort_version() < tuple(int(p) for p in need.split(".")[:2]):
        raise ArtifactError(f"this {manifest.get('architecture')} artifact needs onnxruntime >= {need} "
                            f"(this is {ort.__version__}): pip install -U onnxruntime")


class ContextFull(Exception):
    pass


class RunError(Exception):
    """onnxruntime failed while running the graph; one line for the user."""


class Model:
    def __init__(self, path, context: int | None = None, threads: int | None = None, strategy: str | None = None,
                 max_memory: int | str | None = None, slots: int = 1):
        """threads: default the fast physical cores (edgert.device). max_memory: the memory budget
        checked before loading, bytes or "2G"; None = what the system has available, "off" = no check.
        slots: sequences whose caches are held at once (edgert.engine steps them together)."""
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        check_onnxruntime(self.manifest)
        m = self.manifest["model"]
        self.vocab, self.layers = m["vocab"], m["layers"]
        max_ctx = self.manifest["context_length"]
        self.context = context or min(max_ctx, DEFAULT_CONTEXT)
        if not 1 <= self.context <= max_ctx:
            raise ArtifactError(f"--context must be between 1 and {max_ctx} (the context this artifact was exported for), not {self.context}")
        self.threads = check_threads(threads) or default_threads()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        graphs = self.manifest.get("graphs", {"default": "model.onnx"})
        self.strategy = choose_graph(graphs, strategy, uses_int8_matmul(self.manifest))
        self.memory_need = check_fit(self.path, self.manifest, self.context * slots, max_memory, sequences=slots,
                                     graph=self.strategy)
        try:
            with weights_held_once(self.path, graph=graphs[self.strategy]):
                self.session = ort.InferenceSession(str(self.path / graphs[self.strategy]), opts,
                                                    providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types with long texts
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "hardlink" in first.replace(" ", "").lower():
                # newer onnxruntime refuses external data with several links (inside If subgraphs),
                # a reason its message gives only after the node and tensor names
                linked = [(n, (self.path / n).stat().st_nlink) for n in self.manifest.get("files", {})
                          if (self.path / n).is_file() and (self.path / n).stat().st_nlink > 1] or [("its data file", 2)]
                name, links = max(linked, key=lambda f: f[1])
                raise ArtifactError(f"{self.path}: onnxruntime {ort.__version__} refuses {name} because it has "
                                    f"{links} hard links (its guard against hard-link attacks): copy the artifact "
                                    f"(cp -r, not cp -l or ln) and load the copy") from None
            raise ArtifactError(f"{self.path}: onnxruntime {ort.__version__} cannot load the model: {first[:300]}") from None
        # One preallocated buffer per layer and kind, [slots, kv_heads, context, head_dim]: slot b
        # holds sequence b's rows. A forward over slots [a, b) binds the view buf[a:b] (zero-copy)
        # as both GroupQueryAttention's past input and its present output, so each step writes
        # only its new rows in place. np.zeros pages in lazily: unused rows cost no memory.
        self.slots = slots
        if slots > 1 and not self.manifest.get("batch"):
            raise ArtifactError(f"{self.path} was exported before batching (one sequence per forward): "
                                f"re-export it with this edgert to decode {slots} sequences together")
        self.io = self.manifest.get("io", "edgert")     # "optimum": optimum-onnx's graph, fed by _run_concat
        self._inputs = {i.name for i in self.session.get_inputs()}
        # optimum's graphs return logits for every position fed: bound a forward's tokens so that
        # they stay within 256 MB (a 152k vocabulary: 441 tokens); native graphs compute num_logits rows only
        self.feed_limit = max(16, (256 << 20) // (4 * self.vocab)) if self.io == "optimum" else None
        self.kv_cache = self.manifest.get("quantization", {}).get("kv_cache", "fp32")
        self.kv_in_place = self.kv_cache != "int8" or self.strategy.endswith("kv8gqa")   # GroupQueryAttention's cache
        if not self.kv_in_place:
            # the int8 cache's graph holds a chunk's fp32 scores [heads, tokens, context]: bound them to 64 MB,
            # but feed at least 128 tokens (MatMulNBits is several times slower per token on short chunks)
            self.feed_limit = max(128, (64 << 20) // (4 * m["heads"] * self.context))
        elif self.io != "optimum":
            # GroupQueryAttention's CPU kernel holds a forward's fp32 scores [heads, tokens, positions]
            # too (an 8k prompt in one forward: 3.7 GB on Qwen2.5-0.5B): 512 tokens a forward, as the engine feeds
            self.feed_limit = 512
        if self.kv_cache not in ("fp32", "fp16", "int8"):
            raise ArtifactError(f"{self.path}: edgert.json names an unknown KV cache {str(self.kv_cache)[:20]!r} "
                                "(made by a newer edgert?)")
        kv_layers = m.get("attention_layers", range(self.layers))      # hybrid models: only these attend
        # a float cache's folded decode writes zero rows past a sequence's end, never attended (export/graph.py Fold)
        self.headroom = kv_headroom(self.manifest)
        meta = self.session.get_modelmeta().custom_metadata_map or {}
        need = meta.get("edgert.kv_headroom", "0")
        if not need.isdigit() or int(need) > self.headroom:     # the graph writes rows the cache would not hold
            raise ArtifactError(f"{self.path}: edgert.json does not match the graph (its folded decode writes "
                                f"{need[:12]!r} rows past a sequence's end, edgert.json's model.kv_headroom reserves "
                                f"{self.headroom}): the manifest was edited; re-export")
        h, t, d = m["kv_heads"], self.context + self.headroom, m["head_dim"]
        if self.kv_cache == "int8" and self.kv_in_place:
            # GroupQueryAttention's own int8 cache (onnxruntime >= 1.27): codes only, the per-channel
            # scales are in the graph; bound in place like a float cache
            layout = {"key": (np.int8, (h, t, d)), "value": (np.int8, (h, t, d))}
        elif self.kv_cache == "int8" and self.manifest["quantization"].get("kv_scales") == "per-channel":
            # the standard-op graph with the calibrated per-channel scales (constants of the graph, as in
            # GroupQueryAttention's): codes only, keys transposed (see graph.int8_cache_attention)
            layout = {"key": (np.int8, (h, d, t)), "value": (np.int8, (h, t, d))}
        elif self.kv_cache == "int8":
            # codes and one fp32 scale per row and head; keys transposed (see graph.int8_cache_attention).
            # The graph returns only the new rows (present.*); run() writes them at each row's length.
            layout = {"key": (np.int8, (h, d, t)), "key_scale": (np.float32, (h, 1, t)),
                      "value": (np.int8, (h, t, d)), "value_scale": (np.float32, (h, 1, t))}
        else:
            dtype = {"fp32": np.float32, "fp16": np.float16}[self.kv_cache]
            layout = {"key": (dtype, (h, t, d)), "value": (dtype, (h, t, d))}
        self.cache = [np.zeros((slots, *shape), dtype) for _ in kv_layers for dtype, shape in layout.values()]
        self._cache_names = [(f"past_key_values.{layer}.{kind}", f"present.{layer}.{kind}")
                             for layer in kv_layers for kind in layout]
        graph_inputs = {i.name: i.type for i in self.session.get_inputs()}
        extra = sorted(set(n for n in graph_inputs if n.startswith("past_key_values.")) - {p for p, _ in self._cache_names})
        if extra:
            raise ArtifactError(f"{self.path}: edgert.json does not match the graph (the graph also takes {extra[0]}): "
                                f"the manifest was edited; re-export")
        for buf, (past, _) in zip(self.cache, self._cache_names):    # edgert.json and the graph must agree
            want = {np.float32: "tensor(float)", np.float16: "tensor(float16)", np.int8: "tensor(int8)"}[buf.dtype.type]
            if graph_inputs.get(past) != want:
                raise ArtifactError(f"{self.path}: edgert.json does not match the graph (its KV cache "
                                    f"{self.kv_cache!r} needs input {past} of {want}, the graph has "
                                    f"{graph_inputs.get(past, 'none')}): the manifest was edited; re-export")
        # the position axis of each buffer, where run() writes new rows (None: the graph writes in place)
        self._row_axis = [3 if kind != "value" else 2 for _ in kv_layers for kind in layout] \
            if not self.kv_in_place else None
        self._init_state(m.get("state", []))
        self._bindings: dict[tuple[int, int], tuple] = {}
        # MoE artifacts also output the experts each token used (--stats); bound only when tracked.
        self.router_outputs = [o.name for o in self.session.get_outputs() if o.name.startswith("router.")]
        self.expert_counts: np.ndarray | None = None   # [moe layers, experts] once track_experts() is on
        self.pos = 0            # tokens in slot 0's cache (the single-sequence API: forward/reset)

    def _binding(self, first: int, last: int):
        """An IOBinding with the cache rows of slots [first, last) bound as past and present."""
        key = (first, last, self._parity)        # recurrent state: which of its two buffers is the input now
        if key not in self._bindings:
            io = self.session.io_binding()
            io.bind_output("logits")        # output 0; the caches follow
            views = [ort.OrtValue.ortvalue_from_numpy(buf[first:last]) for buf in self.cache]
            for view, (past, present) in zip(views, self._cache_names):
                io.bind_ortvalue_input(past, view)
                if self._row_axis is None:
                    io.bind_ortvalue_output(present, view)
                else:
                    io.bind_output(present)      # the new rows only (rebound each run), written by _write_rows
            views += self._bind_state(io, first, last)
            self._bindings[key] = (io, views)     # the views must outlive the binding
        return self._bindings[key][0]

    def track_experts(self, on: bool = True) -> None:
        """Count which experts each MoE layer picks from now on (or stop counting)."""
        if on and self.router_outputs:
            self.expert_counts = np.zeros((len(self.router_outputs), self.manifest["model"]["experts"]), np.int64)
        elif not on:
            self.expert_counts = None
            self._bindings.clear()          # drops the router outputs bound so far

    def reset(self) -> None:
        self.pos = 0            # stale rows past pos are never attended to: no need to clear
        self.reset_state(0)     # a recurrent state, though, is all history: start from zeros

    def expert_report(self) -> dict:
        """Active parameters per token and, once track_experts() ran, how often each layer's experts were picked."""
        m = self.manifest["model"]
        report = {"parameters": m["parameters"], "active_parameters_per_token": m["parameters"] - m.get("idle_expert_parameters", 0),
                  "strategy": self.strategy}
        if self.expert_counts is not None:
            report["expert_usage"] = {str(layer): counts.tolist() for layer, counts in
                                      zip(m.get("moe_layers", []), self.expert_counts)}
        return report

    def run(self, first: int, ids: np.ndarray, lengths: np.ndarray, num_logits: int = 1, stepped=None) -> np.ndarray:
        """THE forward: rows of `ids` [B, S] continue the sequences in slots first..first+B-1,
        which hold `lengths` [B] tokens already; returns logits [B, num_logits, vocab] of each
        row's last positions. Several rows only ever feed one token each (GroupQueryAttention
        takes per-row lengths, not per-row token counts). stepped: the rows whose recurrent state
        advances (default all; the others fed a dummy token)."""
        b, n = ids.shape
        total = lengths.astype(np.int64) + n
        if total.max() > self.context:
            raise ContextFull(f"{int(total.max())} tokens do not fit the {self.context}-token context")
        lo, hi = (int(ids.min()), int(ids.max())) if n else (0, 0)
        if hi >= self.vocab or lo < 0:                   # a tokenizer that does not match the model
            bad = hi if hi >= self.vocab else lo
            raise RunError(f"token id {bad} is outside the model's vocabulary (0..{self.vocab - 1}): the "
                           f"tokenizer does not belong to this model")
        if self.feed_limit and n > self.feed_limit:     # a long feed from a caller that did not cut it (the engine does)
            outs = []
            for i in range(0, n, self.feed_limit):
                m = min(self.feed_limit, n - i)
                k = max(0, min(m, i + m - (n - num_logits)))    # this piece's share of the last num_logits positions
                out = self.run(first, ids[:, i:i + m], lengths + i, max(k, 1), stepped)
                if k:
                    outs.append(out[:, -k:])
            return np.concatenate(outs, axis=1)
        if self.io == "optimum":
            return self._run_concat(first, ids, lengths.astype(np.int64), num_logits)
        io = self._binding(first, first + b)
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        io.bind_cpu_input("num_logits", np.array([min(num_logits, n)], np.int64))
        io.bind_cpu_input("seqlens_k", (total - 1).astype(np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(total.max(), np.int32))
        io.bind_output("logits")         # its shape changes between prefill and decode: ORT allocates it
        if self._row_axis is not None:    # so do an int8 cache's new rows
            for _, present in self._cache_names:
                io.bind_output(present)
        if self.expert_counts is not None:
            for name in self.router_outputs:
                io.bind_output(name)
        try:
            self.session.run_with_iobinding(io)
        except Exception as e:          # onnxruntime's own exception types, multi-line texts
            raise RunError(f"onnxruntime {ort.__version__} failed: {str(e).strip().splitlines()[0][:300]}") from None
        self._commit_state(first, b, stepped)
        outs = io.get_outputs()
        if self._row_axis is not None:
            self._write_rows(first, lengths, outs[1:1 + len(self.cache)])
        if self.expert_counts is not None:
            for j in range(len(self.router_outputs)):
                np.add.at(self.expert_counts[j], outs[-len(self.router_outputs) + j].numpy().ravel(), 1)
        return outs[0].numpy()

    def copy_rows(self, source: int, slot: int, n: int) -> None:
        """The first n cache rows of slot `source` into `slot` (a prefix one sequence shares with another)."""
        for i, buf in enumerate(self.cache):
            at = [slice(None)] * 3
            at[(self._row_axis[i] if self._row_axis else 2) - 1] = slice(0, n)     # int8 keys: positions last
            buf[(slot, *at)] = buf[(source, *at)]

    def _write_rows(self, first: int, lengths: np.ndarray, presents) -> None:
        """An int8 cache: each row's new codes and scales go in at that row's own length."""
        for buf, axis, new in zip(self.cache, self._row_axis, presents):
            x = new.numpy()
            n = x.shape[axis]
            for r, length in enumerate(lengths):
                at = [first + r, slice(None), slice(None), slice(None)]
                at[axis] = slice(int(length), int(length) + n)
                buf[tuple(at)] = x[r]

    def _run_concat(self, first: int, ids: np.ndarray, lengths: np.ndarray, num_logits: int) -> np.ndarray:
        """The adapter for optimum-onnx's graphs (`export --via optimum`), whose past is an input
        [B, kv_heads, past, head_dim] and whose present is past + new: the rows of slots
        first..first+B-1 are copied out of the same cache buffers the native graphs use (rows
        shorter than the longest are padded, attention_mask hides the padding), and each row's new
        rows are copied back. Per step it moves the whole past twice, as optimum's own Concat does."""
        b, n = ids.shape
        past = int(lengths.max())
        mask = np.ones((b, past + n), np.int64)
        for r, length in enumerate(lengths):
            mask[r, length:past] = 0
        feeds = {"input_ids": np.ascontiguousarray(ids, np.int64), "attention_mask": mask}
        if "position_ids" in self._inputs:
            feeds["position_ids"] = lengths[:, None] + np.arange(n, dtype=np.int64)
        for buf, (name, _) in zip(self.cache, self._cache_names):
            feeds[name] = np.ascontiguousarray(buf[first:first + b, :, :past])
        try:
            out = self.session.run(["logits"] + [present for _, present in self._cache_names], feeds)
        except Exception as e:
            raise RunError(f"onnxruntime {ort.__version__} failed: {str(e).strip().splitlines()[0][:300]}") from None
        for buf, present in zip(self.cache, out[1:]):
            for r, length in enumerate(lengths):
                buf[first + r, :, length:length + n] = present[r, :, past:]
        return out[0][:, -min(num_logits, n):]

    def forward(self, ids, num_logits: int = 1) -> np.ndarray:
        """One sequence in slot 0: feed tokens after what its cache holds; returns logits
        [num_logits, vocab] of the last positions."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        logits = self.run(0, ids, np.array([self.pos]), num_logits)[0]
        self.pos += ids.shape[1]
        return logits

    # ---- recurrent state (hybrid models: LFM2's short convolutions, Qwen3.5's Gated DeltaNet) ----
    # Each state tensor (edgert.json "state": layer, name, shape per sequence) is held as
    # [slots, *shape], zeros for a new sequence. A forward binds the rows of its slots as the
    # input past_state.{layer}.{name} and the same rows of a second buffer as the output
    # present_state.{layer}.{name}. When every slot stepped, the two buffers swap roles (nothing is
    # copied: always so with one slot); otherwise the rows that stepped are copied back (a row that
    # only fed a dummy token keeps its state), the state's size, far below a step's reads.
    def _init_state(self, specs: list[dict]) -> None:
        self._parity = 0
        # laid out as the graph running declares it (a fused graph holds a convolution's state
        # channel-first, CausalConvWithState's layout; the same numbers either way)
        declared = {i.name: i.shape[1:] for i in self.session.get_inputs() if i.name.startswith("past_state.")}
        shapes = []
        for spec in specs:
            dims = declared.get(f"past_state.{spec['layer']}.{spec['name']}")
            if not dims or not all(isinstance(d, int) for d in dims) or math.prod(dims) != math.prod(spec["shape"]):
                dims = spec["shape"]
            shapes.append((self.slots, *dims))
        self.state = [np.zeros(shape, np.float32) for shape in shapes]
        self._state_next = [np.zeros(shape, np.float32) for shape in shapes]
        self._state_names = [(f"past_state.{s['layer']}.{s['name']}", f"present_state.{s['layer']}.{s['name']}")
                             for s in specs]

    @property
    def recurrent(self) -> bool:
        """True when the model keeps a state that cannot be cut back (no rewind without a snapshot)."""
        return bool(self.state)

    def _bind_state(self, io, first: int, last: int) -> list:
        views = []
        for cur, nxt, (past, present) in zip(self.state, self._state_next, self._state_names):
            src, dst = ort.OrtValue.ortvalue_from_numpy(cur[first:last]), ort.OrtValue.ortvalue_from_numpy(nxt[first:last])
            io.bind_ortvalue_input(past, src)
            io.bind_ortvalue_output(present, dst)
            views += [src, dst]
        return views

    def _commit_state(self, first: int, rows: int, stepped) -> None:
        if not self.state:
            return
        if first == 0 and rows == self.slots and (stepped is None or len(stepped) == rows):
            self.state, self._state_next = self._state_next, self.state
            self._parity ^= 1
            return
        for cur, nxt in zip(self.state, self._state_next):
            if stepped is None:
                cur[first:first + rows] = nxt[first:first + rows]
            else:
                for r in stepped:
                    cur[first + r] = nxt[first + r]

    def reset_state(self, slot: int) -> None:
        for cur in self.state:
            cur[slot] = 0

    def snapshot(self, slot: int) -> list[np.ndarray]:
        return [cur[slot].copy() for cur in self.state]

    def restore(self, slot: int, snap: list[np.ndarray]) -> None:
        for cur, saved in zip(self.state, snap):
            cur[slot] = saved
