"""Command line: `pensieve serve` (a gRPC server over an engine) and `pensieve chat` (a client).

    pensieve serve --model smollm2-135m-instruct --port 50051 [--metrics-port 9090] [engine options]
    pensieve chat --target 127.0.0.1:50051 [--system "Be brief."]
    pensieve cluster --replicas 3 --model random:tiny --port 50051 [--policy e2] [engine options]
    pensieve router --replica HOST:PORT --replica HOST:PORT [--model M] --port 50051
        [--conversation-ttl-s S] [--max-conversations N]

Also `python -m serving ...`. The server binds to 127.0.0.1 unless --host says otherwise.
`pensieve COMMAND --help` lists a command's options (serving/cli_options.py; the engine options
are EngineConfig's fields, with their docstrings as help).

`pensieve serve` opens its port first ("pensieve: serving MODEL on HOST:PORT") with gRPC health
NOT_SERVING while the engine compiles its programs, then reports SERVING ("pensieve: warm after
S s ..."); turns sent meanwhile wait for the warm-up. PENSIEVE_JAX_PRECOMPILE=0: no warm-up
(programs compile on first use), SERVING at once. `pensieve cluster` reports ready once every
replica is SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from pensieve_jax.engine.sampling import SamplingParams
from serving.cli_options import (DEFAULT_PORT, Chat, Cluster, Router, Serve, engine_flags,
                                 engine_options, parse_args)

__all__ = ["DEFAULT_PORT", "engine_flags", "engine_options", "main", "parse_args"]


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _cluster(args: Cluster) -> None:
    from serving.cluster import Cluster as ReplicaCluster, ClusterConfig
    from serving.router import E2Config

    r = args.routing
    replicas = args.replicas if args.replicas is not None else \
        (0 if args.prefill or args.decode else 2)
    config = ClusterConfig(args.model, replicas, r.policy, r.host, r.port,
                           args.dtype, tuple(engine_options(args).items()), args.subprocess,
                           args.gpus, r.health_period,
                           E2Config(rebalance_threshold=r.rebalance_threshold),
                           prefill=args.prefill, decode=args.decode, kv_move=r.kv_move,
                           cache_report_interval_s=r.cache_report_interval,
                           max_conversations=r.max_conversations)
    cluster = ReplicaCluster(config)
    try:
        await cluster.start()
        print(f"pensieve: replicas on {', '.join(cluster.targets)}", flush=True)
        print(f"pensieve: routing ({r.policy}) {args.model} on {cluster.target}", flush=True)
        await _until_signal()
        print("pensieve: shutting down", flush=True)
    finally:
        await cluster.shutdown()
    print("pensieve: stopped", flush=True)


async def _router(args: Router) -> None:
    from serving.router import E2Config, RouterServer, load_router_tokenizer

    r = args.routing
    tokenizer = load_router_tokenizer(args.model)
    router = RouterServer(list(args.replica), r.policy, tokenizer, r.host, r.port,
                          r.health_period,
                          e2=E2Config(rebalance_threshold=r.rebalance_threshold),
                          kv_move=r.kv_move,     # replica roles: learned from GetStats
                          cache_report_interval_s=r.cache_report_interval,
                          conversation_ttl_s=args.conversation_ttl_s,
                          max_conversations=r.max_conversations)
    await router.start()
    print(f"pensieve: routing ({r.policy}) on {router.target} to {', '.join(args.replica)}",
          flush=True)
    try:
        await _until_signal()
    finally:
        await router.shutdown()
    print("pensieve: stopped", flush=True)


# -- serve ------------------------------------------------------------------------------------

async def _serve(args: Serve) -> int:
    from pensieve_jax.engine.engine import Engine
    from serving.server import Metrics, PensieveServer, describe_programs, warm_up_later

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

def _chat(args: Chat) -> int:
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
    args = parse_args(argv)
    if isinstance(args, Chat):
        return _chat(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if isinstance(args, Serve):
        return asyncio.run(_serve(args))
    asyncio.run(_cluster(args) if isinstance(args, Cluster) else _router(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
