"""Input statistics of every linear layer, measured on a short calibration text.

The quantizer minimises each linear's *output* error (see quantize.py), which needs E[x x^T]
of its input x. They come from a quick first pass: the same decoder is built at int4 round to
nearest with every linear's input made a graph output, and onnxruntime runs it over the text,
a few tokens at a time. int4 rather than int8: half the memory, any onnxruntime (1.22 on ARM
has no 8-bit kernel), and as good statistics (stories260K held-out ppl over fp32 +3.5% from
an int4 probe, +4.1% from int8; KL 0.058 vs 0.060: within noise). The inputs go to disk (one raw
[tokens, K] bfloat16 file per input) and are read back one linear at a time when it is
quantized, so memory stays near one tensor (plus the probe session while it runs). bfloat16
halves what is written (1.5 GB instead of 3.1 GB for 2,048 tokens of the 1.5B shape) at a
rounding of 2^-9 of each input, far below GPTQ's damping of H; a thread writes one run's
inputs while onnxruntime computes the next (two sets of output arrays, used in turn).

What is measured: every linear in the main graph (attention, dense MLP, shared experts,
lm_head). MoE experts share the layer input, so the router's input stands for every expert's
gate/up; an expert's down projection sees only its own tokens, inside an If branch that cannot
be a graph output, so it is quantized without statistics (the block search).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from edgert.device import MADV_DONTNEED, mapped_dirty_kb, page_out_weights, release_freed_memory, weights_held_once
from edgert.model import QMOE_SINCE, ort, ort_version

from .graph import Graph, Recipe
from .quantize import Quantizer, Stats

DEFAULT_CALIB = Path(__file__).parent / "data" / "calib.txt"
WINDOW = 512                  # tokens per window, each starting from an empty cache
_CHUNK_BYTES = 8 << 20        # probe outputs per onnxruntime run: small runs keep its arena small
                              # (Qwen2.5-0.5B probe peak RSS 1057 MB at 256 MB, 651 MB at 8 MB)


class CalibrationError(Exception):
    """One line for the user."""


class ActivationStats:
    """Linear name -> Stats over the probe arrays."""

    def __init__(self, arrays: dict[str, tuple[Path, int]], linears: dict[str, str], tokens: int):
        self.stats = {t: Stats(file=path, width=width) for t, (path, width) in arrays.items()}
        self.linears, self.tokens = linears, tokens
        self.survey = None           # quantize.Survey when the probe measured layouts
        self.kv_ranges: dict[str, np.ndarray] = {}   # the probe's largest keys and values (_Probe.kv_ranges)
        self._last: str | None = None

    def get(self, name: str) -> Stats | None:
        tensor = self.linears.get(name)
        if tensor is None:
            return None
        if tensor != self._last:     # linears come one after another: drop the previous factors
            if self._last is not None:
                self.stats[self._last].release()
            self._last = tensor
        return self.stats[tensor]


def calibration_windows(src: Path, text: str, window: int, limit: int | None = None) -> tuple[list[list[int]], bool]:
    """The text tokenized once (with the tokenizer's BOS), cut into consecutive windows, and whether
    it was cut at `limit` tokens. Only a prefix of a long text is tokenized (growing until it holds
    enough tokens): every token fed costs every linear's inputs on disk (a 37 MB text wrote 3.5 GB)."""
    from edgert.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(src)
    chars = len(text) if limit is None else 16 * limit
    while True:
        ids = tok.encode(text[:chars], add_special_tokens=True)
        if limit is None or len(ids) > limit or chars >= len(text):
            break
        chars *= 4
    cut = limit is not None and len(ids) > limit
    ids = ids[:limit] if cut else ids
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1], cut


def token_budget(model, ckpt) -> int:
    """Tokens a calibration feeds the probe: the self-calibration's counts (SELF_TOKENS, or
    SMALL_TOKENS for a model below SMALL_PARAMS), also the cap on a --calib file."""
    params = sum(int(np.prod(ckpt.shape(n))) for n in ckpt.names if model.counts(n))
    return SMALL_TOKENS if params < SMALL_PARAMS else SELF_TOKENS


