"""Load test of one server (issue 20): N concurrent client streams, some cancelled mid-stream,
some malformed; no well-formed request may fail, no conversation may be lost, and the server's
memory returns to its baseline once the conversations end.

    python benchmarks/load_test.py --streams 200 --out benchmarks/results/load_test_cpu.json

An in-process server (BackgroundServer on loopback) over random:<preset>. Each client stream
is one conversation of two Chat turns and an EndConversation:
  - well-formed (the rest): turn 1, turn 2 continuing it, end. Any failure counts.
  - cancelled (--cancel, 10%): turn 1 is cancelled after a few chunks; turn 2 must still find
    the conversation (a NOT_FOUND is a conversation lost) and succeed.
  - malformed (--malformed, 5%): a bad request instead (NaN or huge sampling values, an
    unknown role, a random conversation id, an oversized message); it must be refused with a
    client error (INVALID_ARGUMENT / NOT_FOUND), never fail the server.
Clients that send the same first message must get the same greedy tokens (inconsistent_replies
counts those that do not). A warm-up round (discarded) compiles the engine's step shapes and
settles the allocator; RSS is measured after it (baseline), at the load's peak and once every
conversation has ended (after). Turn latency: request sent -> last message received.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import math
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import environment, write_json  # noqa: E402

from pensieve_jax.engine.engine import Engine  # noqa: E402
from pensieve_jax.engine.sampling import SamplingParams  # noqa: E402
from serving.pensieve.v1 import pensieve_pb2 as pb  # noqa: E402
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc  # noqa: E402
from serving.protocol import sampling_to_proto  # noqa: E402
from serving.server import BackgroundServer  # noqa: E402

CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def malformed(rng: random.Random) -> tuple[str, Any]:
    """A bad request: (rpc, message)."""
    kind = rng.randrange(6)
    user = pb.Message(role="user", content="hello")
    if kind == 0:
        return "Chat", pb.ChatRequest(messages=[user], sampling=pb.SamplingParams(
            temperature=math.nan))
    if kind == 1:
        return "Chat", pb.ChatRequest(messages=[user], sampling=pb.SamplingParams(top_k=2**31))
    if kind == 2:
        return "Chat", pb.ChatRequest(messages=[pb.Message(role="wizard" * 100, content="x"),
                                                user])
    if kind == 3:
        return "Chat", pb.ChatRequest(conversation_id=f"session-{rng.getrandbits(128):032x}",
                                      messages=[user])
    if kind == 4:
        return "Generate", pb.GenerateRequest(text="x" * (2 << 20))
    return "Generate", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-5, 10**9]),
                                          sampling=pb.SamplingParams(max_tokens=0))


class Client:
    """One client stream (a thread): a conversation of two turns, or a malformed request."""

    def __init__(self, stub, index: int, kind: str, params: pb.SamplingParams, seed: int):
        self.stub, self.index, self.kind, self.params = stub, index, kind, params
        self.rng = random.Random(seed)
        self.prompt = f"question number {index % 10}: tell me something"
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.failure: str | None = None
        self.lost = False
        self.first_reply: tuple[int, ...] | None = None

    def turn(self, conversation_id: str, text: str, cancel_after: int | None = None):
        start = time.perf_counter()
        call = self.stub.Chat(pb.ChatRequest(conversation_id=conversation_id, messages=[
            pb.Message(role="user", content=text)], sampling=self.params), timeout=300)
        cid, ids, first = conversation_id, [], None
        try:
            for m in call:
                cid = cid or m.conversation_id
                if m.token_ids and first is None:
                    first = time.perf_counter() - start
                ids += m.token_ids
                if cancel_after is not None and len(ids) >= cancel_after:
                    call.cancel()
        except grpc.RpcError as e:
            if cancel_after is None or e.code() != grpc.StatusCode.CANCELLED:
                raise
            return cid, None
        self.latencies.append(time.perf_counter() - start)
        self.ttfts.append(first or 0.0)
        return cid, tuple(ids)

    def run(self) -> None:
        try:
            if self.kind == "malformed":
                rpc, request = malformed(self.rng)
                try:
                    list(getattr(self.stub, rpc)(request, timeout=60))
                    self.failure = "a malformed request was accepted"
                except grpc.RpcError as e:
                    if e.code() not in CLIENT_ERRORS:
                        self.failure = f"malformed: {e.code().name}: {e.details()[:100]}"
                return
            cancel = self.rng.randint(2, 6) if self.kind == "cancelled" else None
            cid, ids = self.turn("", self.prompt, cancel)
            if ids is not None:
                self.first_reply = ids
            try:
                self.turn(cid, "and then?")
            except grpc.RpcError as e:
                self.lost = e.code() == grpc.StatusCode.NOT_FOUND
                raise
            self.stub.EndConversation(pb.EndConversationRequest(conversation_id=cid))
        except grpc.RpcError as e:
            self.failure = f"{e.code().name}: {e.details()[:100]}"
        except Exception as e:  # noqa: BLE001 - counted as a failure
            self.failure = f"{type(e).__name__}: {e}"


def run_round(stub, streams: int, cancel: float, bad: float, params, seed: int,
              peak: list[float]) -> list[Client]:
    rng = random.Random(seed)
    kinds = ["malformed"] * round(streams * bad) + ["cancelled"] * round(streams * cancel)
    kinds += ["ok"] * (streams - len(kinds))
    rng.shuffle(kinds)
    clients = [Client(stub, i, k, params, rng.getrandbits(32)) for i, k in enumerate(kinds)]
    stop = threading.Event()

    def watch():
        while not stop.wait(0.05):
            peak.append(rss_mib())
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        list(pool.map(Client.run, clients))
    stop.set()
    watcher.join()
    return clients


def summarize(clients: list[Client], seconds: float) -> dict[str, Any]:
    well = [c for c in clients if c.kind != "malformed"]
    replies: dict[str, set] = {}
    for c in clients:
        if c.kind == "ok" and c.first_reply is not None:
            replies.setdefault(c.prompt, set()).add(c.first_reply)
    lat = [x for c in clients for x in c.latencies]
    ttft = [x for c in clients for x in c.ttfts]
    pct = (lambda xs, q: round(float(np.percentile(xs, q)), 4) if xs else None)
    return {
        "streams": len(clients), "seconds": round(seconds, 2),
        "well_formed": len(well), "cancelled": sum(c.kind == "cancelled" for c in clients),
        "malformed": sum(c.kind == "malformed" for c in clients),
        "well_formed_failures": sum(c.failure is not None for c in well),
        "malformed_mishandled": sum(c.failure is not None for c in clients
                                    if c.kind == "malformed"),
        "conversations_lost": sum(c.lost for c in clients),
        "inconsistent_replies": sum(len(r) - 1 for r in replies.values()),
        "failures": sorted({c.failure for c in clients if c.failure})[:10],
        "turns": len(lat), "turn_latency_p50_s": pct(lat, 50), "turn_latency_p99_s": pct(lat, 99),
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--cancel", type=float, default=0.10)
    parser.add_argument("--malformed", type=float, default=0.05)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    engine = Engine.from_pretrained(args.model, max_model_len=512, page_size=16,
                                    num_pages=2048, max_batched_tokens=256,
                                    max_num_seqs=args.max_num_seqs)
    params = sampling_to_proto(SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
    result: dict[str, Any] = {**environment(argv, __file__), "model": args.model,
                              "options": vars(args)}
    with BackgroundServer(engine, max_streams=args.streams * 2) as server, \
            grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.PensieveStub(channel)
        run_round(stub, args.streams, args.cancel, args.malformed, params, 1, [])   # warm-up
        gc.collect()
        time.sleep(1.0)
        base = rss_mib()
        peak: list[float] = []
        start = time.perf_counter()
        clients = run_round(stub, args.streams, args.cancel, args.malformed, params, 2, peak)
        seconds = time.perf_counter() - start
        deadline = time.monotonic() + 30
        while (s := engine.stats())["running"] or s["waiting"]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        stats = stub.GetStats(pb.GetStatsRequest())
        gc.collect()
        time.sleep(1.0)
        after = rss_mib()
        result["load"] = summarize(clients, seconds)
        result["memory"] = {
            "rss_baseline_mib": round(base, 1), "rss_peak_mib": round(max(peak, default=base), 1),
            "rss_after_mib": round(after, 1), "rss_growth_mib": round(after - base, 1),
            "server_conversations_after": stats.server_conversations,
            "engine_conversations_after": stats.conversations,
            "device_pages_used_after": stats.pages_used}
    engine.close()
    load, mem = result["load"], result["memory"]
    print(f"{load['streams']} streams in {load['seconds']} s: well-formed failures "
          f"{load['well_formed_failures']}, conversations lost {load['conversations_lost']}, "
          f"malformed mishandled {load['malformed_mishandled']}, inconsistent replies "
          f"{load['inconsistent_replies']}; turn latency p50 {load['turn_latency_p50_s']} s, "
          f"p99 {load['turn_latency_p99_s']} s; RSS {mem['rss_baseline_mib']} -> peak "
          f"{mem['rss_peak_mib']} -> after {mem['rss_after_mib']} MiB; conversations after: "
          f"server {mem['server_conversations_after']}, engine "
          f"{mem['engine_conversations_after']}, pages used {mem['device_pages_used_after']}")
    for failure in load["failures"]:
        print("  failure:", failure)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
