"""Command line: `pensieve serve` (a gRPC server over an engine) and `pensieve chat` (a client).

    pensieve serve --model smollm2-135m-instruct --port 50051 [--metrics-port 9090] [engine options]
    pensieve chat --target 127.0.0.1:50051 [--system "Be brief."]
    pensieve cluster --replicas 3 --model random:tiny --port 50051 [--policy e2] [engine options]
    pensieve router --replica HOST:PORT --replica HOST:PORT [--model M] --port 50051
        [--conversation-ttl-s S] [--max-conversations N]

Also `python -m serving ...`. The server binds to 127.0.0.1 unless --host says otherwise.

`pensieve serve` opens its port first ("pensieve: serving MODEL on HOST:PORT") with gRPC health
NOT_SERVING while the engine compiles its programs, then reports SERVING ("pensieve: warm after
S s ..."); turns sent meanwhile wait for the warm-up. PENSIEVE_JAX_PRECOMPILE=0: no warm-up
(programs compile on first use), SERVING at once. `pensieve cluster` reports ready once every
replica is SERVING.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys

from pensieve_jax.engine.engine import EngineConfig
from pensieve_jax.engine.sampling import SamplingParams

DEFAULT_PORT = 50051


def _option_type(annotation: str):
    for name, kind in (("bool", None), ("int", int), ("float", float), ("str", str)):
        if annotation.split("|")[0].strip() == name:
            return kind
    return str


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine options (EngineConfig; unset: the engine's default)")
    for field in dataclasses.fields(EngineConfig):
        kind = _option_type(str(field.type))
        if kind is None:
            continue
        group.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=kind,
                           default=None, metavar=field.name.upper())


def engine_options(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
            if getattr(args, f.name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pensieve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over gRPC")
    serve.add_argument("--model", required=True,
                       help="smollm2-135m-instruct, a .gguf file, a Hugging Face or converted "
                            "directory, or random:<preset>")
    serve.add_argument("--dtype", default="float32")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="0: pick a free port")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="serve Prometheus metrics over HTTP on this port (0: a free one)")
    serve.add_argument("--grace", type=float, default=10.0,
                       help="seconds in-flight turns may finish at shutdown before they are "
                            "cancelled")
    serve.add_argument("--no-cache-dir", action="store_true",
                       help="do not keep a converted copy of the model")
    serve.add_argument("--role", choices=("prefill", "decode", "both"), default="both",
                       help="what a router uses this replica for (prefill/decode "
                            "disaggregation; default both)")
    _add_engine_options(serve)
    cluster = sub.add_parser("cluster", help="N replica servers and a router in front of them")
    cluster.add_argument("--replicas", type=int, default=None,
                         help="replicas that prefill and decode (default 2, or 0 with "
                              "--prefill/--decode)")
    cluster.add_argument("--prefill", type=int, default=0,
                         help="prefill-only replicas (disaggregation: prompts run there, their "
                              "KV moves to a decode replica through MemPool)")
    cluster.add_argument("--decode", type=int, default=0, help="decode-only replicas")
    cluster.add_argument("--model", required=True)
    cluster.add_argument("--dtype", default="float32")
    cluster.add_argument("--subprocess", action="store_true",
                         help="run each replica as a `pensieve serve` process (default: in "
                              "process, one copy of the weights)")
    cluster.add_argument("--gpus", type=int, default=0,
                         help="with --subprocess: pin replica i to GPU i %% GPUS")
    _add_router_options(cluster)
    _add_engine_options(cluster)
    router = sub.add_parser("router", help="a router in front of running replica servers")
    router.add_argument("--replica", action="append", required=True, metavar="HOST:PORT")
    router.add_argument("--model", default=None,
                        help="the replicas' model, for its tokenizer (exact token ids in the "
                             "prefix tree and on failover); unset: key on UTF-8 bytes")
    router.add_argument("--conversation-ttl-s", "--conversation-ttl", dest="conversation_ttl_s",
                        type=float, default=None, metavar="SECONDS",
                        help="forget a conversation idle this long (and end it on the "
                             "replicas), as `pensieve serve --conversation-ttl-s` does; default: "
                             "never (`pensieve cluster` uses the replicas' --conversation-ttl-s)")
    _add_router_options(router)
    chat = sub.add_parser("chat", help="chat with a server, replies streamed")
    chat.add_argument("--target", default=f"127.0.0.1:{DEFAULT_PORT}", help="host:port")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--top-k", type=int, default=0)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--timeout", type=float, default=None, help="deadline per turn, seconds")
    return parser


def _add_router_options(parser: argparse.ArgumentParser) -> None:
    from serving.router import MAX_CONVERSATIONS
    from serving.routing import POLICIES
    parser.add_argument("--policy", choices=POLICIES, default="e2")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0: pick a free port")
    parser.add_argument("--health-period", type=float, default=1.0,
                        help="seconds between health checks of the replicas")
    parser.add_argument("--rebalance-threshold", type=float, default=2048.0,
                        help="e2: move a conversation when its replica costs this many "
                             "token-equivalents more than the cheapest")
    parser.add_argument("--kv-move", choices=("auto", "transfer", "recompute"), default="auto",
                        help="a moved conversation: load its KV through MemPool or recompute "
                             "it (auto: the cheaper by measured bandwidth and prefill speed)")
    parser.add_argument("--cache-report-interval", type=float, default=1.0,
                        help="seconds between polls of each replica's MemPool.CacheReport (what "
                             "its cache holds: the prefix tree learns evictions and imports; "
                             "0: never, estimate by LRU)")
    parser.add_argument("--max-conversations", type=int, default=MAX_CONVERSATIONS,
                        help="conversations the router remembers; beyond it the least recently "
                             f"used idle one is forgotten and ended (default {MAX_CONVERSATIONS}; "
                             "0: no cap)")


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _cluster(args: argparse.Namespace) -> None:
    from serving.cluster import Cluster, ClusterConfig
    from serving.routing import E2Config

    replicas = args.replicas if args.replicas is not None else \
        (0 if args.prefill or args.decode else 2)
    config = ClusterConfig(args.model, replicas, args.policy, args.host, args.port,
                           args.dtype, tuple(engine_options(args).items()), args.subprocess,
                           args.gpus, args.health_period,
                           E2Config(rebalance_threshold=args.rebalance_threshold),
                           prefill=args.prefill, decode=args.decode, kv_move=args.kv_move,
                           cache_report_interval_s=args.cache_report_interval,
                           max_conversations=args.max_conversations)
    cluster = Cluster(config)
    try:
        await cluster.start()
        print(f"pensieve: replicas on {', '.join(cluster.targets)}", flush=True)
        print(f"pensieve: routing ({args.policy}) {args.model} on {cluster.target}", flush=True)
        await _until_signal()
        print("pensieve: shutting down", flush=True)
    finally:
        await cluster.shutdown()
    print("pensieve: stopped", flush=True)


async def _router(args: argparse.Namespace) -> None:
    from serving.router import RouterServer
    from serving.router_state import load_router_tokenizer
    from serving.routing import E2Config

    tokenizer = load_router_tokenizer(args.model)
    router = RouterServer(args.replica, args.policy, tokenizer, args.host, args.port,
                          args.health_period,
                          e2=E2Config(rebalance_threshold=args.rebalance_threshold),
                          kv_move=args.kv_move,     # replica roles: learned from GetStats
                          cache_report_interval_s=args.cache_report_interval,
                          conversation_ttl_s=args.conversation_ttl_s,
                          max_conversations=args.max_conversations)
    await router.start()
    print(f"pensieve: routing ({args.policy}) on {router.target} to {', '.join(args.replica)}",
          flush=True)
    try:
        await _until_signal()
    finally:
        await router.shutdown()
    print("pensieve: stopped", flush=True)


# -- serve ------------------------------------------------------------------------------------

async def _serve(args: argparse.Namespace) -> int:
    from pensieve_jax.engine.engine import Engine
    from serving.metrics import Metrics
    from serving.server import PensieveServer, describe_programs, warm_up_later

    # the engine compiles its programs after the port is open (health NOT_SERVING meanwhile)
    options, warm_up = warm_up_later(engine_options(args))
    engine = Engine.from_pretrained(args.model, dtype=args.dtype,
                                    cache_dir=False if args.no_cache_dir else None, **options)
    metrics = Metrics(engine)
    server = PensieveServer(engine, args.host, args.port, metrics=metrics, model_name=args.model,
                            role=args.role, warm_up=warm_up)
    failed: list[BaseException] = []
    stop = asyncio.Event()

    async def report_warm() -> None:
        try:
            await server.wait_ready()
        except Exception as e:
            failed.append(e)
            print(f"pensieve: {e}", file=sys.stderr, flush=True)
            stop.set()
            return
        if server.warm_s is not None:
            print(f"pensieve: warm after {server.warm_s:.1f} s"
                  f"{describe_programs(server.programs)}; health SERVING", flush=True)

    warming = None
    try:
        await server.start()
        if args.metrics_port is not None:
            port = metrics.serve(args.metrics_port, args.host)
            print(f"pensieve: metrics on http://{args.host}:{port}/metrics", flush=True)
        print(f"pensieve: serving {args.model} on {server.target}", flush=True)
        warming = asyncio.create_task(report_warm())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("pensieve: shutting down", flush=True)
        await server.shutdown(args.grace)
    finally:
        if warming is not None:
            warming.cancel()
        metrics.close()
        engine.shutdown()
    print("pensieve: stopped", flush=True)
    return 1 if failed else 0


# -- chat -------------------------------------------------------------------------------------

def _chat(args: argparse.Namespace) -> int:
    from serving.client import connect
    from serving.errors import RemoteError

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    client = connect(args.target, timeout=args.timeout)
    interactive = sys.stdin.isatty()
    session = client.session(system=args.system)
    if interactive:
        print(f"connected to {args.target}; an empty line or Ctrl-D quits, Ctrl-C stops a reply")
    try:
        while True:
            try:
                line = input("> " if interactive else "")
            except (EOFError, KeyboardInterrupt):
                break
            if not line.strip():
                break
            pieces = session.stream(line, params)
            try:
                for piece in pieces:
                    print(piece, end="", flush=True)
            except KeyboardInterrupt:
                pieces.close()
                print(" [stopped]", end="")
            except RemoteError as e:
                print(f"error: {e}", file=sys.stderr)
            print(flush=True)
    finally:
        try:
            session.close()
        except RemoteError:
            pass
        client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        return asyncio.run(_serve(args))
    if args.command in ("cluster", "router"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        asyncio.run(_cluster(args) if args.command == "cluster" else _router(args))
        return 0
    return _chat(args)


if __name__ == "__main__":
    sys.exit(main())
