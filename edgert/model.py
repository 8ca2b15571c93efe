"""One ONNX Runtime session over an artifact, with a static KV cache.

The cache is one preallocated buffer per layer, sized by the context the user asks for, bound
as both the past input and the present output of GroupQueryAttention: a step writes only its
new rows in place, nothing is copied or reallocated per token.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .artifact import ArtifactError, read_manifest
from .device import check_fit, default_threads, weights_held_once

DEFAULT_CONTEXT = 4096
QMOE_SINCE = (1, 23)        # first onnxruntime with a CPU QMoE kernel


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
    q = manifest.get("quantization", {})
    head = None if "lm_head_int8_candidates" in q else q.get("lm_head")   # int8 split in int4 planes: int4 kernels only
    return 8 in (q.get("attention"), q.get("mlp"), head)


def choose_graph(graphs: dict, strategy: str | None, needs_int8: bool = False) -> str:
    """The graph variant to run: what the user asked for, else the fastest this onnxruntime has.
    Without an 8-bit MatMulNBits kernel, the twin that reads the int8 weights as nibbles."""
    if strategy:
        if strategy not in graphs:
            raise ArtifactError(f"--moe-strategy {strategy!r} is not in this artifact (it has: {', '.join(sorted(graphs))})")
        if strategy == "qmoe" and ort_version() < QMOE_SINCE:
            raise ArtifactError(f"--moe-strategy qmoe needs onnxruntime >= 1.23 (this is {ort.__version__}); use plain")
        ranked = [strategy]
    else:
        ranked = [name for name in ("default", "qmoe", "plain") if name in graphs
                  and (name != "qmoe" or ort_version() >= QMOE_SINCE)]
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
                 max_memory: int | str | None = None):
        """threads: default the fast physical cores (edgert.device). max_memory: the memory budget
        checked before loading, bytes or "2G"; None = what the system has available, "off" = no check."""
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        check_onnxruntime(self.manifest)
        m = self.manifest["model"]
        self.vocab, self.layers = m["vocab"], m["layers"]
        max_ctx = self.manifest["context_length"]
        self.context = context or min(max_ctx, DEFAULT_CONTEXT)
        if not 1 <= self.context <= max_ctx:
            raise ArtifactError(f"--context must be between 1 and {max_ctx} (the context this artifact was exported for), not {self.context}")
        self.memory_need = check_fit(self.path, self.manifest, self.context, max_memory)
        self.threads = threads or default_threads()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        graphs = self.manifest.get("graphs", {"default": "model.onnx"})
        self.strategy = choose_graph(graphs, strategy, uses_int8_matmul(self.manifest))
        try:
            with weights_held_once(self.path):
                self.session = ort.InferenceSession(str(self.path / graphs[self.strategy]), opts,
                                                    providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types with long texts
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"{self.path}: onnxruntime {ort.__version__} cannot load the model: {first[:300]}") from None
        shape = (1, m["kv_heads"], self.context, m["head_dim"])
        self._io = self.session.io_binding()
        self._io.bind_output("logits")      # output 0; the caches follow
        self._cache = []
        for i in range(self.layers):
            for kind in ("key", "value"):
                buf = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
                self._cache.append(buf)
                self._io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
                self._io.bind_ortvalue_output(f"present.{i}.{kind}", buf)
        # MoE artifacts also output the experts each token used (--stats); bound only when tracked.
        self.router_outputs = [o.name for o in self.session.get_outputs() if o.name.startswith("router.")]
        self._first_router = 1 + 2 * self.layers
        self.expert_counts: np.ndarray | None = None   # [moe layers, experts] once track_experts() is on
        self.pos = 0            # tokens in the cache

    def track_experts(self, on: bool = True) -> None:
        """Count which experts each MoE layer picks from now on (or stop counting)."""
        if on and self.router_outputs:
            self.expert_counts = np.zeros((len(self.router_outputs), self.manifest["model"]["experts"]), np.int64)
        elif not on and self.expert_counts is not None:
            self.expert_counts = None
            self._io.clear_binding_outputs()      # drop the router outputs, keep logits + cache bound
            self._io.bind_output("logits")
            for i, buf in enumerate(self._cache):
                self._io.bind_ortvalue_output(f"present.{i // 2}.{('key', 'value')[i % 2]}", buf)

    def reset(self) -> None:
        self.pos = 0            # stale rows past pos are never attended to: no need to clear

    def expert_report(self) -> dict:
        """Active parameters per token and, once track_experts() ran, how often each layer's experts were picked."""
        m = self.manifest["model"]
        report = {"parameters": m["parameters"], "active_parameters_per_token": m["parameters"] - m.get("idle_expert_parameters", 0),
                  "strategy": self.strategy}
        if self.expert_counts is not None:
            report["expert_usage"] = {str(layer): counts.tolist() for layer, counts in
                                      zip(m.get("moe_layers", []), self.expert_counts)}
        return report

    def forward(self, ids, num_logits: int = 1) -> np.ndarray:
        """Feed tokens after what the cache holds; returns logits [num_logits, vocab] of the last positions."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        if self.pos + n > self.context:
            raise ContextFull(f"{self.pos + n} tokens do not fit the {self.context}-token context")
        total = self.pos + n
        io = self._io
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("num_logits", np.array([min(num_logits, n)], np.int64))
        io.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        io.bind_output("logits")         # its shape changes between prefill and decode: ORT allocates it
        if self.expert_counts is not None:
            for name in self.router_outputs:
                io.bind_output(name)
        try:
            self.session.run_with_iobinding(io)
        except Exception as e:          # onnxruntime's own exception types, multi-line texts
            raise RunError(f"onnxruntime {ort.__version__} failed: {str(e).strip().splitlines()[0][:300]}") from None
        self.pos = total
        outs = io.get_outputs()
        if self.expert_counts is not None:
            for j in range(len(self.router_outputs)):
                np.add.at(self.expert_counts[j], outs[self._first_router + j].numpy().ravel(), 1)
        return outs[0].numpy()[0]
