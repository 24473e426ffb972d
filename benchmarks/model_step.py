"""Time the model runner's steps: one prefill and batched decodes over a paged KV cache.

    python benchmarks/model_step.py --model smollm2-135m-instruct --prefill 512 \
        --decode-batch 1 8 32 --context 512 --out benchmarks/results/model_step_cpu.json

The runner's program set is sized to the runs (max_num_seqs: the largest decode batch,
max_batched_tokens: the largest step, max_model_len: the longest context); each step runs the
program of its token bucket (runner.ProgramSet: min(bucket, max_num_seqs) sequences, the pages
of max_model_len), which is compiled on its first run, then timed over --iters runs (median
reported; the program's shape is in each row).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import numpy as np

from common import environment, write_json
from pensieve_jax.runner.model_runner import ModelRunner
from pensieve_jax.runner.step_program import StepInput
from pensieve_jax.weights import load_model


def make_step(num_seqs: int, q_len: int, context: int, page_size: int, vocab: int) -> StepInput:
    pages = math.ceil(context / page_size)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, num_seqs * q_len).astype(np.int32)
    positions = np.tile(np.arange(context - q_len, context, dtype=np.int32), num_seqs)
    table = np.arange(num_seqs * pages, dtype=np.int32).reshape(num_seqs, pages)
    ones = np.ones(num_seqs)
    return StepInput(tokens, positions, table, np.full(num_seqs, context, np.int32),
                     np.arange(0, (num_seqs + 1) * q_len, q_len, dtype=np.int32),
                     0 * ones.astype(np.float32), 0 * ones.astype(np.int32),
                     ones.astype(np.float32), ones.astype(np.uint32), 0 * ones.astype(np.int32))


def make_runner(model, args, steps: list[StepInput], **kw) -> ModelRunner:
    """A runner whose program set fits exactly these steps (pages enough for all of them)."""
    num_pages = max(s.page_table.size for s in steps)
    return ModelRunner(model, num_pages, args.page_size, args.attention, args.dtype,
                       max_num_seqs=max(len(s.kv_lens) for s in steps),
                       max_batched_tokens=max(len(s.token_ids) for s in steps),
                       max_model_len=max(int(s.kv_lens.max()) for s in steps), **kw)


def program(runner: ModelRunner, step: StepInput) -> dict:
    """The shape of the program runner.step runs for this step."""
    return dataclasses.asdict(runner.programs.shape_for(len(step.token_ids)))


def time_step(runner: ModelRunner, step: StepInput, iters: int) -> float:
    runner.step(step)                                   # compile + warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        runner.step(step)                               # returns host tokens: synchronizes
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attention", default="xla")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    model = load_model(args.model, args.dtype)
    vocab = model.config.vocab_size
    steps = [("prefill", make_step(1, args.prefill, args.prefill, args.page_size, vocab))] + [
        ("decode", make_step(b, 1, args.context, args.page_size, vocab)) for b in args.decode_batch]
    runner = make_runner(model, args, [s for _, s in steps])
    rows = []
    for kind, step in steps:
        t = time_step(runner, step, args.iters)
        n = len(step.token_ids)
        rows.append({"kind": kind, "seqs": len(step.kv_lens), "tokens": n,
                     "context": int(step.kv_lens[0]), "program": program(runner, step),
                     "seconds": t, "tokens_per_s": n / t})
    for r in rows:
        print(f"{r['kind']:8s} seqs={r['seqs']:3d} tokens={r['tokens']:5d} ctx={r['context']:5d} "
              f"(program {r['program']['tokens']} x {r['program']['seqs']}) "
              f"{r['seconds'] * 1e3:9.2f} ms  {r['tokens_per_s']:9.1f} tok/s")
    result = {**environment(argv, __file__), "model": model.source, "dtype": args.dtype,
              "attention": args.attention, "rows": rows}
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
