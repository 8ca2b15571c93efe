"""Plant one-line bugs and check that the tests named after them fail: a test that cannot fail is a defect.

    python tests/mutants.py [--list] [--only NAME[,NAME]] [--no-baseline] [--keep]

The repository's files (tracked and new, as they are in the working tree) are copied to a temporary
folder; each mutant replaces one exact piece of text in one file there, runs `pytest -x` on the
tests that guard it (imports resolve to the copy), and puts the text back. First, unless
--no-baseline, every selection runs once unmutated and must pass. Exit status 0 only when every
mutant was caught and every original text was found exactly once. Not part of the default
`pytest` run (it runs parts of the suite ~40 times: ~8 minutes on a quiet 2-core box, 16 loaded).

Mutants marked `rekey` sit on lines the runtime-loop rewrite (edgert/model.py, edgert/generate.py)
may change: when their text is no longer found, point them at the equivalent new line.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    name: str
    path: str
    original: str
    replacement: str
    tests: tuple[str, ...]          # pytest arguments: files, node ids, -k expressions
    rekey: bool = False             # on a line of the runtime loop being rewritten


MUTANTS = [
    # the three planted bugs
    Mutant("sampling ignores the temperature", "edgert/generate.py",
           "p /= self.temperature ", "p /= 1.0 ",
           ("tests/test_sampling.py",)),
    Mutant("two int4 experts swapped in the last MoE layer", "export/moe.py",
           "out = moe_block(g, x, self.ckpt.get(pre + self.router_name), self.experts(i),",
           "out = moe_block(g, x, self.ckpt.get(pre + self.router_name), (lambda l: l[1::-1] + l[2:])(list(self.experts(i)))"
           " if self.recipe.bits == 4 and i == self.n_layers - 1 else self.experts(i),",
           ("tests/test_fixtures.py", "-k", "kl_against and qwen3moe-4")),
    Mutant("split int8 lm_head disabled", "export/decoder.py",
           "split_head_min_vocab = 16384", "split_head_min_vocab = 1 << 30",
           ("tests/test_split_head.py",)),
    # one or more per module
    Mutant("tokenizer: stale BPE merges applied", "edgert/tokenizer.py",
           "if not alive[i] or j < 0 or merges.get((syms[i], syms[j]), (0, -1))[1] != new:",
           "if not alive[i] or j < 0:",
           ("tests/test_tokenizer.py",)),
    Mutant("chat template: no trim_blocks", "edgert/chat.py",
           "env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,",
           "env = _BoundedEnvironment(trim_blocks=False, lstrip_blocks=True,",
           ("tests/test_chat.py",)),
    Mutant("rope: llama3 scaling divides the wrong band", "export/decoder.py",
           "scaled = np.where(wavelen > old / lo_f, inv / factor, inv)",
           "scaled = np.where(wavelen > old / hi_f, inv / factor, inv)",
           ("tests/test_export_dense.py", "-k", "fp32_logits")),
    Mutant("rope: frequencies off by one", "export/decoder.py",
           "inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)",
           "inv = 1.0 / base ** (np.arange(1, dim + 1, 2, dtype=np.float64) / dim)",
           ("tests/test_export_dense.py", "-k", "fp32_logits")),
    Mutant("routing: softmax top-k renormalised when the config says not to", "export/moe.py",
           "if r.simple and r.renormalize:   # softmax over all", "if r.simple:   # softmax over all",
           ("tests/test_export_moe.py", "-k", "fp32")),
    Mutant("quantization: GPTQ calibration silently dropped", "export/quantize.py",
           "q = quantize(w, bits, block_size, stats=stats)", "q = quantize(w, bits, block_size)",
           ("tests/test_quality.py", "-k", "int8_and_int4")),
    Mutant("quantization: GPTQ errors not spread within a sub-block", "export/quantize.py",
           "work[j + 1:end] -= u[j, j + 1:end, None] * e", "pass",
           ("tests/test_recipes.py", "-k", "textbook")),
    Mutant("quantization: a GPTQ process's zero points written back in the wrong order", "export/graph.py",
           "zip(ins, (r.packed, r.scales, r.zero_points))", "zip(ins, (r.packed, r.scales, r.zero_points[::-1]))",
           ("tests/test_recipes.py", "-k", "pool")),
    Mutant("quantization: GPTQ's later columns never see a group's errors", "export/quantize.py",
           "work[g1:] -= u[g0:g1, g1:].T @ err", "pass",
           ("tests/test_recipes.py", "-k", "textbook")),
    Mutant("quantization: GPTQ's columns in storage order, not act order", "export/quantize.py",
           'order = np.argsort(-imp, kind="stable")', "order = np.arange(len(imp))",
           ("tests/test_recipes.py", "-k", "textbook or hessian")),
    Mutant("quantization: GPTQ's codes written to the act-order column, not the stored one", "export/quantize.py",
           "codes[lo0 + order[j]] = c", "codes[lo0 + j] = c",
           ("tests/test_recipes.py", "-k", "textbook")),
    Mutant("quantization: GPTQ factor of H, not of its inverse", "export/quantize.py",
           "u = _cholesky_inverse(np.ascontiguousarray(h[::-1, ::-1]))[::-1, ::-1]", "u = _cholesky_inverse(h).T",
           ("tests/test_recipes.py", "-k", "hessian")),
    Mutant("int8 KV cache: new rows written at position 0", "edgert/model.py",
           "at[axis] = slice(int(length), int(length) + n)", "at[axis] = slice(0, n)",
           ("tests/test_kv_cache.py", "-k", "however")),
    Mutant("int8 KV cache: a long forward not cut at the model's bound", "edgert/model.py",
           "if self.feed_limit and n > self.feed_limit:", "if False:",
           ("tests/test_kv_cache.py", "-k", "however")),
    Mutant("int8 KV cache: the query's scale left off the integer scores", "export/graph.py",
           'scores = g.op("Mul", [g.op("Cast", [dot], name + ".qk", to=f32), q_sc], name + ".qk_q")',
           'scores = g.op("Cast", [dot], name + ".qk", to=f32)',
           ("tests/test_kv_cache.py", "-k", "int8_cache_logits")),
    Mutant("a graph asked for by name replaced by its kv8gqa twin", "edgert/model.py",
           'if not strategy and ort_version() >= KV8GQA_SINCE and os.environ.get("EDGERT_KV8_GRAPH") != "ops":',
           'if ort_version() >= KV8GQA_SINCE and os.environ.get("EDGERT_KV8_GRAPH") != "ops":',
           ("tests/test_kv_cache.py", "-k", "asked_for_by_name")),
    Mutant("int8 KV cache, calibrated scales: the key scales not folded into the queries", "export/graph.py",
           'qg = g.op("Mul", [qg, scales[0]], name + ".q_keyscaled")', 'pass',
           ("tests/test_kv_cache.py", "-k", "calibrated_scales and ops")),
    Mutant("int8 KV cache, calibrated scales: the value scales left off the output", "export/graph.py",
           'out = g.op("Mul", [out, scales[1]], name + ".pv_valscaled")', 'pass',
           ("tests/test_kv_cache.py", "-k", "calibrated_scales and ops")),
    Mutant("int8 KV cache, calibrated scales: codes saturated at +-63", "export/graph.py",
           'g.const(name + ".lo", np.array(-127, np.float32)), q127], name + ".kvclip")',
           'g.const(name + ".lo", np.array(-63, np.float32)), g.const(name + ".hi", np.array(63, np.float32))], name + ".kvclip")',
           ("tests/test_kv_cache.py", "-k", "calibrated_scales and ops")),
    Mutant("int8 KV cache, calibrated scales: a key range pairs channels i and i + rotary_dim / 2", "export/calibrate.py",
           "mid = new.shape[-1] // 2", "mid = half",
           ("tests/test_kv_cache.py", "-k", "do_not_move or perplexity_on_stories")),
    Mutant("int8 KV cache: the query codes' zero point off by one", "export/graph.py",
           'g.const(name + ".zp128", np.array(128, np.uint8))', 'g.const(name + ".zp128", np.array(127, np.uint8))',
           ("tests/test_kv_cache.py", "-k", "int8_cache_logits")),
    Mutant("quantization: a GPTQ chunk copied into a reused shared memory block too small for it", "export/quantize.py",
           "fits = [b for b in free if b.size >= rows.nbytes]", "fits = list(free)",
           ("tests/test_recipes.py", "-k", "pool")),
    Mutant("quantization: the GPTQ pool waits for every chunk, then takes the oldest", "export/quantize.py",
           "return_when=FIRST_COMPLETED)", "return_when='ALL_COMPLETED')",
           ("tests/test_recipes.py", "-k", "takes_the_next")),
    Mutant("checkpoint: linear() allocates a fresh array for every layer", "export/checkpoint.py",
           "out = self._buffers.get(shape)", "out = None",
           ("tests/test_export_dense.py", "-k", "linear_reuses")),
    Mutant("checkpoint: linear() stacks the tensors over each other", "export/checkpoint.py",
           "            at += rows\n", "",
           ("tests/test_export_dense.py", "-k", "linear_reuses")),
    Mutant("synthetic artifacts without the int8 cache's ranges (no kv8gqa graph)", "export/artifact.py",
           'if stats is None and hasattr(ckpt, "kv_ranges"):', "if False:",
           ("tests/test_synthetic_shapes.py", "-k", "kv8gqa")),
    Mutant("synthetic int8 cache: value ranges a tenth of the values' spread (clipped)", "export/synthetic.py",
           '("value", 4 * sigma)', '("value", 0.4 * sigma)',
           ("tests/test_synthetic_shapes.py", "-k", "kv8gqa")),
    Mutant("calibration: inputs truncated to bfloat16, not rounded", "export/calibrate.py",
           "bits += 0x8000", "bits += 0",
           ("tests/test_recipes.py", "-k", "bfloat16")),
    Mutant("calibration: a set of output arrays reused before its write is done", "export/calibrate.py",
           "        self._written(slot)\n        shape, bufs", "        shape, bufs",
           ("tests/test_recipes.py", "-k", "before_its_arrays")),
    Mutant("chat: thinking off closes the reasoning with tokens encoded apart from the rendering", "edgert/llm.py",
           "                text += CLOSE_THINKING\n                check_prompt_length(text, self.context)\n"
           "                ids = self.tokenizer.encode(text, add_special_tokens=False)\n",
           "                ids = ids + self.tokenizer.encode(CLOSE_THINKING, add_special_tokens=False)\n",
           ("tests/test_chat_repl.py", "-k", "thinking_off")),
    Mutant("serve: reasoning_effort none feeds the closing as generated tokens", "edgert/serve.py",
           "thinking=not self._no_thinking(body)", "thinking=True",
           ("tests/test_serve.py", "-k", "thinking_budget_effort")),
    Mutant("synthetic Qwen3.5-MoE shape without its shared expert", "export/synthetic.py",
           'if m.model_type in ("qwen2_moe", "qwen3_5_moe") and shared:', 'if m.model_type == "qwen2_moe" and shared:',
           ("tests/test_hybrid.py", "-k", "synthetic_shapes")),
    Mutant("int8 KV cache: sliding-window mask dropped", "export/graph.py",
           "    if bias:     # [B, 1, S, T] -> [B, 1, S, 1, T]", "    if False:     # [B, 1, S, T] -> [B, 1, S, 1, T]",
           ("tests/test_kv_cache.py", "-k", "int8_cache_logits")),
    Mutant("int8 KV cache: gpt-oss's sink column kept, the last key's dropped", "export/graph.py",
           '        probs = g.op("Slice", [probs, c("one_col", [1]), c("end", [2**62]), c("ax4p", [4])], name + ".no_sink")',
           '        probs = g.op("Slice", [probs, c("one_col", [0]), c("end", [-1]), c("ax4p", [4])], name + ".no_sink")',
           ("tests/test_kv_cache.py", "-k", "int8_cache_logits")),
    Mutant("int8 KV cache: a shared prefix copied along the wrong axis", "edgert/model.py",
           "at[(self._row_axis[i] if self._row_axis else 2) - 1] = slice(0, n)", "at[1] = slice(0, n)",
           ("tests/test_engine.py", "-k", "prefix_reuse")),
    Mutant("int8 KV cache: every query sees all T keys (no causal or per-row mask)", "export/graph.py",
           'seen = g.op("LessOrEqual", [keys, g.op("Unsqueeze", [pos, c("ax2", [2])], name + ".pcol")], name + ".seen")',
           'seen = g.op("Less", [keys, total], name + ".seen")',
           ("tests/test_kv_cache.py", "-k", "however")),
    Mutant("quantization: int4 nibbles packed high first", "export/quantize.py",
           "return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)",
           "return (q[..., 1::2] | (q[..., 0::2] << 4)).astype(np.uint8)",
           ("tests/test_fixtures.py", "-k", "kl_against and 4")),
    Mutant("KV cache: past keys and values swapped (graph)", "export/graph.py",
           "ins = [q, k, v, past_k, past_v, io.seqlens_k,", "ins = [q, k, v, past_v, past_k, io.seqlens_k,",
           ("tests/test_export_dense.py", "-k", "fp32_logits")),
    Mutant("KV cache: the newest cached row not attended", "edgert/model.py",
           'io.bind_cpu_input("seqlens_k", (total - 1).astype(np.int32))',
           'io.bind_cpu_input("seqlens_k", (total - 2).astype(np.int32))',
           ("tests/test_export_dense.py", "-k", "fp32_logits")),
    Mutant("sampler: top-p drops the token that reaches the mass", "edgert/generate.py",
           "kept = int(np.count_nonzero(np.cumsum(p[order]) - p[order] < self.top_p))",
           "kept = int(np.count_nonzero(np.cumsum(p[order]) < self.top_p))",
           ("tests/test_sampling.py",)),
    Mutant("sampler: top-k keeps one token too few", "edgert/generate.py",
           "p[p < cut] = -np.inf", "p[p <= cut] = -np.inf",
           ("tests/test_sampling.py",)),
    Mutant("sampler: the nucleus of a large vocabulary trusts its head without its mass", "edgert/generate.py",
           "if head.size < p.size // 8 and p[head].sum() >= self.top_p:", "if head.size < p.size // 8:",
           ("tests/test_sampling.py",)),
    Mutant("sampler: the draw is not rng.choice's (its uniform scaled by 0.999)", "edgert/generate.py",
           "return self._inverse_cdf(p, self.rng.random() * total)",
           "return self._inverse_cdf(p, self.rng.random() * total * 0.999)",
           ("tests/test_sampling.py",)),
    Mutant("sampler: a vote's log-probability from the previous token's scratch", "edgert/generate.py",
           "        np.copyto(z, logits.reshape(-1))\n        top = z.max()",
           "        top = z.max()",
           ("tests/test_sampling.py",)),
    Mutant("sampler: a log-probability from the last draw's normaliser, whatever the logits", "edgert/generate.py",
           "if lse is not None and lse[0] is logits:", "if lse is not None:",
           ("tests/test_sampling.py",)),
    Mutant("sampler: the two-level search without the chunk's offset", "edgert/generate.py",
           "return lo + i", "return i",
           ("tests/test_sampling.py",)),
    Mutant("sampler: the two-level search does not subtract the chunks before", "edgert/generate.py",
           "u -= run[c - 1] if c else 0.0", "u -= 0.0",
           ("tests/test_sampling.py",)),
    Mutant("sampler: fresh arrays every token", "edgert/generate.py",
           "if self._z is None or self._z.size != n:", "if True:",
           ("tests/test_sampling.py",)),
    Mutant("serve: a logprob without the log-softmax's normalizer", "edgert/generate.py",
           "return picked - np.log(np.exp(z, out=z).sum())", "return picked",
           ("tests/test_serve.py", "-k", "logprobs")),
    Mutant("serve: the header deadline only for a connection's first request", "edgert/serve.py",
           "self.loop.call_later(HEADER_SECONDS, self._drop_if_still, self.cycle)", "pass",
           ("tests/test_serve.py", "-k", "idle_connections")),
    Mutant("serve: a request's failing sampler ends every request in the batch", "edgert/serve.py",
           "except Exception as e:          # a request's own sampling fails: that request only",
           "except ZeroDivisionError as e:",
           ("tests/test_serve.py", "-k", "sampling_fails")),
    Mutant("serve: /tokenize without the prompts' character cap", "edgert/serve.py",
           "check_prompt_length(content, s.llm.context)", "check_prompt_length(content[:10], s.llm.context)",
           ("tests/test_serve.py", "-k", "errors_have")),
    Mutant("serve: logit_bias accepted and not applied", "edgert/generate.py",
           "np.add.at(logits, self.bias[0], self.bias[1])", "np.add.at(logits, self.bias[0], 0 * self.bias[1])",
           ("tests/test_serve.py", "-k", "logit_bias")),
    Mutant("sampler: the temperature as a product with 1 / T (overflows for a tiny T)", "edgert/generate.py",
           "p /= self.temperature ", "p *= 1.0 / self.temperature ",
           ("tests/test_serve.py", "-k", "errors_have")),
    Mutant("serve: CORS preflight refuses the OpenAI SDKs' headers", "edgert/serve.py",
           'allow_headers=["*"])', 'allow_headers=["Authorization", "Content-Type"])',
           ("tests/test_serve.py", "-k", "key_queue")),
    Mutant("chat template variables passed as keywords (a variable named self fails)", "edgert/chat.py",
           """generate({**variables, "messages": chat,""", """generate(**{**variables, "messages": chat,""",
           ("tests/test_serve.py", "-k", "errors_have")),
    Mutant("chat /save replaces any existing file", "edgert/conversation.py",
           "if not _saved_here(path):", "if False:",
           ("tests/test_chat_repl.py", "-k", "save_and_load")),
    Mutant("eval: the reference's shorter context not taken as the default window", "edgert/evaluate.py",
           "if asked is not None or ref.context < 2:", "if True:",
           ("tests/test_hostile.py", "-k", "json_target")),
    Mutant("a manifest edited against its graph reaches onnxruntime", "edgert/model.py",
           "if graph_inputs.get(past) != want:", "if False:",
           ("tests/test_hostile.py", "-k", "edited_against")),
    Mutant("piped chat exits 0 after a failed line", "edgert/cli.py",
           "elif failed:", "elif False:",
           ("tests/test_hostile.py", "-k", "piped_chat")),
    Mutant("bench --json FILE checked only after the run", "edgert/cli.py",
           "if target.is_dir() or (target.exists() and not target.is_file()):", "if False:",
           ("tests/test_hostile.py", "-k", "json_target")),
    Mutant("sampler: top-p 0 keeps no token", "edgert/generate.py",
           "return order[:max(kept, 1)]", "return order[:kept]",
           ("tests/test_hostile.py", "-k", "audit_found")),
    Mutant("export --force deletes a user's file beside an edgert.json", "export/outdir.py",
           "    if foreign is not None:", "    if foreign is not None and False:",
           ("tests/test_export_guards.py", "-k", "force_keeps")),
    Mutant("export --calib FILE used whole, however long", "export/calibrate.py",
           "    limit = token_budget(model, ckpt) if name is not None else None", "    limit = None",
           ("tests/test_export_guards.py", "-k", "calib_file_capped")),
    Mutant("export opens a FIFO as a checkpoint file", "export/checkpoint.py",
           "    if not stat.S_ISREG(mode):", "    if False:",
           ("tests/test_export_guards.py", "-k", "fifo")),
    Mutant("export keeps a chat template that cannot render", "export/artifact.py",
           "            render_chat(template, CHECK_CHAT, add_generation_prompt=True, variables=names)", "            pass",
           ("tests/test_export_guards.py", "-k", "unrenderable")),
    Mutant("export keeps weights of absurd magnitude", "export/checkpoint.py",
           "        huge = not bad and max(hi, -lo) >= MAX_MAGNITUDE", "        huge = False",
           ("tests/test_export_guards.py", "-k", "huge_weights")),
    Mutant("export: a symlink loop at OUT is a traceback", "export/outdir.py",
           '        raise OutError(f"cannot resolve {out} or the source: {e}") from None', "        raise",
           ("tests/test_export_guards.py", "-k", "symlink_loop")),
    Mutant("export truncates a checkpoint with more layers than config.json", "export/validate.py",
           "    if extra:", "    if False:",
           ("tests/test_export_guards.py", "-k", "fewer_layers")),
    Mutant("export: the later shard wins a repeated tensor", "export/checkpoint.py",
           "                    if name in self._where:", "                    if False:",
           ("tests/test_export_guards.py", "-k", "duplicate_tensor")),
    Mutant("eval: a Hugging Face reference missing a tensor runs on random weights", "export/reference.py",
           "        if missing:", "        if False:",
           ("tests/test_eval.py", "-k", "missing_a_tensor")),
    Mutant("token ids beyond the vocabulary reach onnxruntime", "edgert/model.py",
           "if hi >= self.vocab or lo < 0:", "if False:",
           ("tests/test_hostile.py", "-k", "outside_the_vocabulary")),
    Mutant("a manifest with fewer layers than its graph reaches onnxruntime", "edgert/model.py",
           "        if extra:", "        if False:",
           ("tests/test_hostile.py", "-k", "edited_against")),
    Mutant("run: speculation that cannot apply says nothing", "edgert/cli.py",
           "            if why:", "            if False:",
           ("tests/test_hostile.py", "-k", "speculation_that")),
    Mutant("serve: 405 without its Allow header", "edgert/serve.py",
           'headers=getattr(exc, "headers", None)).response()', "headers=None).response()",
           ("tests/test_serve.py", "-k", "errors_have")),
    Mutant("serve: top_logprobs worst first", "edgert/serve.py",
           "order = np.argsort(-lp[1:], kind=\"stable\")", "order = np.argsort(lp[1:], kind=\"stable\")",
           ("tests/test_serve.py", "-k", "logprobs")),
    Mutant("votes_cost: the ratio of means, not medians", "benchmarks/votes_cost.py",
           "ratio = statistics.median(many) / statistics.median(one)", "ratio = statistics.mean(many) / statistics.mean(one)",
           ("tests/test_bench_suite.py", "-k", "votes_cost")),
    Mutant("load: onnxruntime's hard-link refusal left to its own truncated text", "edgert/model.py",
           'if "hardlink" in first.replace(" ", "").lower():', "if False:",
           ("tests/test_hybrid.py", "-k", "hard_linked")),
    Mutant("tables: an int8 table back at blocks of 32 whatever its width", "export/graph.py",
           "return auto_block(width) if self.embed_bits == 8 else TABLE_BLOCK", "return TABLE_BLOCK",
           ("tests/test_recipes.py", "-k", "default_blocks")),
    Mutant("ab_decode: each turn against the turn before it only", "benchmarks/ab_decode.py",
           "ratios = y / ((x[:-1] + x[1:]) / 2)", "ratios = y / x[:-1]",
           ("tests/test_bench_suite.py", "-k", "ab_decode")),
    Mutant("ab_decode: the second leg's ratio not inverted", "benchmarks/ab_decode.py",
           'legs = [ab["ratio"], 1 / ba["ratio"]]', 'legs = [ab["ratio"], ba["ratio"]]',
           ("tests/test_bench_suite.py", "-k", "ab_decode")),
    Mutant("sampling defaults: generation_config temperature ignored", "edgert/llm.py",
           'temperature = gen.get("temperature", 1.0) if gen.get("do_sample") else 0.0',
           'temperature = 1.0 if gen.get("do_sample") else 0.0',
           ("tests/test_sampling.py", "-k", "generation_config")),
    Mutant("think budget one token late", "edgert/generate.py",
           "if self.think_budget is not None and self.spent >= self.think_budget:",
           "if self.think_budget is not None and self.spent > self.think_budget:",
           ("tests/test_cli_flags.py", "-k", "think_budget")),
    Mutant("chunked prefill skips the first token of later chunks", "edgert/engine.py",
           "chunk = toks[i:j]", "chunk = toks[i + (i > 0):j]",
           ("tests/test_cli_flags.py", "-k", "long_prompt")),
    # the batch engine
    Mutant("engine: every row of a batched step gets the first row's length", "edgert/engine.py",
           "lengths[r] = min(len(held), self.context - 1)", "lengths[r] = min(len(self._held[first]), self.context - 1)",
           ("tests/test_engine.py", "-k", "batch_equals_each_alone_dense")),
    Mutant("engine: a copied prefix loses its last row", "edgert/model.py",
           "= slice(0, n)     # int8 keys: positions last", "= slice(0, n - 1)     # int8 keys: positions last",
           ("tests/test_engine.py", "-k", "prefix_reuse")),
    Mutant("speculation keeps the first rejected draft token in the cache", "edgert/generate.py",
           "engine.rewind(seq, seq.pos - len(draft) + kept)", "engine.rewind(seq, seq.pos - len(draft) + kept + 1)",
           ("tests/test_engine.py", "-k", "speculation_gives_plain_greedy")),
    Mutant("votes: the least common answer wins", "edgert/votes.py",
           "key = max(groups, key=lambda k: (len(groups[k]), sum(v[\"logprob\"] for v in groups[k])))",
           "key = min(groups, key=lambda k: (len(groups[k]), sum(v[\"logprob\"] for v in groups[k])))",
           ("tests/test_engine.py", "-k", "votes")),
    Mutant("fp16 KV cache: the attention output not cast back", "export/graph.py",
           'attended = g.op("Cast", [attended], name + ".out32", to=TensorProto.FLOAT, out=out)',
           'attended = g.op("Identity", [attended], name + ".out32", out=out)',
           ("tests/test_kv_cache.py", "-k", "transformers")),
    Mutant("CLI: --top-k not passed on", "edgert/cli.py",
           "stream = llm.generate(ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,",
           "stream = llm.generate(ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=None,",
           ("tests/test_cli_flags.py", "-k", "top_k")),
    Mutant("CLI: --system dropped", "edgert/cli.py",
           "ids = llm.encode(prompt, raw=raw, system=system)", "ids = llm.encode(prompt, raw=raw)",
           ("tests/test_cli_flags.py", "-k", "system")),
    Mutant("synthetic: planes densified (the bench --synthetic crash)", "export/graph.py",
           'if hasattr(table, "planes"):', "if False:",
           ("tests/test_synthetic_shapes.py", "-k", "every_shape")),
    # hybrid recurrent models (tests/test_hybrid.py)
    Mutant("hybrid: the recurrent state never advances", "edgert/model.py",
           "self.state, self._state_next = self._state_next, self.state", "pass",
           ("tests/test_hybrid.py", "-k", "carried and lfm2")),
    Mutant("hybrid: an idle batch row's state overwritten", "edgert/model.py",
           "if first == 0 and rows == self.slots and (stepped is None or len(stepped) == rows):",
           "if True:",
           ("tests/test_hybrid.py", "-k", "batch and lfm2")),
    Mutant("hybrid: prefix reused without a kept state", "edgert/engine.py",
           "return max([p for p in [*self._snaps[slot], held] if p <= n] + [0])", "return n",
           ("tests/test_hybrid.py", "-k", "prefix_reuse and lfm2")),
    Mutant("hybrid: the short convolution's kernel reversed", "export/graph.py",
           'np.ascontiguousarray(weight[:, j], np.float32))', 'np.ascontiguousarray(weight[:, k - 1 - j], np.float32))',
           ("tests/test_hybrid.py", "-k", "fp32 and lfm2-7")),
    Mutant("hybrid: the delta-rule chunk decay off by a token", "export/graph.py",
           'k_dec = g.op("Mul", [kc, col(g.op("Exp", [g.op("Sub", [cum_last, cum], name + ".to_end")]',
           'k_dec = g.op("Mul", [kc, col(g.op("Exp", [g.op("Sub", [cum_last, g.op("Sub", [cum, gc], name + ".off")], name + ".to_end")]',
           ("tests/test_hybrid.py", "-k", "fp32 and qwen3_5-300")),
    Mutant("hybrid fused graph: LinearAttention without the delta rule", "export/graph.py",
           'update_rule="gated_delta", scale=1.0)', 'update_rule="gated", scale=1.0)',
           ("tests/test_hybrid.py", "-k", "fp32 and qwen3_5-7")),
    Mutant("hybrid fused graph: the conv state read back in the wrong layout", "export/graph.py",
           'return g.op("Transpose", [y], name + ".y", perm=[0, 2, 1]), new_state',
           'return g.op("Transpose", [y], name + ".y", perm=[0, 2, 1]), g.op("Reshape", [g.op("Transpose", [new_state], '
           'name + ".t", perm=[0, 2, 1]), g.const(name + ".cf", np.array([0, c, k - 1], np.int64))], name + ".scrambled")',
           ("tests/test_hybrid.py", "-k", "carried and lfm2")),
    Mutant("hybrid: the runtime holds the manifest's state layout, not the graph's", "edgert/model.py",
           "dims = declared.get(f\"past_state.{spec['layer']}.{spec['name']}\")", "dims = None",
           ("tests/test_hybrid.py", "-k", "channel_first")),
    Mutant("hybrid: Gated DeltaNet's l2norm as an RMSNorm without its width", "export/graph.py",
           "np.full(width, scale / np.sqrt(width), np.float32)", "np.full(width, scale, np.float32)",
           ("tests/test_hybrid.py", "-k", "fp32 and qwen3_5-7")),
    # the second audits (stop 33): serve's HTTP-level errors, the CLI's usage errors, verify, --json, FIFOs
    Mutant("serve: malformed HTTP answered in uvicorn's plain text", "edgert/serve.py",
           "def send_400_response(self, msg):", "def _unused_400_response(self, msg):",
           ("tests/test_serve_http.py", "-k", "malformed")),
    Mutant("serve: malformed requests not counted in /metrics", "edgert/serve.py",
           '            counts[("invalid", err.status)] += 1', "            pass",
           ("tests/test_serve_http.py", "-k", "malformed or past_the_limit")),
    Mutant("serve: uvicorn's warning line for each malformed request", "edgert/serve.py",
           '    logging.getLogger("uvicorn.error").addFilter(_not_each_malformed_request)', "    pass",
           ("tests/test_serve_http.py", "-k", "malformed")),
    Mutant("serve: headers past the limit get a 400, not a 431", "edgert/serve.py",
           'if getattr(e, "error_status_hint", None) == 431:', "if False:",
           ("tests/test_serve_http.py", "-k", "past_the_limit")),
    Mutant("serve: no header limit", "edgert/serve.py",
           "MAX_HEADERS = 64 << 10 ", "MAX_HEADERS = 64 << 20 ",
           ("tests/test_serve_http.py", "-k", "past_the_limit")),
    Mutant("serve: an HTTP error closes at once (unread data: a reset)", "edgert/serve.py",
           "self.dropped = 0", "return self.transport.close()",
           ("tests/test_serve_http.py", "-k", "past_the_limit")),
    Mutant("serve: what follows an HTTP error still goes to h11", "edgert/serve.py",
           "if self.dropped is None:", "if True:",
           ("tests/test_serve_http.py", "-k", "past_the_limit")),
    Mutant("serve: a bad body's route still answers (an h11 error, a traceback)", "edgert/serve.py",
           "self.cycle.disconnected = True ", "pass ",
           ("tests/test_serve_http.py", "-k", "malformed")),
    Mutant("serve: refused CORS preflights in Starlette's plain text", "edgert/serve.py",
           "app.add_middleware(_CORS, ", "app.add_middleware(CORSMiddleware, ",
           ("tests/test_serve_http.py", "-k", "cors")),
    Mutant("serve: a refused CORS preflight without its CORS headers", "edgert/serve.py",
           'if k.startswith("access-control-") or k == "vary"}', "if False}",
           ("tests/test_serve_http.py", "-k", "cors")),
    Mutant("serve: every CORS preflight refused", "edgert/serve.py",
           "if r.status_code == 200:", "if r.status_code == 201:",
           ("tests/test_serve_http.py", "-k", "cors")),
    Mutant("CLI: click's usage errors in click's four lines", "edgert/cli.py",
           """        typer.echo(f"edgert: error: {' '.join(e.format_message().split())}{see}", err=True)""",
           "        e.show()",
           ("tests/test_cli_audit.py", "-k", "usage_errors")),
    Mutant("verify: the tokenizer, template and config files not hashed", "edgert/artifact.py",
           """    for name, info in {**manifest["files"], **manifest.get("text_files", {})}.items():""",
           """    for name, info in manifest["files"].items():""",
           ("tests/test_cli_audit.py", "-k", "verify_covers")),
    Mutant("verify: an edited edgert.json passes", "edgert/artifact.py",
           """    if "manifest_sha256" in manifest and manifest_sha256(manifest) != manifest["manifest_sha256"]:""",
           "    if False:",
           ("tests/test_cli_audit.py", "-k", "verify_covers_every")),
    Mutant("manifest: text_files may name any file", "edgert/artifact.py",
           """        if key == "text_files" and name not in TEXT_FILES:""", "        if False:",
           ("tests/test_cli_audit.py", "-k", "verify_covers_every")),
    Mutant("export: the tokenizer and config files not hashed", "export/artifact.py",
           "                  for name in TEXT_FILES if (tmp / name).is_file()}",
           "                  for name in () if (tmp / name).is_file()}",
           ("tests/test_cli_audit.py", "-k", "verify_covers_every or without_the_new_hashes")),
    Mutant("verify: silent about the files it could not check", "edgert/cli.py",
           "    if skipped:", "    if False:",
           ("tests/test_cli_audit.py", "-k", "without_the_new_hashes")),
    Mutant("bench --json -: the '-' taken for the artifact", "edgert/cli.py",
           """        if i + 1 == len(args) or args[i + 1].startswith("-") and args[i + 1] != "-":""",
           """        if i + 1 == len(args) or args[i + 1].startswith("-"):""",
           ("tests/test_cli_audit.py", "-k", "json_dash")),
    Mutant("bench --json ART: the folder taken as the JSON file", "edgert/cli.py",
           "    if artifact is None and synthetic is None and json_out and Path(json_out).is_dir():", "    if False:",
           ("tests/test_cli_audit.py", "-k", "json_before")),
    Mutant("EDGERT_SYNTHETIC_DIR on a file: [Errno 17] File exists", "export/synthetic.py",
           "    except OSError as e:        # a file in the way, no permission",
           "    except ImportError as e:",
           ("tests/test_cli_audit.py", "-k", "synthetic_dir_on")),
    Mutant("a read-only EDGERT_SYNTHETIC_DIR: [Errno 13] from the build's temporary folder", "export/synthetic.py",
           "    if need_disk and not os.access(folder, os.W_OK | os.X_OK):", "    if False:",
           ("tests/test_cli_audit.py", "-k", "read_only_synthetic")),
    Mutant("synthetic: a stale build's stamp kept (the export refuses the folder)", "export/synthetic.py",
           '        (out / "synthetic.json").unlink()', "        pass",
           ("tests/test_bench.py", "-k", "stale")),
    Mutant("export --force onto a read-only artifact leaves .OUT.old-PID", "export/outdir.py",
           "    if not os.access(out, os.W_OK | os.X_OK):", "    if False:",
           ("tests/test_cli_audit.py", "-k", "read_only")),
    Mutant("export: an old copy that could not be removed left silently", "export/outdir.py",
           "                if os.path.lexists(old):", "                if False:",
           ("tests/test_cli_audit.py", "-k", "cannot_be_removed")),
    Mutant("--calib/--text FIFO opened waiting for a writer (blocks)", "edgert/limits.py",
           "fd = os.open(path, os.O_RDONLY | (os.O_NONBLOCK if fifo else 0))", "fd = os.open(path, os.O_RDONLY)",
           ("tests/test_cli_audit.py", "-k", "text_files_that")),
    Mutant("GPTQ pool: the oldest chunk collected first when several are done", "export/quantize.py",
           "at = next(n for n, j in enumerate(self.inflight) if j[0] in done)",
           "at = next(n for n, j in enumerate(self.inflight) if j[0] in done or n == 0)",
           ("tests/test_recipes.py", "-k", "takes_the_next")),
    # tool calls (stop 33)
    Mutant("tools: a call comes back as the answer's text", "edgert/serve.py",
           "found = self.tools.split(self.calls) if complete else None", "found = None",
           ("tests/test_serve_tools.py", "-k", "comes_back")),
    Mutant("tools: calls read from an answer cut by max_tokens", "edgert/serve.py",
           "found = self.tools.split(self.calls) if complete else None", "found = self.tools.split(self.calls)",
           ("tests/test_serve_tools.py", "-k", "without_tools")),
    Mutant("tools: the start of a call not held back from the stream", "edgert/serve.py",
           "held = self.stops + ([self.tools.open] if self.tools and self.calls is None else [])", "held = self.stops",
           ("tests/test_serve_tools.py", "-k", "leaks")),
    Mutant("tools: a call's special-token marker skipped like other special tokens", "edgert/serve.py",
           "mark = self.marks.get(step.id) if kind == \"content\" else None", "mark = None",
           ("tests/test_serve_tools.py", "-k", "leaks")),
    Mutant("tools: not rendered by the template", "edgert/serve.py",
           "                kwargs = {**kwargs, \"tools\": tools}", "                pass",
           ("tests/test_serve_tools.py", "-k", "comes_back")),
    Mutant("tools: tool_choice none still renders them", "edgert/serve.py",
           "        if choice == \"none\":\n            return None, None, None\n", "",
           ("tests/test_serve_tools.py", "-k", "without_tools")),
    Mutant("tools: an earlier call's arguments reach the template as a JSON string", "edgert/tools.py",
           "            if isinstance(args, dict):\n                fn[\"arguments\"] = args", "            pass",
           ("tests/test_serve_tools.py", "-k", "next_turn")),
    Mutant("tools: the streamed calls left out", "edgert/serve.py",
           "                        if texts[i].tool_calls and finish:", "                        if False:",
           ("tests/test_serve_tools.py", "-k", "comes_back")),
    Mutant("tools: a forced call (required, named) answered as auto", "edgert/serve.py",
           "close_think_ids=self.close_ids, deadline=deadline, answer_prefix=prefix,",
           "close_think_ids=self.close_ids, deadline=deadline, answer_prefix=(),", ("tests/test_serve_tools.py", "-k", "forces")),
    Mutant("tools: a named call forced as any call", "edgert/serve.py",
           "        forced = self.tool_format.forced(named) if", "        forced = self.tool_format.forced(None) if",
           ("tests/test_serve_tools.py", "-k", "forces")),
    Mutant("tools: tool_choice naming a function not in tools accepted", "edgert/serve.py",
           "        if named is not None and named not in (t[\"function\"][\"name\"] for t in tools):", "        if False:",
           ("tests/test_serve_tools.py", "-k", "cannot_be_done")),
    Mutant("tools: required without tools answered without a call", "edgert/serve.py",
           "            if choice == \"required\" or named is not None:\n                raise", "            if False:\n                raise",
           ("tests/test_serve_tools.py", "-k", "cannot_be_done")),
    Mutant("harmony: headers shown as the answer's text (serve)", "edgert/serve.py",
           "        if self.split and (step.id in self.think or step.hidden):", "        if self.split and step.id in self.think:",
           ("tests/test_harmony.py", "-k", "server")),
    Mutant("harmony: headers shown as text (Python API, run, chat)", "edgert/llm.py",
           "            text = decoder.flush() if step.hidden else decoder.push(step.id)", "            text = decoder.push(step.id)",
           ("tests/test_harmony.py", "-k", "python_api")),
    Mutant("harmony: channels not followed", "edgert/generate.py",
           "        hidden = self.channels is not None and self._channel(token)", "        hidden = False",
           ("tests/test_harmony.py",)),
    Mutant("harmony: the analysis channel taken for the answer", "edgert/generate.py",
           "                self.reasoning = any(h[i:i + n] == list(c.analysis) for i in range(len(h) - n + 1))",
           "                self.reasoning = False", ("tests/test_harmony.py", "-k", "server or across")),
    Mutant("harmony: markers counted as reasoning tokens", "edgert/generate.py",
           "        in_reasoning = self.reasoning and not hidden", "        in_reasoning = self.reasoning",
           ("tests/test_harmony.py", "-k", "across")),
    Mutant("harmony: not detected at load", "edgert/llm.py",
           "        self.channels = Channels.detect(self.tokenizer)", "        self.channels = None",
           ("tests/test_harmony.py", "-k", "python_api")),
    Mutant("harmony: votes do not follow the channels", "edgert/votes.py",
           "llm.close_think_ids(), logprobs=True, channels=llm.channels)", "llm.close_think_ids(), logprobs=True)",
           ("tests/test_harmony.py", "-k", "votes")),
    Mutant("harmony: reasoning_effort not given to the template", "edgert/serve.py",
           '                kwargs = {"reasoning_effort": effort, **kwargs}', "                pass",
           ("tests/test_harmony.py", "-k", "server")),
    Mutant("harmony: a think budget closes nothing", "edgert/llm.py",
           "            return list(self.channels.close)", "            return []",
           ("tests/test_harmony.py", "-k", "python_api or server")),
    Mutant("harmony: no reasoning asked for, the model thinks anyway", "edgert/generate.py",
           "            self.pending = list(channels.answer)", "            pass",
           ("tests/test_harmony.py", "-k", "server or across")),
    Mutant("harmony: serve's thinking budgets skip gpt-oss", "edgert/serve.py",
           "        thinking = llm.thinks", "        thinking = llm.think[1] is not None",
           ("tests/test_harmony.py", "-k", "server")),
    Mutant("harmony: a message to a function not read as a call", "edgert/serve.py",
           "            name = harmony_recipient(self.tokenizer.decode(list(step.header))) if step.header else None",
           "            name = None", ("tests/test_harmony.py", "-k", "tool_calls")),
    Mutant("harmony: a call's body streamed as the answer", "edgert/serve.py",
           "        elif self.h_call is not None:\n            self.h_call[1] += self.decoder.push(step.id)",
           "        elif False:\n            self.h_call[1] += self.decoder.push(step.id)",
           ("tests/test_harmony.py", "-k", "tool_calls")),
    Mutant("harmony: a forced call (tool_choice) accepted for gpt-oss", "edgert/serve.py",
           '        if forced is not None and self.tool_format.name == "harmony":', "        if False:",
           ("tests/test_harmony.py", "-k", "tool_calls")),
    Mutant("harmony: gpt-oss's tool format not detected", "edgert/tools.py",
           '    if token_id("<|channel|>") is not None and token_id("<|message|>") is not None:\n        return HARMONY',
           "    pass", ("tests/test_harmony.py", "-k", "tool_calls")),
    Mutant("harmony: a vote's text keeps the headers' words", "edgert/votes.py",
           "        text = llm.tokenizer.decode([st.id for st in steps[s] if not st.hidden])", "        text = llm.tokenizer.decode(ids)",
           ("tests/test_harmony.py", "-k", "votes")),
    Mutant("run --votes prints the best vote's whole text (harmony's reasoning too)", "edgert/cli.py",
           '    typer.echo(result["answer_text"] or result["text"])', '    typer.echo(result["text"])',
           ("tests/test_engine.py", "-k", "votes_cli")),
    Mutant("harmony: a vote's answer keeps the headers' words", "edgert/votes.py",
           "if not (st.reasoning or st.hidden)]).strip()", "if not st.reasoning]).strip()",
           ("tests/test_harmony.py", "-k", "votes")),
    Mutant("decoding: a forced answer prefix cuts the reasoning short", "edgert/generate.py",
           "                and not (token == self.think_start and self.generated == 0):", "                and True:",
           ("tests/test_serve_tools.py", "-k", "waits")),
    Mutant("decoding: a forced answer prefix lets the model's EOS through", "edgert/generate.py",
           "            token, forced = self.pending.pop(0), True", "            token, forced = self.pending.pop(0), token in self.stops",
           ("tests/test_serve_tools.py", "-k", "waits")),
    Mutant("tools: a forced named JSON call ends in a space", "edgert/tools.py",
           """        return f'{self.open}\\n{{"name": {json.dumps(function)}, "arguments":'""",
           """        return f'{self.open}\\n{{"name": {json.dumps(function)}, "arguments": '""",
           ("tests/test_serve_tools.py", "-k", "each_format")),
    Mutant("tools: LFM2 arguments evaluated, not only literals", "edgert/tools.py",
           "{k.arg: ast.literal_eval(k.value) for k in c.keywords}", "{k.arg: eval(ast.unparse(k.value)) for k in c.keywords}",
           ("tests/test_serve_tools.py", "-k", "lfm2")),
    Mutant("tools: a JSON call that is not an object read anyway", "edgert/tools.py",
           "            if not isinstance(call, dict):\n                raise ValueError(\"a call is a JSON object\")\n", "",
           ("tests/test_serve_tools.py", "-k", "hermes_calls")),
    Mutant("tools: the format told by the template alone", "edgert/tools.py",
           "        if f.open in template or token_id(f.open) is not None:", "        if f.open in template:",
           ("tests/test_serve_tools.py", "-k", "format_comes")),
]


def copy_repo(dst: Path) -> None:
    """The working tree's tracked and new (not ignored) files, and edgert_export -> export as installed."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    (dst / "edgert_export").symlink_to("export", target_is_directory=True)


def pytest(repo: Path, args, timeout: float) -> tuple[str, float, str]:
    """('pass' | 'fail' | 'timeout', seconds, last lines)."""
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("EDGERT_ORT_PYTHON", None)
    t = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args], cwd=repo,
                           env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t, ""
    tail = [line for line in r.stdout.strip().splitlines() if line.strip()][-1:]
    return ("pass" if r.returncode == 0 else "fail"), time.time() - t, " ".join(tail)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--only", help="comma-separated substrings of mutant names")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each selection")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (a hang counts as caught)")
    a = ap.parse_args()
    mutants = [m for m in MUTANTS if not a.only or any(s.strip() in m.name for s in a.only.split(","))]
    if a.list:
        for m in mutants:
            print(f"{m.name}  [{m.path}{', rekey' if m.rekey else ''}]  -> pytest {' '.join(m.tests)}")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="edgert-mutants-"))
    repo = tmp / "repo"
    repo.mkdir()
    copy_repo(repo)
    probe = subprocess.run([sys.executable, "-c", "import edgert, edgert_export; print(edgert.__file__, edgert_export.__file__)"],
                           cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True)
    if probe.returncode or str(ROOT) in probe.stdout or str(repo) not in probe.stdout:
        print(f"the copy's packages are not the ones imported: {probe.stdout.strip()} {probe.stderr.strip()}")
        return 2
    bad = 0
    try:
        if not a.no_baseline:
            for args in dict.fromkeys(m.tests for m in mutants):
                status, secs, tail = pytest(repo, args, a.timeout)
                print(f"baseline  {status:7} {secs:6.1f}s  pytest {' '.join(args)}  {tail}", flush=True)
                if status != "pass":
                    print("the unmutated selection must pass first")
                    return 2
        results = []
        for m in mutants:
            path = repo / m.path
            text = path.read_text()
            count = text.count(m.original)
            if count != 1:
                status, secs, tail = ("not found" if count == 0 else f"found {count}x"), 0.0, "re-key this mutant"
            else:
                path.write_text(text.replace(m.original, m.replacement))
                try:
                    status, secs, tail = pytest(repo, m.tests, a.timeout)
                finally:
                    path.write_text(text)
                status = {"fail": "caught", "timeout": "caught (timeout)", "pass": "MISSED"}[status]
            ok = status.startswith("caught")
            bad += not ok
            results.append((m, status))
            print(f"{status:16} {secs:6.1f}s  {m.name}  [{m.path}{', rekey' if m.rekey else ''}]  {tail}", flush=True)
        caught = sum(s.startswith("caught") for _, s in results)
        print(f"\n{caught}/{len(results)} mutants caught" + (f"; {bad} not caught or not found" if bad else ""))
    finally:
        if a.keep:
            print(f"copy kept in {repo}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
