"""The disk tier (issue 22): where a returning conversation's KV comes from, and what a disk
tier does for a replay whose working set overflows device and host memory.

    python benchmarks/bench_disk_tier.py --out benchmarks/results/bench_disk_tier_cpu.json

Part "ttft": time to first token of a returning long conversation (--history tokens, then
--new-tokens more, one output token) whose KV sits on the device, in host memory, in page
files on disk (as written: usually still in the OS page cache; and "disk-cold": the files'
pages dropped from the OS cache with posix_fadvise first), or nowhere (recomputed). Each tier
is its own engine (LRU eviction, loads always: restore_policy="load"); two other long
conversations push the returning one out of the faster tiers. Median over --reps, after one
untimed warm-up rep; the returning turn's first token must be the same in every tier.

Part "replay": ShareGPT-shaped conversations (benchmarks/workload.py: sharegpt, closed-loop
users with exponential think times) through a device pool and a host tier far smaller than
the working set (--device-fraction, --host-fraction of its pages), without and with a disk tier
big enough for all of it (restore_policy "auto": load or recompute by measured speeds).
Reported: throughput, time to first token, hit ratio by tier (device / host / disk) and the
tokens recomputed; outputs must be identical across setups.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

import workload as wl
from closed_loop import run_users, usage_totals
from common import environment, model_and_vocab, write_json
from pensieve_jax.engine.config import page_bytes as engine_page_bytes
from pensieve_jax.engine.engine import Engine, EngineConfig
from pensieve_jax.engine.sampling import SamplingParams
from tier_pools import tier_pools

TIERS = ("device", "host", "disk", "disk-cold", "recompute")
PAGE_SIZE = 16


def tier_config(tier: str, history: int, new_tokens: int, page_bytes: int,
                directory: str) -> EngineConfig:
    """An engine where a conversation of `history` tokens ends up in `tier` once two others
    of the same length have run (LRU eviction)."""
    max_len = history + new_tokens + 16
    pages = -(-max_len // PAGE_SIZE)
    disk = tier.startswith("disk")
    return EngineConfig(
        page_size=PAGE_SIZE, chunk_tokens=2 * PAGE_SIZE, max_model_len=max_len,
        num_pages=4 * pages if tier == "device" else pages + 2, max_batched_tokens=256,
        max_num_seqs=4, eviction_policy="lru", swap_out_threshold=0.0, reserve_fraction=0.0,
        restore_policy="load", precompile=False,
        host_cache_bytes=(4 * pages if tier == "host" else 2 if disk else 0) * page_bytes,
        disk_cache_bytes=4 * pages * page_bytes if disk else 0,
        disk_cache_dir=directory if disk else None)


def where(engine: Engine, cid: str) -> dict[str, int]:
    def read():
        c = engine.store.conversations[cid]
        return {"device": sum(p >= 0 for p in c.pages), "host": len(c.host_pages),
                "disk": len(c.disk_pages), "dropped": c.dropped}
    return engine.call(read)


def drop_os_cache(directory: str) -> None:
    for entry in os.scandir(directory):
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def ttft_part(model, args, vocab: int) -> dict:
    page_bytes = engine_page_bytes(model, EngineConfig(page_size=PAGE_SIZE), args.dtype)
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    out = {}
    for tier in TIERS:
        with tempfile.TemporaryDirectory(prefix="bench-disk-") as directory:
            engine = Engine(model, args.dtype, tier_config(
                tier, args.history, args.new_tokens, page_bytes, directory))
            rows = []
            for rep in range(args.reps + 1):                       # rep 0: warm-up
                rng = np.random.default_rng(rep)
                ids = [rng.integers(0, vocab, args.history).tolist() for _ in range(3)]
                new = rng.integers(0, vocab, args.new_tokens).tolist()
                names = [f"{tier}-{rep}-{k}" for k in range(3)]
                for name, seq in zip(names, ids):                  # the returning one first
                    engine.submit(seq, one, conversation_id=name).result()
                while engine.stats()["running"]:
                    time.sleep(0.01)
                placed = where(engine, names[0])
                if tier == "disk-cold":      # every page file written, then out of the cache
                    engine.call(lambda: (engine.swapper.disk.poll(wait=True),
                                         drop_os_cache(directory)))
                start = time.perf_counter()
                res = engine.submit(ids[0] + new, one, conversation_id=names[0]).result()
                wall = time.perf_counter() - start
                rows.append({"ttft_s": res.usage.ttft_s, "wall_s": wall, "placed": placed,
                             "cached_tokens": res.usage.cached_tokens,
                             "recomputed_tokens": res.usage.recomputed_tokens,
                             "first_token": int(res.token_ids[0])})
                for name in names:
                    engine.end_conversation(name)
            stats = engine.stats()
            engine.shutdown()
        timed = rows[1:]
        out[tier] = {"ttft_s_median": statistics.median(r["ttft_s"] for r in timed),
                     "ttft_s": [r["ttft_s"] for r in timed], "reps": timed,
                     "disk": {k: stats["disk"].get(k) for k in (
                         "served_tokens", "load_s", "loaded_bytes", "write_s", "written_bytes")},
                     "disk_read_bytes_per_s": stats["swap"]["disk_read_bytes_per_s"]}
        r = timed[-1]
        print(f"ttft {tier:10s} {out[tier]['ttft_s_median'] * 1e3:8.2f} ms  placed {r['placed']}"
              f"  cached {r['cached_tokens']} recomputed {r['recomputed_tokens']}", flush=True)
    firsts = [[r["first_token"] for r in out[t]["reps"]] for t in TIERS]
    out["identical_first_tokens"] = all(f == firsts[0] for f in firsts)
    return out


def replay(engine: Engine, load: wl.Workload, vocab: int, seed: int, tag: str) -> dict:
    """Closed-loop users: each sends its turns (waiting for the answer and thinking between)."""
    ttfts, outputs, usages = [], {}, []
    start = time.perf_counter()

    def user(i: int) -> None:
        conv = load.conversations[i]
        time.sleep(max(0.0, load.arrivals_s[i] - (time.perf_counter() - start)))
        system, turns = wl.token_ids_for(conv, vocab, seed)
        seq, outs = list(system), []
        for k, (turn, ids) in enumerate(zip(conv.turns, turns)):
            time.sleep(load.think_s[i][k])
            seq = seq + ids
            res = engine.submit(seq, SamplingParams(max_tokens=turn.answer_len,
                                                    ignore_eos=True),
                                conversation_id=f"{tag}-{i}").result()
            ttfts.append(res.usage.ttft_s)
            usages.append(res.usage)
            seq = seq + list(res.token_ids)
            outs.append(list(res.token_ids))
        outputs[i] = outs

    run_users(user, len(load.conversations))
    wall = time.perf_counter() - start
    total = usage_totals(usages)
    return {"seconds": wall, "turns": len(usages), "turns_per_s": len(usages) / wall,
            "output_tokens_per_s": total["completion_tokens"] / wall,
            "ttft_p50_s": float(np.median(ttfts)), "ttft_p90_s": float(np.percentile(ttfts, 90)),
            **total, "_outputs": outputs}


def replay_part(model, args, vocab: int) -> dict:
    max_len = args.max_context + 64
    convs = wl.sharegpt(args.conversations, seed=args.seed, scale=args.scale,
                        max_context=args.max_context)
    load = wl.schedule(convs, rate=args.rate, think_time_s=args.think_time, seed=args.seed)
    working_pages = sum(-(-c.context_len() // PAGE_SIZE) for c in convs)
    pools = tier_pools(model, args.dtype, PAGE_SIZE, working_pages, args.device_fraction,
                       args.host_fraction, min_device_pages=-(-max_len // PAGE_SIZE) + 8,
                       min_host_pages=2)
    device, host, page_bytes = pools.device_pages, pools.host_pages, pools.page_bytes
    out = {"workload": load.summary(), "working_set_pages": working_pages,
           "device_pages": device, "host_pages": host, "setups": {}}
    outputs = {}
    for name, disk in (("device+host", 0), ("device+host+disk", 2 * working_pages)):
        with tempfile.TemporaryDirectory(prefix="bench-disk-") as directory:
            engine = Engine(model, args.dtype, EngineConfig(
                page_size=PAGE_SIZE, num_pages=device, max_model_len=max_len,
                max_batched_tokens=256, max_num_seqs=16, host_cache_bytes=host * page_bytes,
                disk_cache_bytes=disk * page_bytes, disk_cache_dir=directory if disk else None,
                precompile=False))
            warm = wl.schedule(wl.sharegpt(args.conversations, seed=args.seed + 1,
                                           scale=args.scale, max_context=args.max_context),
                               rate=args.rate, think_time_s=0.0, seed=args.seed + 1)
            replay(engine, warm, vocab, args.seed + 1, f"warm-{name}")     # compile shapes
            before = engine.stats()
            row = replay(engine, load, vocab, args.seed, name)
            stats = engine.stats()
            engine.shutdown()
        tiers = {t: stats["hit_tokens_by_tier"][t] - before["hit_tokens_by_tier"].get(t, 0)
                 for t in ("device", "host", "disk")}
        row.update(hit_tokens_by_tier=tiers,
                   hit_ratio_by_tier={t: v / row["prompt_tokens"] for t, v in tiers.items()},
                   hit_ratio=row["cached_tokens"] / row["prompt_tokens"],
                   compilations_while_timed=stats["compilations"] - before["compilations"],
                   host_dropped_pages=stats["host_dropped_pages"] - before["host_dropped_pages"],
                   host_to_disk_pages=stats["host_to_disk_pages"] - before["host_to_disk_pages"],
                   disk_dropped_pages=stats["disk_dropped_pages"] - before["disk_dropped_pages"],
                   **{k: stats[k] - before[k] for k in (
                       "recomputed_not_loaded_pages", "device_dropped_pages",
                       "disk_unreadable_pages", "preemptions", "evicted_tokens")},
                   disk=stats["disk"], rates={k: stats["swap"][k] for k in (
                       "h2d_bytes_per_s", "prefill_s_per_token", "disk_read_bytes_per_s")})
        outputs[name] = row.pop("_outputs")
        out["setups"][name] = row
        h = row["hit_ratio_by_tier"]
        print(f"replay {name:18s} {row['turns_per_s']:6.2f} turns/s "
              f"{row['output_tokens_per_s']:7.1f} tok/s  ttft p50 {row['ttft_p50_s'] * 1e3:6.1f} "
              f"ms  hit device {h['device']:.2f} host {h['host']:.2f} disk {h['disk']:.2f}  "
              f"recomputed {row['recomputed_tokens']}", flush=True)
    first = next(iter(outputs.values()))
    out["identical_outputs"] = all(o == first for o in outputs.values())
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--parts", nargs="+", default=["ttft", "replay"], choices=["ttft", "replay"])
    ap.add_argument("--history", type=int, default=1536, help="ttft: the returning history")
    ap.add_argument("--new-tokens", type=int, default=32, help="ttft: its new turn")
    ap.add_argument("--reps", type=int, default=5, help="ttft: timed repetitions per tier")
    ap.add_argument("--conversations", type=int, default=32, help="replay: conversations")
    ap.add_argument("--scale", type=float, default=0.25, help="replay: ShareGPT length scale")
    ap.add_argument("--max-context", type=int, default=512, help="replay: context cap")
    ap.add_argument("--rate", type=float, default=16.0, help="replay: conversations / s")
    ap.add_argument("--think-time", type=float, default=0.5, help="replay: mean seconds")
    ap.add_argument("--device-fraction", type=float, default=0.15)
    ap.add_argument("--host-fraction", type=float, default=0.10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    model, vocab = model_and_vocab(args.model, args.dtype)
    result = {**environment(argv, __file__), "model": model.source, "page_size": PAGE_SIZE}
    if "ttft" in args.parts:
        result["ttft"] = ttft_part(model, args, vocab)
        print("identical first tokens across tiers:", result["ttft"]["identical_first_tokens"])
    if "replay" in args.parts:
        result["replay"] = replay_part(model, args, vocab)
        print("identical outputs across setups:", result["replay"]["identical_outputs"])
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
