"""How much of a swap-in's copy one step's compute hides, for both swap-in paths.

    python benchmarks/bench_swap_overlap.py --preset llama3-8b --dtype bfloat16 \
        --out benchmarks/results/bench_swap_overlap_<device>.json

A ModelRunner with random weights of the preset's shape (--layers to shorten it) runs a step of
--seqs sequences, each with --context cached tokens and --new new tokens (1: decode). For n pages
per swap-in it times, each the median of --repeats runs:

    step_s       the step alone
    copy_s       the n pages host -> device alone (NumPy -> device + scatter into the pools)
    layered_s    the step loading the n pages layer by layer inside it (swap_in="layered": each
                 layer's copy from pinned host memory runs while the layer before computes;
                 the step program loads at most runner.INCOMING_PAGES pages, the rest is
                 written just before the step, as in the engine)
    next_step_s  stage the n pages (asynchronous device_put, in chunks of runner.PAGE_CHUNK
                 pages), run the step, then scatter them (swap_in="next_step": the copy
                 overlaps the step, its turn runs next step)

    hidden = 1 - (path_s - step_s) / copy_s, clipped to [0, 1]

is the fraction of the copy's time the step covered. On the CPU backend these are not copies
between memories (device_put can alias host memory) and the numbers mean nothing: the script is
there for a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from common import environment, median_s, write_json
from pensieve_jax.model.config import PRESETS
from pensieve_jax.runner.model_runner import ModelRunner
from pensieve_jax.runner.page_programs import PAGE_CHUNK
from pensieve_jax.runner.step_program import HostPages, StepInput
from pensieve_jax.tokenizer import Tokenizer
from pensieve_jax.weights import LoadedModel, random_params


def step_input(seqs: int, context: int, new: int, page_size: int, vocab: int) -> StepInput:
    per_seq = -(-(context + new) // page_size)
    rng = np.random.default_rng(0)
    table = np.arange(seqs * per_seq, dtype=np.int32).reshape(seqs, per_seq)
    return StepInput(
        token_ids=rng.integers(0, vocab, seqs * new).astype(np.int32),
        positions=np.tile(np.arange(context, context + new), seqs).astype(np.int32),
        page_table=table, kv_lens=np.full(seqs, context + new, np.int32),
        cu_q_lens=(np.arange(seqs + 1) * new).astype(np.int32),
        temperature=np.zeros(seqs, np.float32), top_k=np.zeros(seqs, np.int32),
        top_p=np.ones(seqs, np.float32), seeds=np.zeros(seqs, np.uint32),
        counters=np.zeros(seqs, np.int32))


def hidden(path_s: float, step_s: float, copy_s: float) -> float:
    return round(min(1.0, max(0.0, 1 - (path_s - step_s) / copy_s)), 3)


def measure(runner: ModelRunner, s: StepInput, first_free: int, batches: list[int],
            repeats: int) -> list[dict]:
    c, ps = runner.config, runner.page_size
    rows = []
    step_s = median_s(lambda: runner.step(s), repeats)
    for n in batches:
        rng = np.random.default_rng(n)
        shape = (c.num_layers, n, ps, c.num_kv_heads, c.head_dim)
        k, v = (rng.standard_normal(shape, np.float32).astype(runner.dtype) for _ in range(2))
        ids = list(range(first_free, first_free + n))       # pages the step does not read

        def copy():
            runner.scatter_pages(k, v, ids)
            jax.block_until_ready(runner.kv)

        def next_step():
            staged = runner.stage_pages(k, v)
            runner.step(s)                                   # returns the sampled tokens
            runner.scatter_staged(staged, ids)
            jax.block_until_ready(runner.kv)

        row = {"pages": n, "bytes": 2 * k.nbytes, "step_s": step_s,
               "copy_s": median_s(copy, repeats),
               "layered_s": median_s(lambda: runner.step(s, HostPages(k, v, ids)), repeats),
               "next_step_s": median_s(next_step, repeats)}
        row["copy_GBps"] = round(row["bytes"] / row["copy_s"] / 1e9, 3)
        for path in ("layered", "next_step"):
            row[f"{path}_hidden"] = hidden(row[f"{path}_s"], step_s, row["copy_s"])
        rows.append(row)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", type=int, help="override the preset's layer count (small runs)")
    ap.add_argument("--attention", default="xla", choices=["xla", "pallas"])
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new", type=int, default=1, help="new tokens per sequence (1: decode)")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    config = PRESETS[args.preset]
    if args.layers:
        config = dataclasses.replace(config, num_layers=args.layers)
    dtype = jnp.dtype(args.dtype)
    model = LoadedModel(config, random_params(config, dtype), Tokenizer.byte_level(
        config.vocab_size), f"random:{args.preset}")
    s = step_input(args.seqs, args.context, args.new, args.page_size, config.vocab_size)
    used = s.page_table.size
    # programs for this step only; layered_loads: the step programs that load pages inside
    runner = ModelRunner(model, used + max(args.batches), args.page_size, args.attention, dtype,
                         max_num_seqs=args.seqs, max_batched_tokens=len(s.token_ids),
                         max_model_len=args.context + args.new, layered_loads=True)
    rows = measure(runner, s, used, args.batches, args.repeats)
    result = {**environment(argv, __file__), "preset": args.preset, "layers": config.num_layers,
              "dtype": args.dtype, "attention": args.attention, "page_size": args.page_size,
              "seqs": args.seqs, "context": args.context, "new": args.new,
              "page_chunk": PAGE_CHUNK, "incoming_pages": runner.programs.incoming_pages,
              "in_step_load_error": runner.in_step_load_error, "rows": rows}
    print(f"{result['device']} ({result['backend']}): {args.seqs} x ({args.context} + "
          f"{args.new}) tokens, step {rows[0]['step_s'] * 1e3:.2f} ms")
    for r in rows:
        print(f"{r['pages']:4d} pages ({r['bytes'] / 2**20:.0f} MiB): copy {r['copy_s'] * 1e3:7.2f} ms"
              f" ({r['copy_GBps']:.1f} GB/s)  layered {r['layered_s'] * 1e3:7.2f} ms (hidden "
              f"{r['layered_hidden']:.2f})  next_step {r['next_step_s'] * 1e3:7.2f} ms (hidden "
              f"{r['next_step_hidden']:.2f})")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
