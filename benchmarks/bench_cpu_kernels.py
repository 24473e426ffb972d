"""The runner's steps with the CPU kernels (cpu_kernels/) on and off, side by side.

    python benchmarks/bench_cpu_kernels.py --out benchmarks/results/bench_cpu_kernels_cpu.json

Two runners in one process over the same model, one with ModelRunner(cpu_kernels=False)
(plain XLA attention), each with the program set of these steps compiled first; the steps
(decodes at batch B over C cached keys each, and a prefill) are timed alternately, --rounds
rounds of --iters steps per system, medians and minima reported, with the ratio off / on and
the machine's load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import environment, write_json
from model_step import make_runner, make_step
from pensieve_jax.weights import load_model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--decodes", nargs="+", default=["1x512", "1x1024", "4x512", "8x700"],
                    help="BATCHxCONTEXT decode steps")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    args.attention, args.dtype = "xla", "float32"

    model = load_model(args.model, "float32")
    vocab = model.config.vocab_size
    steps = {f"decode {d}": make_step(int(d.split("x")[0]), 1, int(d.split("x")[1]),
                                      args.page_size, vocab) for d in args.decodes}
    steps[f"prefill {args.prefill}"] = make_step(1, args.prefill, args.prefill, args.page_size,
                                                 vocab)
    runners = {}
    for name, on in (("on", True), ("off", False)):
        runner = make_runner(model, args, list(steps.values()), cpu_kernels=on)
        for step in steps.values():
            runner.step(step)
        runners[name] = runner
    times = {(s, n): [] for s in steps for n in runners}
    load = []
    for _ in range(args.rounds):
        load.append(os.getloadavg()[0])
        for s, step in steps.items():
            for n, runner in runners.items():
                for _ in range(args.iters):
                    start = time.perf_counter()
                    runner.step(step)
                    times[s, n].append(time.perf_counter() - start)
    rows = []
    for s in steps:
        on, off = times[s, "on"], times[s, "off"]
        row = {"step": s, "on_ms": 1e3 * statistics.median(on),
               "off_ms": 1e3 * statistics.median(off), "on_min_ms": 1e3 * min(on),
               "off_min_ms": 1e3 * min(off),
               "speedup": statistics.median(off) / statistics.median(on)}
        rows.append(row)
        print(f"{s:16s} on {row['on_ms']:7.2f} ms  off {row['off_ms']:7.2f} ms  (min "
              f"{row['on_min_ms']:.2f} / {row['off_min_ms']:.2f})  off/on {row['speedup']:.2f}x")
    result = {**environment(argv, __file__), "model": model.source,
              "cpu_kernels": {n: r.cpu_kernels for n, r in runners.items()},
              "load_1min": load, "rows": rows}
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
