"""The multi-tier cache on one workload, side by side: stateless, device-only cache, device+host
cache, and Pensieve's eviction policy against LRU.

    python benchmarks/bench_tiers.py --model random:tiny --conversations 24 --turns 4 \
        --out benchmarks/results/bench_tiers_tiny_cpu.json

The device pool is sized to hold only a fraction of the conversations (--device-fraction), so
caching decisions matter. Users are closed loops with exponential think time, so conversations
go idle and come back, as in Pensieve's evaluation. Normalized latency = end-to-end seconds of a
turn / its output tokens.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from closed_loop import run_users, usage_totals
from common import environment, model_and_vocab, write_json
from pensieve_jax.engine.engine import Engine, EngineConfig
from pensieve_jax.engine.sampling import SamplingParams
from tier_pools import tier_pools

SETUPS = {   # name: (cache_policy, host tier?, eviction policy, swap_in)
    "stateless": ("stateless", False, "lru", "next_step"),
    "device-only/lru": ("stateful", False, "lru", "next_step"),
    "device-only/pensieve": ("stateful", False, "pensieve", "next_step"),
    "device+host/lru": ("stateful", True, "lru", "next_step"),
    "device+host/pensieve": ("stateful", True, "pensieve", "next_step"),
    "device+host/pensieve/layered": ("stateful", True, "pensieve", "layered"),
}


def workload(args, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    lens = np.random.default_rng(7).normal(args.new_tokens, args.new_tokens / 4,
                                           (args.conversations, args.turns))
    turns = [[list(rng.integers(0, vocab, max(4, int(n)))) for n in row] for row in lens]
    think = np.random.default_rng(8).exponential(args.think_time,
                                                 (args.conversations, args.turns))
    return turns, think


def replay(engine: Engine, args, turns, think, tag: str) -> dict:
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    lat, usages, outputs = [], [], {}

    def user(i: int) -> None:
        seq, outs = [], []
        time.sleep(think[i][0] * 0.1)                  # staggered arrivals
        for k, new in enumerate(turns[i]):
            seq = seq + new
            start = time.perf_counter()
            out = engine.submit(seq, params, conversation_id=f"{tag}-{i}").result()
            lat.append((time.perf_counter() - start) / max(1, len(out.token_ids)))
            usages.append(out.usage)
            seq = seq + list(out.token_ids)
            outs.append(out.token_ids)
            time.sleep(think[i][k])
        outputs[i] = outs

    wall = run_users(user, len(turns))
    total = usage_totals(usages)
    return {"seconds": wall, "requests_per_s": len(usages) / wall,
            "output_tokens_per_s": total["completion_tokens"] / wall,
            "norm_latency_mean": float(np.mean(lat)), "norm_latency_p50": float(np.median(lat)),
            "norm_latency_p90": float(np.percentile(lat, 90)), **total,
            "hit_rate_device": (total["cached_tokens"] - total["cached_host_tokens"]) /
            total["prompt_tokens"],
            "hit_rate_host": total["cached_host_tokens"] / total["prompt_tokens"],
            "_outputs": outputs}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--conversations", type=int, default=24)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--think-time", type=float, default=1.0, help="mean seconds, exponential")
    ap.add_argument("--device-fraction", type=float, default=0.25,
                    help="device pages / pages the whole workload would need")
    ap.add_argument("--host-fraction", type=float, default=1.0)
    ap.add_argument("--setups", nargs="+", default=list(SETUPS))
    ap.add_argument("--warmup-passes", type=int, default=3,
                    help="at most this many warm-up replays, until one compiles nothing new")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    model, vocab = model_and_vocab(args.model, args.dtype)
    page_size = 16
    per_conv = (args.new_tokens + args.max_tokens) * args.turns
    need_pages = args.conversations * -(-per_conv // page_size)
    max_len = per_conv + 4 * args.new_tokens
    pools = tier_pools(model, args.dtype, page_size, need_pages, args.device_fraction,
                       args.host_fraction, min_device_pages=2 * -(-max_len // page_size))
    num_pages, host_bytes = pools.device_pages, pools.host_bytes
    turns, think = workload(args, vocab, seed=1)
    result = {**environment(argv, __file__), "model": model.source, "device_pages": num_pages,
              "pages_needed": need_pages, "host_bytes": host_bytes, "setups": {}}
    outputs = {}
    for name in args.setups:
        policy, host, eviction, swap_in = SETUPS[name]
        engine = Engine(model, args.dtype, EngineConfig(
            page_size=page_size, num_pages=num_pages, max_model_len=max_len,
            max_batched_tokens=256, max_num_seqs=16, cache_policy=policy,
            host_cache_bytes=host_bytes if host else 0, eviction_policy=eviction,
            swap_in=swap_in))
        for i in range(args.warmup_passes):     # other tokens, same shapes: compile them
            compiled = engine.stats()["compilations"]
            warm_turns, warm_think = workload(args, vocab, seed=2 + i)
            replay(engine, args, warm_turns, warm_think, f"warm{i}-{name}")
            if engine.stats()["compilations"] == compiled:
                break
        compiled = engine.stats()["compilations"]
        row = replay(engine, args, turns, think, name)
        stats = engine.stats()
        row.update(compilations_while_timed=stats["compilations"] - compiled,
                   swap=stats["swap"], preemptions=stats["preemptions"],
                   device_to_host_pages=stats["device_to_host_pages"],
                   host_dropped_pages=stats["host_dropped_pages"],
                   device_dropped_pages=stats["device_dropped_pages"])
        # copies complete before they were needed: hidden behind compute (swap-ins loaded
        # inside a step are not seen from the host: bench_swap_overlap.py measures those)
        swap = stats["swap"]
        staged = swap["in_pages"] - swap["in_layered_pages"]
        row["swap_hidden_fraction"] = {
            "in": swap["in_hidden_pages"] / staged if staged else None,
            "out": swap["out_hidden_pages"] / swap["out_pages"] if swap["out_pages"] else None}
        outputs[name] = row.pop("_outputs")
        engine.shutdown()
        result["setups"][name] = row
        print(f"{name:28s} {row['requests_per_s']:6.2f} req/s {row['output_tokens_per_s']:7.1f} "
              f"tok/s  norm lat p50 {row['norm_latency_p50'] * 1e3:6.1f} p90 "
              f"{row['norm_latency_p90'] * 1e3:6.1f} ms/tok  hit dev {row['hit_rate_device']:.2f} "
              f"host {row['hit_rate_host']:.2f}  recomputed {row['recomputed_tokens']}")
    first = outputs[args.setups[0]]
    result["identical_outputs"] = all(o == first for o in outputs.values())
    print("identical outputs across setups:", result["identical_outputs"])
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
