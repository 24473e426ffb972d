"""The overlapped engine loop against the synchronous one, side by side in one run: how much of
the host's time per step (scheduling + postprocessing) the device step hides.

    python benchmarks/bench_overlap.py --out benchmarks/results/bench_overlap_cpu.json
    python benchmarks/bench_overlap.py --workloads tiny --rounds 5      # quick

Two engines over the same weights and the same compiled programs, `overlap=True` and
`overlap=False`, run the same closed-loop multi-turn workload in alternating rounds (fresh
conversations each round, the same token ids for both engines in a round; greedy tokens are
checked equal). Each engine's `stats()["loop"]` splits its time per step:

    plan_s   land swap-ins, schedule, build the step's inputs, start page copies   (host)
    run_s    synchronous: the step (dispatch + device + fetch); overlapped: the dispatch
    wait_s   overlapped: waiting for a step's tokens (the device still busy)
    post_s   postprocess (tokens, stop checks, detokenize for stop strings, stream) and booking

and the benchmark times `runner.dispatch` (padding the step's arrays, handing them and the
program to the device: host work too). In the synchronous loop the device is idle while the
host plans, dispatches and postprocesses, so plan + dispatch + post per step is the host time
measured alone, and run_s - dispatch per step the device step (the wait for its tokens).
Hidden host time per step = synchronous wall per step - overlapped wall per step; its fraction
of the host time is what the overlap hides (1.0: all of it; it can hide at most the device
step). Where the device step is much longer than the host's time (8b: seconds against a
millisecond or two) that difference drowns in the step's own noise; the direct measure is then
`busy_fetch_fraction`: the overlapped steps still running when the host, done planning the
next step and postprocessing the one before, fetched them (1.0: all host time hidden).

Workloads: `tiny` (random:tiny: the device step is short, the host's share large) and `8b`
(random:llama3-8b's shape, all dimensions but the layer count, `--layers`, 2 by default: a
32-layer float32 model is 32 GB, more than this 24 GB box holds; the host's work per step does
not depend on the layer count).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import numpy as np

from closed_loop import run_users
from common import environment, write_json
from pensieve_jax.model.config import PRESETS
from pensieve_jax.engine.engine import Engine, EngineConfig
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.tokenizer import Tokenizer
from pensieve_jax.weights import LoadedModel, load_model
from pensieve_jax.weights.assemble import random_params

WORKLOADS = {
    # engine options, conversations, turns, new tokens per turn, max tokens per turn
    "tiny": dict(model="random:tiny", engine=dict(max_model_len=512, page_size=16,
                                                  max_batched_tokens=64, max_num_seqs=8),
                 conversations=8, turns=3, new_tokens=40, max_tokens=64),
    "8b": dict(model="llama3-8b", engine=dict(max_model_len=256, page_size=16,
                                              max_batched_tokens=32, max_num_seqs=4,
                                              token_buckets=(8, 32)),
               conversations=4, turns=2, new_tokens=24, max_tokens=8),
}


def make_model(spec: str, layers: int, dtype: str) -> LoadedModel:
    if spec.startswith("random:"):
        return load_model(spec, dtype)
    config = dataclasses.replace(PRESETS[spec], num_layers=layers,
                                 name=f"random:{spec} ({layers} layers)")
    return LoadedModel(config, random_params(config, dtype), Tokenizer.byte_level(
        config.vocab_size), config.name)


def run_round(engine: Engine, w: dict, vocab: int, seed: int, tag: str) -> dict:
    """One pass of the workload: w["conversations"] closed-loop users at once."""
    rng = np.random.default_rng(seed)
    turns = [[[int(t) for t in rng.integers(1, min(vocab, 256), w["new_tokens"])]
              for _ in range(w["turns"])] for _ in range(w["conversations"])]
    # greedy; stop strings that never match make every token go through detokenization
    params = SamplingParams(max_tokens=w["max_tokens"], ignore_eos=True, stop=("\x00\x01",))
    outputs: dict = {}

    def user(i: int) -> None:
        seq, outs = [], []
        for new in turns[i]:
            seq = seq + new
            out = engine.submit(seq, params, conversation_id=f"{tag}-{i}").result()
            outs.append(tuple(out.token_ids))
            seq = seq + list(out.token_ids)
        outputs[i] = outs

    before = engine.call(lambda: dict(engine.loop, dispatch_s=engine.runner.dispatch_s))
    wall = run_users(user, w["conversations"])
    after = engine.call(lambda: dict(engine.loop, dispatch_s=engine.runner.dispatch_s))
    for i in range(w["conversations"]):
        engine.end_conversation(f"{tag}-{i}")
    d = {k: after[k] - before[k] for k in ("steps", "plan_s", "run_s", "wait_s", "post_s",
                                          "drains", "dispatch_s", "busy_fetches")}
    steps = max(1, d["steps"])
    ms = {k: 1e3 * d[k] / steps for k in ("plan_s", "post_s", "run_s", "wait_s", "dispatch_s")}
    return {"wall_s": wall, "steps": d["steps"], "drains": d["drains"],
            # overlapped: steps the device was still running when the host, done with its
            # planning and postprocessing, fetched them (that host work was hidden)
            "busy_fetch_fraction": d["busy_fetches"] / steps,
            "wall_ms_per_step": 1e3 * wall / steps,
            "host_ms_per_step": ms["plan_s"] + ms["dispatch_s"] + ms["post_s"],
            "plan_ms_per_step": ms["plan_s"], "dispatch_ms_per_step": ms["dispatch_s"],
            "post_ms_per_step": ms["post_s"],
            # synchronous: the wait for the step's tokens; overlapped: wait_s is that
            "device_wait_ms_per_step": (ms["run_s"] - ms["dispatch_s"]) if ms["wait_s"] == 0
            else ms["wait_s"],
            "outputs": outputs}


def time_dispatch(engine: Engine) -> None:
    """Count the seconds engine.runner.dispatch takes (runner.step calls it too)."""
    runner = engine.runner
    inner = runner.dispatch
    runner.dispatch_s = 0.0

    def timed(*args, **kw):
        start = time.perf_counter()
        handle = inner(*args, **kw)
        runner.dispatch_s += time.perf_counter() - start
        return handle
    runner.dispatch = timed


def bench(name: str, w: dict, rounds: int, layers: int, dtype: str, log) -> dict:
    model = make_model(w["model"], layers, dtype)
    engines = {mode: Engine(model, dtype, EngineConfig(overlap=mode == "overlap", **w["engine"]))
               for mode in ("overlap", "sync")}
    vocab = model.config.vocab_size
    for engine in engines.values():
        time_dispatch(engine)
    try:
        for mode, engine in engines.items():           # compiles (the programs are shared)
            start = time.perf_counter()
            run_round(engine, w, vocab, 10_000, f"warm-{mode}")
            log(f"{name}: warm-up {mode} {time.perf_counter() - start:.1f} s")
        runs: dict[str, list] = {"overlap": [], "sync": []}
        mismatches = 0
        for r in range(rounds):
            order = ("overlap", "sync") if r % 2 == 0 else ("sync", "overlap")
            got = {}
            for mode in order:
                row = run_round(engines[mode], w, vocab, r, f"r{r}-{mode}")
                got[mode] = row.pop("outputs")
                runs[mode].append(row)
                log(f"{name} round {r} {mode:7s}: {row['wall_ms_per_step']:8.2f} ms/step "
                    f"(host {row['host_ms_per_step']:.2f} = plan {row['plan_ms_per_step']:.2f}"
                    f" + dispatch {row['dispatch_ms_per_step']:.2f} + post "
                    f"{row['post_ms_per_step']:.2f}; device wait "
                    f"{row['device_wait_ms_per_step']:.2f}; {row['steps']} steps, "
                    f"{row['drains']} drains, device busy at {row['busy_fetch_fraction']:.0%}"
                    " of fetches)")
            mismatches += got["overlap"] != got["sync"]
        loop = engines["overlap"].stats()["loop"]
    finally:
        for engine in engines.values():
            engine.close()

    def med(mode: str, key: str) -> float:
        return statistics.median(row[key] for row in runs[mode])
    sync_wall, ov_wall = med("sync", "wall_ms_per_step"), med("overlap", "wall_ms_per_step")
    host = med("sync", "host_ms_per_step")
    hidden = sync_wall - ov_wall
    summary = {
        "sync_host_ms_per_step": host,               # measured alone: the device idles
        "sync_host_parts_ms_per_step": {k: med("sync", f"{k}_ms_per_step")
                                        for k in ("plan", "dispatch", "post")},
        "sync_device_ms_per_step": med("sync", "device_wait_ms_per_step"),
        "sync_wall_ms_per_step": sync_wall,
        "overlap_wall_ms_per_step": ov_wall,
        "overlap_host_ms_per_step": med("overlap", "host_ms_per_step"),
        "overlap_device_wait_ms_per_step": med("overlap", "device_wait_ms_per_step"),
        # what the overlap can hide at most: the host's time or the device's, the smaller
        "hideable_ms_per_step": min(host, med("sync", "device_wait_ms_per_step")),
        # wall-clock difference: noise where the device step is >> the host's time (8b)
        "hidden_host_ms_per_step": hidden,
        "hidden_fraction_of_host": hidden / host if host else None,
        "speedup": sync_wall / ov_wall,
        # the least disturbed round of each mode (other processes share this machine's cores)
        "best_round": {
            "sync_wall_ms_per_step": min(r["wall_ms_per_step"] for r in runs["sync"]),
            "sync_host_ms_per_step": min(r["host_ms_per_step"] for r in runs["sync"]),
            "sync_device_ms_per_step": min(r["device_wait_ms_per_step"] for r in runs["sync"]),
            "overlap_wall_ms_per_step": min(r["wall_ms_per_step"] for r in runs["overlap"]),
            "speedup": min(r["wall_ms_per_step"] for r in runs["sync"]) /
            min(r["wall_ms_per_step"] for r in runs["overlap"])},
        "steps_per_round": {m: med(m, "steps") for m in runs},
        "overlap_drains_per_round": med("overlap", "drains"),
        "overlap_busy_fetch_fraction": med("overlap", "busy_fetch_fraction"),
        "tokens_equal": mismatches == 0,
    }
    log(f"{name}: host {host:.2f} ms/step measured alone, device "
        f"{summary['sync_device_ms_per_step']:.2f} ms/step; wall {sync_wall:.2f} (sync) vs {ov_wall:.2f} (overlap) ms/step: "
        f"{hidden:.2f} ms hidden ({summary['hidden_fraction_of_host']:.0%} of the host time), "
        f"x{summary['speedup']:.3f}; overlapped, the device was still busy at "
        f"{summary['overlap_busy_fetch_fraction']:.0%} of fetches; best rounds "
        f"{summary['best_round']['sync_wall_ms_per_step']:.2f} (sync) vs "
        f"{summary['best_round']['overlap_wall_ms_per_step']:.2f} (overlap) ms/step")
    return {"model": model.source, "dtype": dtype, "layers": model.config.num_layers,
            "workload": {k: v for k, v in w.items() if k != "model"},
            "rounds": runs, "summary": summary, "overlap_engine_loop_totals": loop}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["tiny", "8b"], choices=list(WORKLOADS))
    ap.add_argument("--rounds", type=int, nargs="+", default=[20, 2],
                    help="timed rounds per mode (alternated), per workload")
    ap.add_argument("--layers", type=int, default=2, help="layers of the llama3-8b-shaped model")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    env = environment(argv, __file__)
    load_before = os.getloadavg()

    def log(line: str) -> None:
        print(line, flush=True)
    result = {**env, "load_average_before": load_before, "workloads": {}}
    for i, name in enumerate(args.workloads):
        rounds = args.rounds[min(i, len(args.rounds) - 1)]
        result["workloads"][name] = bench(name, WORKLOADS[name], rounds, args.layers,
                                          args.dtype, log)
    result["load_average_after"] = os.getloadavg()
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
