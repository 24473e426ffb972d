"""Per-step time of the model runner at tensor_parallel 1, 2, 4 (one prefill, batched decodes).

    python benchmarks/bench_tp.py --tp 1 2 4 --out benchmarks/results/tp_cpu.json

On CPU the devices are forced host devices (XLA_FLAGS=--xla_force_host_platform_device_count,
set here before JAX starts) that share the machine's cores: the numbers show that sharded steps
compile and run, and what the collectives cost in overhead, not a speed-up. On a machine with
several accelerators the same command measures real tensor parallelism. Each configuration's
sampled tokens are checked against tensor_parallel 1 (greedy, float32).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=4").strip()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import jax  # noqa: E402
from common import environment, write_json  # noqa: E402
from model_step import make_runner, make_step, program, time_step  # noqa: E402

from pensieve_jax.model.config import ModelConfig  # noqa: E402
from pensieve_jax.runner.model_runner import ModelRunner  # noqa: E402
from pensieve_jax.tokenizer import Tokenizer  # noqa: E402
from pensieve_jax.weights import LoadedModel, load_model, random_params  # noqa: E402

# CPU-sized, random weights, heads split by 1, 2, 4 and 8 (random:tiny has only 2 KV heads)
BENCH = ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=4,
                    num_heads=8, num_kv_heads=8, head_dim=64, max_position_embeddings=4096,
                    name="random:tp-bench")
NOTE = ("CPU numbers are not meaningful for speed: the 'devices' are forced host devices "
        "(--xla_force_host_platform_device_count) sharing the same few cores (and, here, a "
        "machine shared with other jobs), so differences between tensor_parallel values reflect "
        "how XLA spreads fake devices over threads, not tensor-parallel scaling. They show that "
        "the sharded step compiles, runs and gives the same tokens as one device; measure "
        "speed-ups on a machine with several accelerators.")


def collectives(runner: ModelRunner) -> dict[str, int]:
    """Collective ops in the step programs the runner ran (a scan body's ops count once)."""
    ops = Counter()
    for exe in runner.compiler.compiled.values():
        ops.update(re.findall(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|"
                              r"collective-permute)(?:-start)?\(", exe.as_text()))
    return dict(ops)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="bench",
                    help="'bench' (a CPU-sized random model, 8 heads) or any load_model source")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attention", default="xla")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--decode-batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    if args.model == "bench":
        model = LoadedModel(BENCH, random_params(BENCH, args.dtype),
                            Tokenizer.byte_level(BENCH.vocab_size), BENCH.name)
    else:
        model = load_model(args.model, args.dtype)
    vocab = model.config.vocab_size
    steps = [("prefill", make_step(1, args.prefill, args.prefill, args.page_size, vocab))] + [
        ("decode", make_step(b, 1, args.context, args.page_size, vocab)) for b in args.decode_batch]

    rows, reference, ops = [], {}, {}
    for tp in args.tp:
        runner = make_runner(model, args, [s for _, s in steps], tensor_parallel=tp)
        for i, (kind, step) in enumerate(steps):
            seconds = time_step(runner, step, args.iters)
            tokens = runner.step(step).tolist()
            reference.setdefault(i, tokens)
            num_tokens = len(step.token_ids)
            rows.append({"tensor_parallel": tp, "kind": kind, "seqs": len(step.kv_lens),
                         "tokens": num_tokens, "context": int(step.kv_lens[0]),
                         "program": program(runner, step),
                         "seconds": seconds, "tokens_per_s": num_tokens / seconds,
                         "same_tokens_as_tp1": tokens == reference[i]})
        ops[tp] = collectives(runner)
        for r in rows[-len(steps):]:
            print(f"tp={tp} {r['kind']:8s} seqs={r['seqs']:3d} tokens={r['tokens']:5d} "
                  f"{r['seconds'] * 1e3:9.2f} ms  {r['tokens_per_s']:9.1f} tok/s  "
                  f"same={r['same_tokens_as_tp1']}", flush=True)
        print(f"tp={tp} collectives in compiled steps: {ops[tp]}", flush=True)

    result = {**environment(argv, __file__),
              "note": NOTE if jax.devices()[0].platform == "cpu" else "",
              "model": model.source, "config": model.config.to_dict(), "dtype": args.dtype,
              "attention": args.attention, "iters": args.iters,
              "statistic": "median seconds per step", "rows": rows,
              "collectives_in_compiled_steps": ops}
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
