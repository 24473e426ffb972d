"""The step programs an engine configuration compiles before it is ready, without loading weights.

    python benchmarks/program_set.py --model random:llama3-8b --dtype bfloat16 --attention pallas
    python benchmarks/program_set.py --model random:smollm2-135m --lower   # also trace each one

Prints the program set (`runner.ProgramSet`: one step program per token bucket, sequences and
pages per sequence fixed per bucket, plus layered-load variants) for a `random:` preset and
engine options, and writes it as JSON. --lower traces and lowers every step program on this
machine's default backend with abstract parameters (no weights in memory, a pool of --pages
pages): a check that each program is well-formed, and what tracing costs. Compiling them for a
GPU is the GPU check's job (benchmarks/gpu_check.py, issue 17); on a CPU host the Pallas
attention lowers to its interpreter, not the kernel.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax.numpy as jnp  # noqa: E402

from benchmarks.common import environment, write_json  # noqa: E402
from pensieve_jax.model.config import PRESETS  # noqa: E402
from pensieve_jax.engine.config import EngineConfig  # noqa: E402
from pensieve_jax.model.llama import param_shapes  # noqa: E402
from pensieve_jax.runner.model_runner import ModelRunner  # noqa: E402
from pensieve_jax.runner.programs import ProgramSet, token_buckets  # noqa: E402
from pensieve_jax.weights import LoadedModel  # noqa: E402


def program_set(config, engine: EngineConfig) -> ProgramSet:
    """The set an Engine with these options builds (as Engine.__init__ sizes it)."""
    max_model_len = engine.max_model_len or min(config.max_position_embeddings, 4096)
    return ProgramSet(engine.token_buckets or token_buckets(engine.max_batched_tokens),
                      engine.max_num_seqs, -(-max_model_len // engine.page_size),
                      64 if engine.swap_in == "layered" and engine.host_cache_bytes else 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:llama3-8b", help="a random:<preset>")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention", default="pallas", choices=["xla", "pallas"])
    p.add_argument("--max-batched-tokens", type=int, default=EngineConfig.max_batched_tokens)
    p.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--page-size", type=int, default=EngineConfig.page_size)
    p.add_argument("--layered", action="store_true", help="swap_in=layered with a host tier")
    p.add_argument("--lower", action="store_true", help="trace and lower every step program")
    p.add_argument("--pages", type=int, default=64, help="KV pool pages for --lower")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    preset = args.model.removeprefix("random:")
    config = PRESETS[preset]
    engine = EngineConfig(max_batched_tokens=args.max_batched_tokens,
                          max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          page_size=args.page_size, attention=args.attention,
                          swap_in="layered" if args.layered else "next_step",
                          host_cache_bytes=1 if args.layered else 0)
    programs = program_set(config, engine)
    rows = [dataclasses.asdict(s) for s in programs.shapes]
    print(f"{args.model} {args.dtype} attention={args.attention}: {len(rows)} step programs "
          f"(+3 page programs of 32 pages)")
    print(f"{'tokens':>7} {'seqs':>5} {'pages/seq':>9} {'incoming':>8}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['seqs']:>5} {r['pages_per_seq']:>9} {r['incoming_pages']:>8}")

    if args.lower:
        dtype = jnp.dtype(args.dtype)
        model = LoadedModel(config, param_shapes(config, dtype), None, args.model)
        runner = ModelRunner(model, args.pages, args.page_size, args.attention, dtype,
                             max_num_seqs=args.max_num_seqs,
                             max_batched_tokens=args.max_batched_tokens,
                             max_model_len=programs.pages_per_seq * args.page_size,
                             token_ladder=programs.token_buckets,
                             layered_loads=bool(programs.incoming_pages))
        for row, shape in zip(rows, runner.programs.shapes):
            start = time.perf_counter()
            text = runner.compiler.lower(shape).as_text()
            row["lower_s"] = round(time.perf_counter() - start, 2)
            row["stablehlo_lines"] = text.count("\n")
            print(f"  lowered {shape.tokens:>4} tokens in {row['lower_s']:.2f} s "
                  f"({row['stablehlo_lines']} StableHLO lines)", flush=True)

    out = args.out or (f"benchmarks/results/program_set_{preset}_{args.dtype}_{args.attention}"
                       ".json")
    write_json(out, {**environment(), "model": args.model, "dtype": args.dtype, "attention": args.attention,
                        "engine": {k: v for k, v in dataclasses.asdict(engine).items()
                                   if k in ("max_batched_tokens", "max_num_seqs",
                                            "max_model_len", "page_size", "swap_in")},
                        "programs": rows, "count": len(rows)})


if __name__ == "__main__":
    main()
