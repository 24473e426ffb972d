"""Prompt sharing on a multi-round QA workload (every user shares one long system prompt), side by
side in one run: stateless, stateful without sharing, stateful with sharing.

    python benchmarks/bench_sharing.py --model random:smollm2-135m --users 8 --rounds 3 \
        --system-len 1000 --out benchmarks/results/bench_sharing_cpu.json

Users are closed loops (exponential think time) starting at Poisson arrivals. Each setup first
replays the same workload with other token ids (so step shapes are compiled before the timed
pass; `compilations_while_timed` says if any were left). Reports throughput,
TTFT, normalized latency (turn seconds / output tokens), hit rates, tokens served from shared
pages and the peak device pages in use (sampled), and checks that every setup produced the same
tokens (greedy).
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np

import workload as wl
from closed_loop import run_users, usage_totals
from common import environment, model_and_vocab, write_json
from pensieve_jax.engine.engine import Engine, EngineConfig
from pensieve_jax.engine.sampling import SamplingParams

SETUPS = {   # name: (cache_policy, prefix_sharing)
    "stateless": ("stateless", False),
    "stateful/no-sharing": ("stateful", False),
    "stateful/sharing": ("stateful", True),
}


def conversations(args, vocab: int, seed: int, token_seed: int):
    """The workload (lengths, arrivals, think times from seed) with token ids from token_seed:
    the warm-up pass replays the same shapes and timing with other tokens."""
    convs = wl.multi_round_qa(args.users, args.rounds, seed, system_len=args.system_len,
                              question_len=args.question_len, answer_len=args.answer_len)
    shared: dict[str, list[int]] = {}
    ids = [wl.token_ids_for(c, vocab, token_seed, shared) for c in convs]
    rng = np.random.default_rng(seed)
    starts = np.cumsum(rng.exponential(1 / args.rate, len(convs))) if args.rate else \
        np.zeros(len(convs))
    think = rng.exponential(args.think_time, (len(convs), args.rounds))
    return convs, ids, starts, think


def replay(engine: Engine, convs, ids, starts, think, tag: str) -> dict:
    ttft, lat, usages, outputs, peak = [], [], [], {}, [0]
    done = threading.Event()

    def sample_pages():
        while not done.wait(0.05):
            peak[0] = max(peak[0], engine.allocator.num_pages - engine.allocator.num_free)

    def user(i: int) -> None:
        time.sleep(starts[i])
        system, turns = ids[i]
        seq, outs = list(system), []
        for k, new in enumerate(turns):
            time.sleep(think[i][k] if k else 0)
            seq = seq + new
            params = SamplingParams(max_tokens=convs[i].turns[k].answer_len, ignore_eos=True)
            start = time.perf_counter()
            out = engine.submit(seq, params, conversation_id=f"{tag}-{i}").result()
            lat.append((time.perf_counter() - start) / max(1, len(out.token_ids)))
            ttft.append(out.usage.ttft_s)
            usages.append(out.usage)
            seq = seq + list(out.token_ids)
            outs.append(out.token_ids)
        outputs[i] = outs

    sampler = threading.Thread(target=sample_pages, daemon=True)
    sampler.start()
    wall = run_users(user, len(convs))
    done.set()
    total = usage_totals(usages, ("prompt_tokens", "cached_tokens", "cached_shared_tokens",
                                  "prefilled_tokens", "recomputed_tokens", "completion_tokens"))
    return {"seconds": wall, "requests_per_s": len(usages) / wall,
            "output_tokens_per_s": total["completion_tokens"] / wall,
            "ttft_mean_s": float(np.mean(ttft)), "ttft_p50_s": float(np.median(ttft)),
            "ttft_p90_s": float(np.percentile(ttft, 90)),
            "norm_latency_mean": float(np.mean(lat)), "norm_latency_p90": float(np.percentile(lat, 90)),
            **total, "hit_rate": total["cached_tokens"] / total["prompt_tokens"],
            "peak_device_pages": peak[0], "_outputs": outputs}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="random:smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--system-len", type=int, default=1000)
    ap.add_argument("--question-len", type=float, default=50)
    ap.add_argument("--answer-len", type=int, default=32)
    ap.add_argument("--rate", type=float, default=2.0, help="users arriving per second (0: all at once)")
    ap.add_argument("--think-time", type=float, default=0.5, help="mean seconds, exponential")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--num-pages", type=int, default=None, help="default: room for every user")
    ap.add_argument("--max-batched-tokens", type=int, default=512)
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    model, vocab = model_and_vocab(args.model, args.dtype)
    convs, ids, starts, think = conversations(args, vocab, seed=1, token_seed=1)
    warm_ids = conversations(args, vocab, seed=1, token_seed=2)[1]
    max_len = max(c.context_len() for c in convs) + 8
    pages_per_user = -(-max_len // args.page_size)
    num_pages = args.num_pages or pages_per_user * (args.users + 1)
    result = {**environment(argv, __file__), "model": model.source,
              "workload": {"users": args.users, "rounds": args.rounds,
                           "system_len": args.system_len, "question_len": args.question_len,
                           "answer_len": args.answer_len, "rate": args.rate,
                           "think_time_s": args.think_time},
              "device_pages": num_pages, "page_size": args.page_size, "setups": {}}
    outputs = {}
    for name in args.setups:
        policy, sharing = SETUPS[name]
        engine = Engine(model, args.dtype, EngineConfig(
            page_size=args.page_size, num_pages=num_pages, max_model_len=max_len,
            max_batched_tokens=args.max_batched_tokens, max_num_seqs=max(args.users, 1),
            cache_policy=policy, prefix_sharing=sharing))
        start = time.perf_counter()     # same shapes and timing, other tokens: compiles steps
        replay(engine, convs, warm_ids, starts, think, "warm")
        compiled = engine.stats()["compilations"]
        print(f"{name}: warm-up pass {time.perf_counter() - start:.0f} s, {compiled} step "
              "shapes compiled", flush=True)
        row = replay(engine, convs, ids, starts, think, name)
        stats = engine.stats()
        row.update(compilations_while_timed=stats["compilations"] - compiled,
                   preemptions=stats["preemptions"],
                   copied_on_write_pages=stats["copied_on_write_pages"])
        outputs[name] = row.pop("_outputs")
        engine.shutdown()
        result["setups"][name] = row
        print(f"{name:20s} {row['requests_per_s']:6.2f} req/s {row['output_tokens_per_s']:7.1f} "
              f"tok/s  TTFT mean {row['ttft_mean_s'] * 1e3:7.1f} p90 {row['ttft_p90_s'] * 1e3:7.1f} "
              f"ms  hit {row['hit_rate']:.2f} (shared {row['cached_shared_tokens']})  "
              f"prefilled {row['prefilled_tokens']}  peak pages {row['peak_device_pages']}",
              flush=True)
    first = outputs[args.setups[0]]
    result["identical_outputs"] = all(o == first for o in outputs.values())
    setups = result["setups"]
    if "stateful/sharing" in setups and "stateful/no-sharing" in setups:
        on, off = setups["stateful/sharing"], setups["stateful/no-sharing"]
        result["sharing_vs_no_sharing"] = {
            "throughput_ratio": on["requests_per_s"] / off["requests_per_s"],
            "ttft_mean_ratio": on["ttft_mean_s"] / off["ttft_mean_s"],
            "peak_pages_ratio": on["peak_device_pages"] / max(1, off["peak_device_pages"])}
        print("sharing vs no sharing:", json.dumps(result["sharing_vs_no_sharing"]))
    print("identical outputs across setups:", result["identical_outputs"])
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