class _Probe:
    """The probe: the decoder at int4 round to nearest with every linear's input made a graph
    output, run by onnxruntime on `rows` sequences at once (the KV cache bound in place, as the
    runtime does); every run appends each linear's input rows to a raw float32 file."""

    def __init__(self, model, ckpt, work: Path, window: int, rows: int = 1, survey=None):
        work.mkdir(parents=True, exist_ok=True)
        g = Graph(work / "probe.onnx.data")
        g.quantizer = Quantizer("rtn") if survey is None else survey(Quantizer("rtn"))
        self.survey = g.quantizer if survey is not None else None
        model.build(g, ckpt, Recipe(bits=4, embed_bits=4, method="rtn", kv_cache="fp16"), window)
        self.linears = _probe_linears(g)
        self.tensors = sorted(set(self.linears.values()))
        for t in self.tensors:
            g.add_output(t)
        graphs = g.variants()
        name = "qmoe" if "qmoe" in graphs and ort_version() >= QMOE_SINCE else next(iter(graphs))
        g.save(work / "probe.onnx", producer="edgert-calibration", tags=graphs[name])
        g.close()
        release_freed_memory()                # the quantization threads' arenas, before the session's peak
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.enable_cpu_mem_arena = False     # each run's buffers go back to the heap (55 MB less at the 1.5B shape)
        with weights_held_once(work, every_s=0.02):    # as the runtime does: one copy of the weights resident
            self.sess = ort.InferenceSession(str(work / "probe.onnx"), opts, providers=["CPUExecutionProvider"])
        caches = [i for i in self.sess.get_inputs() if i.name.startswith("past_key_values.")]
        arrays = [np.zeros([rows, c.shape[1], window + model.kv_headroom, c.shape[3]], np.float16 if "16" in c.type else np.float32)
                  for c in caches]
        self.caches = [(c.name, c.name.replace("past_key_values.", "present."), ort.OrtValue.ortvalue_from_numpy(x), x)
                       for c, x in zip(caches, arrays)]
        self.rotary_dim = model.rotary_dim
        self.kv_ranges: dict[str, np.ndarray] = {}
        # hybrid models' recurrent states: fed and read back each run (a row that starts again is zeroed)
        self.states = {i.name: np.zeros([rows, *i.shape[1:]], np.float32) for i in self.sess.get_inputs()
                       if i.name.startswith("past_state.")}
        self.work, self.files, self.widths, self.tokens, self.unmap = work, {}, {}, 0, False
        # two sets of output arrays, used in turn: (ids shape, [(array, OrtValue) per tensor]), and the
        # write of each set still under way (a set is bound again only once it is on disk)
        self.buffers: list[tuple] = [((), []), ((), [])]
        self.writes: list = [None, None]
        self.slot, self.scratch = 0, np.empty(0, np.uint16)
        from concurrent.futures import ThreadPoolExecutor
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="edgert-calibration")

    def chunk(self) -> int:
        """Tokens per run: small runs keep onnxruntime's arena small (see _CHUNK_BYTES)."""
        return 16 if not self.widths else max(16, _CHUNK_BYTES // (4 * sum(self.widths.values())))

    def run(self, ids: np.ndarray, past: np.ndarray) -> np.ndarray:
        """ids [rows, S] after `past` [rows] tokens already in each row's cache -> logits of each row's last token."""
        io = self.sess.io_binding()
        total = past + ids.shape[1]
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        io.bind_cpu_input("num_logits", np.array([1], np.int64))
        io.bind_cpu_input("seqlens_k", (total - 1).astype(np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(total.max(), np.int32))
        io.bind_output("logits")
        self.slot = slot = 1 - self.slot
        self._written(slot)
        shape, bufs = self.buffers[slot]
        known = shape == ids.shape    # then onnxruntime writes into this set's arrays: no copies
        for i, t in enumerate(self.tensors):
            if known:
                io.bind_ortvalue_output(t, bufs[i][1])
            else:
                io.bind_output(t)
        for name, state in self.states.items():
            io.bind_cpu_input(name, state)
            io.bind_output(name.replace("past_", "present_"))
        for past_name, present_name, value, _ in self.caches:
            io.bind_ortvalue_input(past_name, value)
            io.bind_ortvalue_output(present_name, value)
        self.sess.run_with_iobinding(io)
        self._kv_ranges(past, total)
        outs = io.get_outputs()           # in the order they are bound
        for state, v in zip(self.states.values(), outs[1 + len(self.tensors):]):
            state[...] = v.numpy()
        if not known:                     # (a tensor's rank and width come from the graph's run)
            arrays = [v.numpy() for v in outs[1:1 + len(self.tensors)]]
            self.buffers[slot] = (ids.shape, [(x, ort.OrtValue.ortvalue_from_numpy(x)) for x in arrays])
        for t, (x, _) in zip(self.tensors, self.buffers[slot][1]):
            if t not in self.files:       # plain appends: the page cache holds them, not this process
                self.widths[t] = x.shape[-1]
                self.files[t] = open(self.work / f"x{len(self.files)}.bf16", "wb")
        self.writes[slot] = self.writer.submit(self._append, [(self.files[t], x) for t, (x, _) in
                                                              zip(self.tensors, self.buffers[slot][1])])
        self.tokens += ids.size
        if self.tokens == ids.size:       # onnxruntime only reads its mapped initializers: then unmapping is safe
            self.unmap = mapped_dirty_kb(self.work) == 0
        if self.unmap:                    # the embedding rows looked up: out of RSS (150 MB at 1.5B)
            page_out_weights(self.work, MADV_DONTNEED)
        return outs[0].numpy()[:, -1]

    def _append(self, jobs) -> None:
        """On the writer thread: each float32 array appended to its file as bfloat16, rounded to
        nearest (in place: onnxruntime overwrites the array in the set's next run anyway)."""
        top = 1 if sys.byteorder == "little" else 0       # the uint16 holding a float32's top half
        for f, x in jobs:
            bits = x.reshape(-1).view(np.uint32)
            bits += 0x8000
            if self.scratch.size < bits.size:
                self.scratch = np.empty(bits.size, np.uint16)
            out = self.scratch[:bits.size]
            np.copyto(out, bits.view(np.uint16)[top::2])
            f.write(memoryview(out).cast("B"))

    def _written(self, slot: int) -> None:
        """Wait until the set's last write is done (its error, a full disk say, is raised here)."""
        pending, self.writes[slot] = self.writes[slot], None
        if pending is not None:
            pending.result()

    def _kv_ranges(self, past: np.ndarray, total: np.ndarray) -> None:
        """The largest |value| per layer, kv head and channel among the rows just written; for keys,
        the norm of each channel's rotary pair, which no position's rotation changes (the int8 cache's
        per-channel scales, decoder.kv_scales). The cache holds a head as GroupQueryAttention rotates
        it, halves [rotated | pass-through or padding] twice: the pairs are (i, i + D / 2) for
        i < rotary_dim / 2, D the cached (padded) head width (Decoder._rotary_first, rope_for)."""
        half = self.rotary_dim // 2
        for name, _, _, x in self.caches:
            new = np.concatenate([x[r, :, int(a):int(b)] for r, (a, b) in enumerate(zip(past, total))], axis=1)
            new = np.abs(new.astype(np.float32))                 # [kv, tokens, d]
            if name.endswith(".key") and half:
                mid = new.shape[-1] // 2
                pair = np.hypot(new[..., :half], new[..., mid:mid + half])
                new[..., :half], new[..., mid:mid + half] = pair, pair
            top = new.max(axis=1)
            self.kv_ranges[name] = top if name not in self.kv_ranges else np.maximum(self.kv_ranges[name], top)

    def reset(self, rows) -> None:
        """Rows that start a new sequence: their recurrent states back to zero (the KV cache needs
        nothing: a row's length says what it holds)."""
        for state in self.states.values():
            state[rows] = 0

    def finish(self) -> ActivationStats:
        try:
            for slot in (0, 1):
                self._written(slot)
        finally:
            self.writer.shutdown(wait=True)
            for f in self.files.values():
                f.close()
        del self.sess, self.caches, self.buffers
        release_freed_memory()
        stats = ActivationStats({t: (Path(f.name), self.widths[t]) for t, f in self.files.items()}, self.linears,
                                self.tokens)
        stats.survey = self.survey
        stats.kv_ranges = self.kv_ranges
        return stats


def collect(model, ckpt, src: Path, text: str, work: Path, survey=None, name: str | None = None) -> ActivationStats:
    """Run the probe graph over `text`; work is a scratch folder the caller removes. survey: wraps
    the probe's quantizer (quantize.Survey: the layouts' errors, measured while the probe is built).
    name: the user's --calib file, whose text is cut at token_budget tokens (a note on stderr says so);
    None for the built-in text (4 KB), used whole."""
    window = min(WINDOW, model.max_positions)
    limit = token_budget(model, ckpt) if name is not None else None
    windows, cut = calibration_windows(src, text, window, limit)
    if not windows:
        raise CalibrationError("the calibration text has fewer than 2 tokens")
    if cut:
        print(f"edgert: --calib {name}: calibrating on its first {limit} tokens (the rest of the file is not used)",
              file=sys.stderr)
    probe = _Probe(model, ckpt, work, window, survey=survey)
    try:
        for ids in windows:
            probe.reset(slice(None))
            done = 0
            while done < len(ids):
                part = ids[done:done + probe.chunk()]
                probe.run(np.array([part]), np.array([done]))
                done += len(part)
    finally:
        stats = probe.finish()
    return stats


# ---- self-calibration: the model's own text -------------------------------------------------

SELF_TOKENS = 2048       # sampled tokens (about what the built-in text gives)
SMALL_TOKENS = 8192      # for a model below SMALL_PARAMS, whose sampling costs seconds: GPTQ's
SMALL_PARAMS = 20_000_000   # statistics steadier (stories260K int4 KL 0.0615 -> 0.0572, mean of 3 seeds)
SELF_ROWS = 12           # sequences sampled together: one batched forward per step (the 1.5B shape
                         # samples as fast per token as with 16, and onnxruntime's first run takes
                         # 47 MB where 16 rows take 157)
SELF_LENGTH = 256        # a sequence starts again from its prompt after this many tokens
SELF_SEED = 0
SELF_TEMPERATURE = 1.0
# What a user might ask, for models with a chat template: the model writes the answers (and their
# reasoning) itself. Short and varied; none of it is scored anywhere.
CHAT_PROMPTS = (
    "Tell me a short story about a cat who finds a key.",
    "What is 17*3-8? Think step by step.",
    "Explain why the sky is blue in two sentences.",
    "Write a Python function that reverses a string.",
    "A farmer has 12 apples and gives 5 away. How many are left?",
    "What is the capital of France, and what is it known for?",
    "Give me three tips for sleeping better.",
    "Is 91 a prime number?",
)


def self_prompts(src: Path) -> list[list[int]]:
    """Where the model's own text starts: the tokenizer's BOS (or the config's BOS / EOS as a
    document start when it adds none) and, when the tokenizer has a chat template, the template
    applied to each of CHAT_PROMPTS with the generation prompt (the model answers). BOS
    starts alternate with the chat prompts."""
    import json
    from edgert.chat import load_chat_template, render_chat
    from edgert.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(src)
    bos = tok.encode("", add_special_tokens=True)
    if not bos:
        cfg = json.loads((src / "config.json").read_text())
        first = next((i for i in (cfg.get("bos_token_id"), cfg.get("eos_token_id")) if isinstance(i, int)), None)
        bos = [first] if first is not None else []
    chats = []
    try:
        template = load_chat_template(src)
        if template:
            cfg_file = src / "tokenizer_config.json"
            cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
            names = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in cfg.items()
                     if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
            chats = [tok.encode(render_chat(template, [{"role": "user", "content": q}], **names), add_special_tokens=False)
                     for q in CHAT_PROMPTS]
    except ValueError:           # a template that does not render: BOS alone
        chats = []
    if not bos and not chats:
        raise CalibrationError("the tokenizer has no BOS token and no chat template: give --calib FILE")
    if not chats:
        return [bos]
    return [x for c in chats for x in ([bos, c] if bos else [c])]


def sample_self(model, ckpt, src: Path, work: Path, tokens: int | None = None, rows: int | None = None,
                seed: int | None = None, eos=(), progress=None, survey=None) -> ActivationStats:
    """Self-calibration: the probe samples the model's own text (temperature 1, seeded) from
    `self_prompts`, `rows` sequences at a time, and every token it feeds (prompt or sampled)
    is recorded as the text calibration would record it. A sequence that ends (EOS, or
    SELF_LENGTH tokens) starts again from the next prompt in turn. The same model, seed and
    onnxruntime give the same tokens, hence the same statistics."""
    tokens = tokens or token_budget(model, ckpt)
    rows = rows or SELF_ROWS
    seed = SELF_SEED if seed is None else seed
    length = min(SELF_LENGTH, model.max_positions)
    starts = self_prompts(src)
    rng = np.random.default_rng(seed)
    probe = _Probe(model, ckpt, work, length, rows, survey)
    eos = set(eos)
    queue = [list(starts[r % len(starts)]) for r in range(rows)]    # tokens still to feed per row
    pos = np.zeros(rows, np.int64)
    sampled = np.zeros(rows, bool)            # the token fed next was sampled (not a prompt's)
    next_start = rows
    try:
        while probe.tokens < tokens:
            ids = np.array([[q.pop(0)] for q in queue], np.int64)
            logits = probe.run(ids, pos).astype(np.float64)
            pos += 1
            for r in range(rows):
                if queue[r]:                      # still inside its prompt
                    continue
                p = np.exp((logits[r] - logits[r].max()) / SELF_TEMPERATURE)
                tok = int(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right"))
                tok = min(tok, len(p) - 1)
                if sampled[r] and int(ids[r, 0]) in eos or pos[r] >= length:
                    pos[r], sampled[r] = 0, False     # the row starts again, from the next prompt
                    probe.reset(r)
                    queue[r] = list(starts[next_start % len(starts)])
                    next_start += 1
                else:
                    queue[r], sampled[r] = [tok], True
            if progress:
                progress(min(probe.tokens, tokens), tokens)
    finally:
        stats = probe.finish()
    return stats


def _probe_linears(g: Graph) -> dict[str, str]:
    """Linear name -> the tensor it reads, for MatMulNBits / weight MatMul nodes of the main graph."""
    weights = {t.name for v, t in g.initializers}
    out = {}
    for tags, node in g.nodes:
        if tags or not node.name.startswith("n:"):      # the graph every variant shares
            continue
        if node.op_type == "MatMulNBits" or node.op_type == "MatMul" and node.input[1] in weights:
            out[node.name[2:]] = node.input[0]
    return out
