"""Command line: `pensieve serve` (a gRPC server over an engine) and `pensieve chat` (a client).

    pensieve serve --model smollm2-135m-instruct --port 50051 [--metrics-port 9090] [engine options]
    pensieve chat --target 127.0.0.1:50051 [--system "Be brief."]
    pensieve cluster --replicas 3 --model random:tiny --port 50051 [--policy e2] [engine options]
    pensieve router --replica HOST:PORT,internal=PORT --replica ... [--model M] --port 50051
        [--conversation-ttl-s S] [--max-conversations N]

Security (serve, router and cluster): --api-key KEY (repeatable; --api-keys-file, env
PENSIEVE_API_KEY), --tls-cert FILE --tls-key FILE, --max-request-bytes N; `serve` also
--internal-host/--internal-port, --cluster-secret (env PENSIEVE_CLUSTER_SECRET), --peer,
--peer-tls-ca (serving/server/internal.py); `router` --replica-tls-ca, --cluster-secret;
`chat` --api-key, --tls-ca. --http-port PORT [--served-model-name NAME] also serves the OpenAI
API over HTTP (serving/http).

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
import os
import signal
import sys

from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.engine.state_store import StateDirMismatch
from serving import cli_wiring as wiring
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

    r, sec = args.routing, args.security
    replicas = args.replicas if args.replicas is not None else \
        (0 if args.prefill or args.decode else 2)
    keys, tls = wiring.api_keys(sec), wiring.server_tls(sec)
    max_request_bytes = wiring.limits(sec).max_request_bytes
    config = ClusterConfig(args.model, replicas, r.policy, r.host, r.port,
                           args.dtype, tuple(engine_options(args).items()), args.subprocess,
                           args.gpus, r.health_period,
                           E2Config(rebalance_threshold=r.rebalance_threshold),
                           prefill=args.prefill, decode=args.decode, kv_move=r.kv_move,
                           cache_report_interval_s=r.cache_report_interval,
                           max_conversations=r.max_conversations, api_keys=keys.keys, tls=tls,
                           max_request_bytes=max_request_bytes)
    cluster = ReplicaCluster(config)
    gateway = None
    try:
        await cluster.start()
        print(f"pensieve: replicas on {', '.join(cluster.targets)}", flush=True)
        print(f"pensieve: routing ({r.policy}) {args.model} on {cluster.target}", flush=True)
        gateway = await wiring.start_http(args.http, r.host, cluster.router.port, args.model,
                                          keys, tls, max_request_bytes)
        await _until_signal()
        print("pensieve: shutting down", flush=True)
    finally:
        await wiring.stop_http(gateway)
        await cluster.shutdown()
    print("pensieve: stopped", flush=True)


async def _router(args: Router) -> None:
    from serving.auth import CLUSTER_SECRET_ENV, ClusterSecret
    from serving.router import E2Config, RouterServer, load_router_tokenizer
    from serving.router.links import ReplicaLinks
    from serving.tls import channel_credentials

    r, sec = args.routing, args.security
    keys, tls = wiring.api_keys(sec), wiring.server_tls(sec)
    max_request_bytes = wiring.limits(sec).max_request_bytes
    secret = args.cluster_secret or os.environ.get(CLUSTER_SECRET_ENV)
    if not secret and any(",internal=" in spec for spec in args.replica):
        logging.getLogger("serving.router").warning(
            "no --cluster-secret (or %s): the replicas' internal ports will refuse the "
            "router's MemPool calls", CLUSTER_SECRET_ENV)
    links = ReplicaLinks(channel_credentials(wiring.ca_certificate(args.replica_tls_ca,
                                                                   "--replica-tls-ca")),
                         ClusterSecret(secret) if secret else None,
                         keys.keys[0] if keys.enabled else None)
    tokenizer = load_router_tokenizer(args.model)
    router = RouterServer(list(args.replica), r.policy, tokenizer, r.host, r.port,
                          r.health_period, tls=tls, max_request_bytes=max_request_bytes,
                          e2=E2Config(rebalance_threshold=r.rebalance_threshold),
                          kv_move=r.kv_move,     # replica roles: learned from GetStats
                          cache_report_interval_s=r.cache_report_interval,
                          conversation_ttl_s=args.conversation_ttl_s,
                          max_conversations=r.max_conversations, api_keys=keys, links=links)
    await router.start()
    print(f"pensieve: routing ({r.policy}) on {router.target} to {', '.join(args.replica)}",
          flush=True)
    gateway = None
    try:
        gateway = await wiring.start_http(args.http, r.host, router.port,
                                          args.model or "pensieve", keys, tls, max_request_bytes)
        await _until_signal()
    finally:
        await wiring.stop_http(gateway)
        await router.shutdown()
    print("pensieve: stopped", flush=True)


# -- serve ------------------------------------------------------------------------------------

async def _serve(args: Serve) -> int:
    from pensieve_jax.engine.engine import Engine
    from serving.auth import ClusterSecret
    from serving.server import Metrics, PensieveServer, describe_programs, warm_up_later

    # the engine compiles its programs after the port is open (health NOT_SERVING meanwhile)
    sec = args.security
    keys, tls = wiring.api_keys(sec), wiring.server_tls(sec)
    limits, internal = wiring.limits(sec, args.max_conversations), wiring.internal_options(args)
    options, warm_up = warm_up_later(engine_options(args))
    # --state-dir: the engine's disk tier in DIR/kv, its records in DIR (StateDirMismatch)
    engine = Engine.from_pretrained(args.model, dtype=args.dtype,
                                    cache_dir=False if args.no_cache_dir else None,
                                    state_dir=args.state_dir, **options)
    metrics = Metrics(engine)
    server = PensieveServer(engine, args.host, args.port, metrics=metrics, model_name=args.model,
                            role=args.role, warm_up=warm_up, api_keys=keys, limits=limits,
                            tls=tls, internal=internal,
                            cluster_secret=ClusterSecret.from_options(args.cluster_secret),
                            state_dir=args.state_dir)
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

    warming = gateway = None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):   # before the port is announced: a SIGTERM
        loop.add_signal_handler(sig, stop.set)     # right after it still shuts down cleanly
    try:
        await server.start()
        if args.metrics_port is not None:
            port = metrics.serve(args.metrics_port, args.host)
            print(f"pensieve: metrics on http://{args.host}:{port}/metrics", flush=True)
        print(f"pensieve: internal services on {server.internal_target}", flush=True)
        print(f"pensieve: serving {args.model} on {server.target}", flush=True)
        gateway = await wiring.start_http(args.http, args.host, server.port, args.model, keys,
                                          tls, limits.max_request_bytes, metrics.registry)
        warming = asyncio.create_task(report_warm())
        await stop.wait()
        print("pensieve: shutting down", flush=True)
        await wiring.stop_http(gateway)
        gateway = None
        await server.shutdown(args.grace)
    finally:
        await wiring.stop_http(gateway)
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
    from serving.auth import API_KEY_ENV
    client = connect(args.target, timeout=args.timeout,
                     api_key=args.api_key or os.environ.get(API_KEY_ENV),
                     tls_ca=wiring.ca_certificate(args.tls_ca, "--tls-ca"))
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
    try:
        if isinstance(args, Chat):
            return _chat(args)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        if isinstance(args, Serve):
            return asyncio.run(_serve(args))
        asyncio.run(_cluster(args) if isinstance(args, Cluster) else _router(args))
    except (wiring.OptionError, StateDirMismatch) as e:   # a missing key or TLS file, a value
        print(f"pensieve: error: {e}", file=sys.stderr, flush=True)
        return 2                        # out of range, a state dir of another model
    return 0


if __name__ == "__main__":
    sys.exit(main())
