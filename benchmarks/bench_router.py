"""Routing policies over N replicas: replay multi-turn chat through the router with round-robin,
conversation affinity and Preble's E2 in one run, on the same workloads.

    python benchmarks/bench_router.py --replicas 3 --model random:tiny \\
        --out benchmarks/results/router_cpu.json

Each policy gets a fresh cluster (N in-process replicas on one copy of the weights, the router
on loopback) and the same workloads: ShareGPT-shaped conversations and multi-round QA (every
user shares one long system prompt). Each conversation is a closed-loop user of the router's
Chat API (a RemoteSession: text in, streamed text out); conversations arrive as a Poisson
process. Per policy and workload: throughput (completion tokens/s), turn latency (mean, p50,
p99), TTFT, the cache hit rate the replicas report (usage.cached_tokens / prompt_tokens), the
hits the router's prefix tree predicted, and how the turns spread over the replicas.

Prompts are random ASCII text of the drawn token lengths (random:<preset> tokenizers take one
token per byte). Warm-up passes (every policy once, discarded) compile the engine's step shapes
before the measured passes; `compilations` per pass shows whether any compile still landed
inside one.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import string
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import workload as wl  # noqa: E402
from common import environment, write_json  # noqa: E402

POLICIES = ("round-robin", "affinity", "e2")


def make_workloads(args) -> dict[str, wl.Workload]:
    cap = dict(max_context=args.max_context)
    share = wl.sharegpt(args.conversations, seed=args.seed, scale=args.scale, **cap)
    mrqa = wl.multi_round_qa(args.conversations, rounds=args.rounds, seed=args.seed,
                             scale=args.scale, system_len=args.system_len,
                             question_len=50, answer_len=100)
    out = {}
    for name, convs in (("sharegpt", share), ("mrqa", mrqa)):
        if name in args.workloads:
            out[name] = wl.schedule(convs, rate=args.rate, think_time_s=args.think_time,
                                    seed=args.seed, name=name)
    return out


def _text(rng: random.Random, n: int) -> str:
    return rng.choice(string.ascii_lowercase) + \
        "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(n - 1))


def replay(target: str, workload: wl.Workload, seed: int) -> tuple[list[dict], float]:
    """Run the workload against `target`; one record per turn and the wall time."""
    from pensieve_jax.engine.sampling import SamplingParams
    from serving.client import connect

    client = connect(target, timeout=600)
    records: list[dict] = []
    systems: dict[str, str] = {}
    for c in workload.conversations:
        if c.system_len and c.system_key not in systems:
            systems[c.system_key] = _text(random.Random(f"{seed}:{c.system_key}"), c.system_len)
    start = time.perf_counter()

    def user(i: int) -> None:
        conv = workload.conversations[i]
        rng = random.Random(f"{seed}:{conv.id}")
        system = systems.get(conv.system_key) if conv.system_len else None
        time.sleep(max(0.0, workload.arrivals_s[i] - (time.perf_counter() - start)))
        session = client.session(system=system)
        for k, turn in enumerate(conv.turns):
            time.sleep(workload.think_s[i][k])
            params = SamplingParams(max_tokens=turn.answer_len, ignore_eos=True)
            t0 = time.perf_counter()
            ttft = None
            for piece in session.stream(_text(rng, turn.prompt_len), params):
                if ttft is None:
                    ttft = time.perf_counter() - t0
            e2e = time.perf_counter() - t0
            u = session.last_reply.usage
            records.append({"conversation": i, "turn": k, "e2e_s": e2e,
                            "ttft_s": ttft if ttft is not None else e2e,
                            "prompt_tokens": u.prompt_tokens, "cached_tokens": u.cached_tokens,
                            "completion_tokens": u.completion_tokens})
        session.close()

    with concurrent.futures.ThreadPoolExecutor(len(workload.conversations)) as pool:
        for f in [pool.submit(user, i) for i in range(len(workload.conversations))]:
            f.result()
    wall = time.perf_counter() - start
    client.close()
    return records, wall


def summarize(records: list[dict], wall_s: float) -> dict[str, Any]:
    e2e = np.array([r["e2e_s"] for r in records])
    ttft = np.array([r["ttft_s"] for r in records])
    completion = sum(r["completion_tokens"] for r in records)
    prompt = sum(r["prompt_tokens"] for r in records)
    cached = sum(r["cached_tokens"] for r in records)
    later = [r for r in records if r["turn"] > 0]
    return {
        "turns": len(records), "wall_s": wall_s, "completion_tokens": completion,
        "throughput_tokens_per_s": completion / wall_s,
        "latency_s": {"mean": float(e2e.mean()), "p50": float(np.percentile(e2e, 50)),
                      "p99": float(np.percentile(e2e, 99))},
        "ttft_s": {"mean": float(ttft.mean()), "p99": float(np.percentile(ttft, 99))},
        "prompt_tokens": prompt, "cached_tokens": cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "hit_rate_later_turns": (sum(r["cached_tokens"] for r in later) /
                                 max(1, sum(r["prompt_tokens"] for r in later)))}


def run_policy(policy: str, workloads: dict[str, wl.Workload], model, args) -> dict[str, Any]:
    from serving.client import connect
    from serving.cluster import BackgroundCluster, ClusterConfig
    from serving.router import E2Config

    config = ClusterConfig(args.model, args.replicas, policy,
                           engine_options=tuple(engine_options(args).items()),
                           health_period_s=0.5,
                           e2=E2Config(rebalance_threshold=args.rebalance_threshold))
    out = {}
    with BackgroundCluster(config, loaded_model=model) as cluster:
        for name, workload in workloads.items():
            before = _compilations(cluster.target)
            records, wall = replay(cluster.target, workload, args.seed)
            with connect(cluster.target) as client:
                stats = json.loads(client.stats_response().stats_json)
            router = stats["router"]
            out[name] = {**summarize(records, wall),
                         "predicted_hit_tokens": router["by_policy"][policy]["predicted_tokens"],
                         "reasons": router["reasons"], "events": router["events"],
                         "turns_per_replica": [r["routed"] for r in router["replicas"]],
                         "compilations": _compilations(cluster.target) - before}
            cluster.call(lambda: _reset(cluster.router))
            print(f"{policy:12s} {name:9s} {json.dumps(_brief(out[name]))}", flush=True)
    return out


def _reset(router) -> None:
    """Fresh router counters between workloads (the replicas keep their caches)."""
    router.counters.clear()
    router.reasons.clear()
    router.events = dict.fromkeys(router.events, 0)
    for r in router.replicas:
        r.routed = 0


def _compilations(target: str) -> int:
    from serving.client import connect
    with connect(target) as client:
        replicas = json.loads(client.stats_response().stats_json)["replicas"]
    return sum(r["compilations"] for r in replicas if r)


def _brief(s: dict) -> dict:
    return {"tok/s": round(s["throughput_tokens_per_s"], 1),
            "mean_s": round(s["latency_s"]["mean"], 3), "p99_s": round(s["latency_s"]["p99"], 3),
            "hit": round(s["hit_rate"], 3), "per_replica": s["turns_per_replica"]}


def engine_options(args) -> dict[str, Any]:
    return dict(max_model_len=args.max_model_len, page_size=args.page_size,
                num_pages=args.num_pages, max_batched_tokens=args.max_batched_tokens,
                max_num_seqs=args.max_num_seqs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--workloads", default="sharegpt,mrqa")
    p.add_argument("--conversations", type=int, default=12)
    p.add_argument("--rounds", type=int, default=4, help="mrqa questions per user")
    p.add_argument("--system-len", type=int, default=1000, help="mrqa shared system prompt")
    p.add_argument("--scale", type=float, default=0.25, help="multiplies the length means")
    p.add_argument("--max-context", type=int, default=1000,
                   help="sharegpt: tokens per conversation before the chat template")
    p.add_argument("--rate", type=float, default=4.0, help="conversations per second")
    p.add_argument("--think-time", type=float, default=0.5, help="mean seconds between turns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rebalance-threshold", type=float, default=2048.0)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--num-pages", type=int, default=128)
    p.add_argument("--max-batched-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    from pensieve_jax.weights import load_model
    args.workloads = args.workloads.split(",")
    policies = args.policies.split(",")
    workloads = make_workloads(args)
    model = load_model(args.model)
    if not args.no_warmup:     # compile the step shapes (shared by every engine) every
        t0 = time.perf_counter()   # policy's batches reach, before any measured pass
        for policy in policies:
            run_policy(policy, workloads, model, args)
        print(f"warm-up passes: {time.perf_counter() - t0:.1f} s", flush=True)
    results = {p: run_policy(p, workloads, model, args) for p in policies}
    report = {"benchmark": "bench_router", "model": args.model, "replicas": args.replicas,
              "machine": environment(argv, __file__), "args": vars(args),
              "workloads": {n: w.summary() for n, w in workloads.items()},
              "results": results}
    if args.out:
        write_json(args.out, report, indent=1)
    return report


if __name__ == "__main__":
    main()
