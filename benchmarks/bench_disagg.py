"""MemPool on CPU: moving a conversation by KV transfer vs by recomputation, and prefill/decode
disaggregation vs colocated replicas.

    python benchmarks/bench_disagg.py --model random:tiny --out benchmarks/results/disagg_cpu.json

1. move: a conversation of L history tokens lives on replica A; it moves to replica B either
   by recomputation (B gets the messages and exact ids, ChatRequest.history_token_ids, and
   prefills them) or by a MemPool Transfer A -> B followed by the same turn (B finds them
   cached). Per L: the moved turn's TTFT on B, the transfer's wall time and bytes, the total,
   and what the router's cost model would have chosen from these measurements.
2. disagg: the same closed-loop multi-turn chat (U users x T turns, no think time) through a
   router over 1 prefill + 1 decode replica, and over 2 colocated replicas (affinity).

Every configuration runs discarded passes first (compiles); counters are for the measured pass. On CPU, with both
replicas on the same 2 cores, these numbers say little about GPUs: the transfer is a loopback
copy and prefill and decode compete for the same cores.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import environment, write_json  # noqa: E402


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(n))


def bench_move(model, options: dict, lengths: list[int], reps: int, seed: int) -> list[dict]:
    import grpc

    from pensieve_jax.engine.engine import Engine, EngineConfig
    from pensieve_jax.engine.sampling import SamplingParams
    from serving.auth import CLUSTER_SECRET_METADATA
    from serving.mempool import GRPC_OPTIONS, CostModel
    from serving.pensieve.v1 import pensieve_pb2 as pb
    from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
    from serving.protocol import messages_to_proto, sampling_to_proto
    from serving.server import BackgroundServer

    params = sampling_to_proto(SamplingParams(max_tokens=4, ignore_eos=True))
    engines = [Engine(model, "float32", EngineConfig(**options)) for _ in range(2)]
    rows = []
    secret = "bench-disagg"           # MemPool: the internal ports, behind the cluster secret
    internal = ((CLUSTER_SECRET_METADATA, secret),)
    with BackgroundServer(engines[0], cluster_secret=secret) as a, \
            BackgroundServer(engines[1], cluster_secret=secret) as b, \
            grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(b.target) as cb, \
            grpc.insecure_channel(a.internal_target, GRPC_OPTIONS) as ia:
        a.call(lambda: a.server.internal.allow_peers([b.internal_target]))
        chat_a, chat_b = pb_grpc.PensieveStub(ca), pb_grpc.PensieveStub(cb)
        pool_a = pb_grpc.MemPoolStub(ia)
        rng = random.Random(seed)

        def one(n: int, mode: str) -> dict:
            first = [{"role": "user", "content": _text(rng, n)}]
            out = list(chat_a.Chat(pb.ChatRequest(messages=messages_to_proto(first),
                                                  sampling=params), timeout=600))
            cid = out[-1].conversation_id
            ids = a.call(lambda: list(a.service.conversations[cid].session.token_ids))
            reply = engines[0].tokenizer.decode([t for m in out for t in m.token_ids])
            messages = first + [{"role": "assistant", "content": reply},
                                {"role": "user", "content": "next"}]
            row = {"history_tokens": len(ids), "mode": mode}
            start = time.perf_counter()
            target = ""
            if mode == "transfer":
                t = pool_a.Transfer(pb.TransferRequest(conversation_id=cid,
                                                       target=b.internal_target, adopt=True),
                                    timeout=600, metadata=internal)
                target = t.target_conversation_id
                row.update(transfer_s=time.perf_counter() - start, bytes=t.bytes,
                           transfer_server_s=t.seconds)
            turn = list(chat_b.Chat(pb.ChatRequest(
                conversation_id=target, messages=messages_to_proto(messages),
                sampling=params, history_token_ids=ids), timeout=600))
            row["total_s"] = time.perf_counter() - start
            u = turn[-1].usage
            row.update(ttft_s=u.ttft_s, cached_tokens=u.cached_tokens,
                       computed_tokens=u.prefilled_tokens + u.recomputed_tokens)
            for stub, c in ((chat_a, cid), (chat_b, turn[-1].conversation_id)):
                stub.EndConversation(pb.EndConversationRequest(conversation_id=c), timeout=60)
            return row

        for n in lengths:
            for mode in ("recompute", "transfer"):
                one(n, mode)                               # warm-up: compiles
            for _ in range(reps):
                for mode in ("recompute", "transfer"):
                    rows.append(one(n, mode))
                    print(json.dumps(rows[-1]), flush=True)
    for e in engines:
        e.shutdown()
    summary = []
    for n in lengths:
        got = {m: [r for r in rows if r["mode"] == m and
                   abs(r["history_tokens"] - n) < max(64, n // 4)]
               for m in ("recompute", "transfer")}
        mean = lambda rs, k: sum(r[k] for r in rs) / max(1, len(rs))   # noqa: E731
        rec, tra = got["recompute"], got["transfer"]
        tokens = mean(rec, "history_tokens")
        m = CostModel()
        for r in tra:
            m.observe_transfer(r["bytes"], r["transfer_s"])
        for r in rec:
            m.observe_prefill(r["computed_tokens"], r["ttft_s"])
        choice = m.choose(int(tokens), int(mean(tra, "bytes")))
        summary.append({
            "history_tokens": tokens, "recompute_ttft_s": mean(rec, "ttft_s"),
            "recompute_total_s": mean(rec, "total_s"), "transfer_s": mean(tra, "transfer_s"),
            "transfer_bytes": mean(tra, "bytes"), "transfer_then_ttft_s": mean(tra, "ttft_s"),
            "transfer_total_s": mean(tra, "total_s"),
            "transfer_cached_tokens": mean(tra, "cached_tokens"),
            "cost_model": {**m.as_dict(), "choice": "transfer" if choice.transfer else
                           "recompute", "transfer_s": choice.transfer_s,
                           "recompute_s": choice.recompute_s}})
        print(json.dumps(summary[-1]), flush=True)
    return summary


def _delta(after, before):
    """after - before, for nested dicts of counters."""
    if isinstance(after, dict):
        return {k: _delta(v, before.get(k, 0) if isinstance(before, dict) else 0)
                for k, v in after.items()}
    return after - before if isinstance(after, (int, float)) and \
        not isinstance(after, bool) else after


def bench_disagg(model, model_name: str, options: dict, users: int, turns: int,
                 prompt_len: int, max_tokens: int, seed: int) -> list[dict]:
    from pensieve_jax.engine.sampling import SamplingParams
    from serving.client import connect
    from serving.cluster import BackgroundCluster, ClusterConfig

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    layouts = {"disaggregated 1P+1D": dict(replicas=0, prefill=1, decode=1),
               "colocated 2x": dict(replicas=2, policy="affinity")}
    out = []
    for name, layout in layouts.items():
        config = ClusterConfig(model_name, engine_options=tuple(options.items()),
                               health_period_s=0.5, **layout)
        with BackgroundCluster(config, loaded_model=model) as cluster:
            before = None
            for phase in ("warmup", "warmup", "measured"):
                client = connect(cluster.target, timeout=600)
                rng = random.Random(f"{seed}:{phase}")
                texts = [[_text(rng, prompt_len) for _ in range(turns)] for _ in range(users)]
                replies: list[list] = [[] for _ in range(users)]

                def user(i: int) -> None:
                    s = client.session(system="Be brief.")
                    for t in texts[i]:
                        start = time.perf_counter()
                        r = s.send(t, params)
                        replies[i].append((r, time.perf_counter() - start))
                    s.close()
                start = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(users) as pool:
                    list(pool.map(user, range(users)))
                wall = time.perf_counter() - start
                stats = json.loads(client.stats_response().stats_json)
                client.close()
                if phase == "warmup":
                    before = stats
                    continue
                flat = [x for rs in replies for x in rs]
                row = {"layout": name, "users": users, "turns": turns, "wall_s": wall,
                       "completion_tok_per_s": sum(len(r.token_ids) for r, _ in flat) / wall,
                       "mean_latency_s": sum(t for _, t in flat) / len(flat),
                       "mean_ttft_s": sum(r.usage.ttft_s for r, _ in flat) / len(flat),
                       "hit_rate": sum(r.usage.cached_tokens for r, _ in flat) /
                       sum(r.usage.prompt_tokens for r, _ in flat),
                       "token_ids": [[list(r.token_ids) for r, _ in rs] for rs in replies],
                       "disaggregation": _delta(stats["router"]["disaggregation"],
                                                before["router"]["disaggregation"]),
                       "compilations_in_measured_pass": sum(
                           r["compilations"] for r in stats["replicas"]) - sum(
                           r["compilations"] for r in before["replicas"])}
                out.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "token_ids"}), flush=True)
    same = out[0]["token_ids"] == out[1]["token_ids"]
    for row in out:
        row.pop("token_ids")
        row["identical_tokens_across_layouts"] = same
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 3072])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--num-pages", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--parts", nargs="+", default=["move", "disagg"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax

    from pensieve_jax.weights import load_model
    model = load_model(args.model, "float32")
    options = dict(page_size=args.page_size, num_pages=args.num_pages,
                   max_model_len=args.max_model_len, max_batched_tokens=512, max_num_seqs=16)
    result = {"model": args.model, "engine_options": options, "args": vars(args),
              "machine": {**environment(argv, __file__),
                          "devices": [str(d) for d in jax.devices()]},
              "note": "CPU, both replicas share the same cores and talk over loopback: "
                      "says little about GPUs (NVLink/RDMA transfers, separate prefill and "
                      "decode devices)"}
    if "move" in args.parts:
        result["move"] = bench_move(model, options, args.lengths, args.reps, args.seed)
    if "disagg" in args.parts:
        result["disagg"] = bench_disagg(model, args.model, options, args.users, args.turns,
                                        args.prompt_len, args.max_tokens, args.seed)
    if args.out:
        write_json(args.out, result, log=sys.stderr)


if __name__ == "__main__":
    main()
