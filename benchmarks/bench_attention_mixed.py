"""Model-runner step times with the XLA attention path's work list against the legacy dense
layout, side by side in one process: a mixed step (one prefill chunk + decodes; and the same cut
to fit a 512-token budget: a 497-token chunk + 15 decodes), decode-only and prefill-only steps,
and a multi-turn-like mix (a few short new turns over history + decodes).

    python benchmarks/bench_attention_mixed.py --model random:smollm2-135m \
        --out benchmarks/results/attention_mixed_cpu.json

"after" is the package's "xla" backend (`xla_paged_attention`): a dynamic work list of (query
rows, key block) items, so a step costs about its real rows times the keys each row needs.
"before" is the legacy layout (kept here only as a reference, registered as the "xla_legacy"
backend): queries laid out [num_seqs, max_q_len] over every page of the page table, with
max_q_len 1 for a decode-only step and the step's token count otherwise (chosen at run time by
a lax.cond, as the old runner chose its program), so a mixed step computes num_seqs x
num_tokens query rows x the table width in keys. Both run through the runner's fixed programs
(runner.ProgramSet: the step pads to its token bucket, min(bucket, max_num_seqs) sequences and
ceil(max_model_len / page_size) pages; max_model_len here is the steps' longest context, so
the table is no wider than the widest step needs; the legacy layout computes the padding
sequences too, where the old runner padded sequences only to a power of two). Both runners
start from the same random KV pool and run the same steps; every timed iteration runs before
and after back to back (median reported; at least --iters iterations and --min-seconds per
backend, at most 50). Also checked: sampled greedy tokens identical per step, the float32
logits' largest difference, and (--engine-check) greedy tokens of a whole engine run with
chunked prefills mixed into decodes (engines compiling lazily: the check compares tokens).
`score_pairs_*` counts the (query row, key) score pairs each layout computes per head (the
work list's from its item sizes, whole loop iterations included).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common import environment, write_json
from pensieve_jax.model import attention
from pensieve_jax.model.attention import AttentionBatch, KVCache
from pensieve_jax.runner.model_runner import ModelRunner
from pensieve_jax.runner.step_program import StepInput
from pensieve_jax.weights import load_model


def _legacy_layout(q: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch,
                   sm_scale: float, max_q_len: int) -> jax.Array:
    """The XLA path before query tiling (verbatim)."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, pages_per_seq = batch.page_table.shape
    _, _, page_size, num_kv_heads, _ = kv.k.shape
    group = num_heads // num_kv_heads
    ctx = pages_per_seq * page_size

    q_lens = batch.cu_q_lens[1:] - batch.cu_q_lens[:-1]                       # [S]
    j = jnp.arange(max_q_len, dtype=jnp.int32)
    rows = jnp.clip(batch.cu_q_lens[:-1, None] + j[None, :], 0, num_tokens - 1)  # [S, Qm]
    qs = q[rows].reshape(num_seqs, max_q_len, num_kv_heads, group, head_dim)

    k = kv.k[layer][batch.page_table].reshape(num_seqs, ctx, num_kv_heads, head_dim)
    v = kv.v[layer][batch.page_table].reshape(num_seqs, ctx, num_kv_heads, head_dim)

    scores = jnp.einsum("sqkgd,sckd->skgqc", qs, k, preferred_element_type=jnp.float32)
    scores = scores * sm_scale
    q_pos = (batch.kv_lens - q_lens)[:, None] + j[None, :]                     # [S, Qm]
    k_pos = jnp.arange(ctx, dtype=jnp.int32)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (
        k_pos[None, None, :] < batch.kv_lens[:, None, None])                  # [S, Qm, C]
    mask = mask[:, None, None]                                                # [S, 1, 1, Qm, C]
    scores = jnp.where(mask, scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask, probs, 0.0)
    out = jnp.einsum("skgqc,sckd->sqkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    out = out.reshape(num_seqs, max_q_len, num_heads, head_dim)

    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(batch.cu_q_lens[1:], t, side="right"), num_seqs - 1)
    row_in_seq = jnp.clip(t - batch.cu_q_lens[seq], 0, max_q_len - 1)
    out_t = out[seq, row_in_seq]
    valid = (t < batch.cu_q_lens[-1])[:, None, None]
    return jnp.where(valid, out_t, 0.0).astype(q.dtype)


def legacy_xla_paged_attention(q: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch,
                               *, sm_scale: float, mesh: Any = None) -> jax.Array:
    """The legacy layout in one program: max_q_len 1 for a decode-only step, else the step's
    token count (the old runner compiled a program for each)."""
    del mesh
    batch = AttentionBatch(*(jnp.asarray(a, jnp.int32) for a in batch))
    q_lens = batch.cu_q_lens[1:] - batch.cu_q_lens[:-1]
    return jax.lax.cond(jnp.max(q_lens) <= 1,
                        lambda: _legacy_layout(q, kv, layer, batch, sm_scale, 1),
                        lambda: _legacy_layout(q, kv, layer, batch, sm_scale, q.shape[0]))


attention.ATTENTION_BACKENDS.setdefault("xla_legacy", legacy_xla_paged_attention)
BACKENDS = {"before": "xla_legacy", "after": "xla"}     # legacy dense layout, work list


def make_step(seqs: list[tuple[int, int]], page_size: int, vocab: int, seed: int) -> StepInput:
    """seqs: (history tokens, new tokens) per sequence; sequence i owns pages i*P.. (P: pages
    of the longest), greedy sampling."""
    rng = np.random.default_rng(seed)
    width = max(math.ceil((h + n) / page_size) for h, n in seqs)
    tokens = np.concatenate([rng.integers(0, vocab, n) for _, n in seqs]).astype(np.int32)
    positions = np.concatenate([np.arange(h, h + n) for h, n in seqs]).astype(np.int32)
    table = np.zeros((len(seqs), width), np.int32)
    for i, (h, n) in enumerate(seqs):
        pages = math.ceil((h + n) / page_size)
        table[i, :pages] = np.arange(i * width, i * width + pages)
    k = len(seqs)
    return StepInput(tokens, positions, table, np.asarray([h + n for h, n in seqs], np.int32),
                     np.concatenate([[0], np.cumsum([n for _, n in seqs])]).astype(np.int32),
                     np.zeros(k, np.float32), np.zeros(k, np.int32), np.ones(k, np.float32),
                     np.zeros(k, np.uint32), np.zeros(k, np.int32))


def steps(args) -> dict[str, list[tuple[int, int]]]:
    c, p, d = args.context, args.prefill, args.decodes
    mt = [38, 45, 30, 41]                                   # ~ShareGPT-sized new turns
    return {
        "mixed": [(0, p)] + [(c - 1, 1)] * d,               # a prompt's chunk + decodes
        "mixed_in_budget": [(0, p - d)] + [(c - 1, 1)] * d,  # the same within p tokens
        "decode": [(c - 1, 1)] * (d + 1),
        "prefill": [(0, p)],
        "multiturn_mix": [(c - n, n) for n in mt] + [(c - 1, 1)] * (d + 1 - len(mt)),
    }


def logits_fn(runner: ModelRunner, s: StepInput):
    """The runner's model on one step (padded to the program runner.step runs), logits of
    every real row; the KV pool is not donated."""
    shape = runner.programs.shape_for(len(s.token_ids))
    t, n, p = shape.tokens, shape.seqs, shape.pages_per_seq
    cu = np.concatenate([s.cu_q_lens, np.full(n - len(s.kv_lens), s.cu_q_lens[-1])])

    def pad(a, shape):
        out = np.zeros(shape, a.dtype)
        out[tuple(slice(0, k) for k in a.shape)] = a
        return out
    batch = AttentionBatch(pad(s.page_table, (n, p)), pad(s.kv_lens, (n,)), cu.astype(np.int32))
    rows = np.arange(len(s.token_ids), dtype=np.int32)
    with jax.default_matmul_precision("highest"):
        logits, _ = jax.jit(runner.model.apply)(
            runner.params, pad(s.token_ids, (t,)), pad(s.positions, (t,)), runner.kv, batch, rows)
    return np.asarray(logits)


def score_pairs(s: StepInput, runner: ModelRunner) -> dict[str, int]:
    """(query row, key) score pairs per head each layout computes for step s in its program:
    before, program sequences x (1 or the token bucket) rows x the table's keys; after, the
    work list's items (attention.LAST_ROWS_KEYS / TILE_ROWS x TILE_KEYS, whole pages, whole
    loop iterations of 8 / 16 items), as xla_paged_attention builds them."""
    shape = runner.programs.shape_for(len(s.token_ids))
    page = runner.page_size
    q_lens, kv_lens = np.diff(s.cu_q_lens), s.kv_lens
    before = shape.seqs * (1 if q_lens.max() <= 1 else shape.tokens) * (
        shape.pages_per_seq * page)

    def block(keys: int) -> int:
        return max(1, keys // page) * page
    last_keys, tile_keys = block(attention.LAST_ROWS_KEYS), block(attention.TILE_KEYS)
    items = sum(-(-int(k) // last_keys) for q, k in zip(q_lens, kv_lens) if q > 0)
    after = -(-items // 8) * 8 * last_keys                     # one row per item
    # prefill rows (all but each sequence's last) in token order, TILE_ROWS to a tile; one
    # (tile, sequence) pair per sequence a tile holds rows of, blocks up to its last row
    last_pos: dict[tuple[int, int], int] = {}
    for i, (q, k) in enumerate(zip(q_lens, kv_lens)):
        for r in range(int(q) - 1):
            tile = (int(s.cu_q_lens[i]) + r) // attention.TILE_ROWS
            last_pos[tile, i] = int(k) - int(q) + r
    items = sum(pos // tile_keys + 1 for pos in last_pos.values())
    after += -(-items // 16) * 16 * attention.TILE_ROWS * tile_keys
    return {"before": int(before), "after": int(after)}


def engine_check(args) -> dict:
    """Greedy tokens of a whole engine run (chunked prompts mixed with decodes) per backend."""
    from pensieve_jax.engine.engine import Engine
    from pensieve_jax.engine.sampling import SamplingParams
    out = {}
    for name, backend in BACKENDS.items():
        engine = Engine.from_pretrained(args.model, args.dtype, attention=backend,
                                        max_batched_tokens=args.engine_budget, max_num_seqs=8,
                                        page_size=args.page_size, max_model_len=1024,
                                        precompile=False)   # tokens are compared, not times
        prompts = [list(map(int, np.random.default_rng(7 + i).integers(
            0, engine.model.config.vocab_size, n))) for i, n in enumerate(args.engine_prompts)]
        start = time.perf_counter()
        tokens = engine.generate(prompts, SamplingParams(max_tokens=args.engine_max_tokens,
                                                         ignore_eos=True))
        stats = engine.stats()
        out[name] = {"tokens": tokens, "seconds": time.perf_counter() - start,
                     "steps": stats["steps"], "compilations": stats["compilations"]}
        engine.shutdown()
    return {"prompt_lens": args.engine_prompts, "max_tokens": args.engine_max_tokens,
            "max_batched_tokens": args.engine_budget,
            "tokens_identical": out["before"]["tokens"] == out["after"]["tokens"],
            "seconds": {k: v["seconds"] for k, v in out.items()},
            "steps": {k: v["steps"] for k, v in out.items()},
            "compilations": {k: v["compilations"] for k, v in out.items()}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="random:smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=512, help="tokens of the prefill chunk")
    ap.add_argument("--decodes", type=int, default=15, help="decodes next to it")
    ap.add_argument("--context", type=int, default=512, help="context of each decode")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=10.0)
    ap.add_argument("--kinds", nargs="+", default=["mixed", "mixed_in_budget", "decode", "prefill",
                                                   "multiturn_mix"])
    ap.add_argument("--engine-check", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--engine-prompts", type=int, nargs="+", default=[300, 90, 40, 20])
    ap.add_argument("--engine-max-tokens", type=int, default=12)
    ap.add_argument("--engine-budget", type=int, default=128)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()

    model = load_model(args.model, args.dtype)
    c = model.config
    width = math.ceil((max(args.context, args.prefill) + 1) / args.page_size)
    num_pages = (args.decodes + 1) * width + 1
    kinds = {kind: make_step(steps(args)[kind], args.page_size, c.vocab_size, seed=1)
             for kind in args.kinds}
    # the runners' program sets: every step fits, the table is the widest step's
    programs = dict(max_num_seqs=max(len(s.kv_lens) for s in kinds.values()),
                    max_batched_tokens=max(len(s.token_ids) for s in kinds.values()),
                    max_model_len=width * args.page_size)
    runners = {name: ModelRunner(model, num_pages, args.page_size, backend, args.dtype,
                                 **programs)
               for name, backend in BACKENDS.items()}
    pool = np.random.default_rng(0).standard_normal(
        (c.num_layers, num_pages, args.page_size, c.num_kv_heads, c.head_dim)).astype(args.dtype)
    rows = []
    for kind, s in kinds.items():
        seqs = steps(args)[kind]
        q_lens = np.diff(s.cu_q_lens)
        times: dict[str, list[float]] = {name: [] for name in runners}
        tokens, compile_s, logits = {}, {}, {}
        for name, r in runners.items():
            r.kv = jax.device_put(KVCache(pool, pool))
            start = time.perf_counter()
            tokens[name] = r.step(s)                         # compile + first run
            compile_s[name] = time.perf_counter() - start
        i = 0
        while i < args.iters or (i < 50 and min(map(sum, times.values())) < args.min_seconds):
            i += 1
            for name, r in runners.items():
                start = time.perf_counter()
                r.step(s)                                    # returns host tokens: synchronizes
                times[name].append(time.perf_counter() - start)
        for name, r in runners.items():
            r.kv = jax.device_put(KVCache(pool, pool))
            logits[name] = logits_fn(r, s)
        ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
        shape = runners["after"].programs.shape_for(len(s.token_ids))
        pairs = score_pairs(s, runners["after"])
        row = {"kind": kind, "seqs": len(seqs), "tokens": int(len(s.token_ids)),
               "q_lens": sorted({int(x) for x in q_lens}),
               "context": int(s.kv_lens.max()), "program": dataclasses.asdict(shape),
               "score_pairs_before": pairs["before"], "score_pairs_after": pairs["after"],
               "iters": i, "ms_before": ms["before"], "ms_after": ms["after"],
               "speedup": ms["before"] / ms["after"],
               "ms_all": {k: [x * 1e3 for x in v] for k, v in times.items()},
               "first_call_s": compile_s,
               "tokens_identical": bool(np.array_equal(tokens["before"], tokens["after"])),
               "max_abs_logit_diff": float(np.abs(logits["before"] - logits["after"]).max()),
               "max_abs_logit": float(np.abs(logits["before"]).max())}
        rows.append(row)
        print(f"{kind:16s} seqs={row['seqs']:3d} tokens={row['tokens']:5d} "
              f"before {ms['before']:9.1f} ms  after {ms['after']:8.1f} ms  "
              f"x{row['speedup']:6.2f}  tokens equal {row['tokens_identical']}  "
              f"max|dlogit| {row['max_abs_logit_diff']:.2e}", flush=True)
    result = {**environment(argv, __file__), "model": model.source, "dtype": args.dtype,
              "page_size": args.page_size, "programs": programs,
              "work_items": {"last_rows_keys": attention.LAST_ROWS_KEYS,
                             "tile_rows": attention.TILE_ROWS, "tile_keys": attention.TILE_KEYS},
              "loadavg_1_5_15min": {"start": load_before, "end": os.getloadavg()}, "rows": rows}
    if args.engine_check:
        result["engine_check"] = engine_check(args)
        print("engine check:", {k: v for k, v in result["engine_check"].items()}, flush=True)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
