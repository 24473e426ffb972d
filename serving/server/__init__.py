"""The gRPC server: the pensieve.v1.Pensieve service over an Engine, on grpc.aio.

    server = PensieveServer(engine, port=50051, metrics=Metrics(engine))
    await server.start()
    ...
    await server.shutdown(grace=5.0)   # finish in-flight turns for up to 5 s, then cancel them

`BackgroundServer(engine)` runs one on its own thread (notebooks, tests).

Each Chat conversation is a Session kept here: it holds the exact token history, so the next turn
finds the whole conversation in the engine's cache. The engine loop runs in its own thread; each
streaming call reads its turn in a worker thread that hands chunks to the event loop, so any
number of streams proceed at once. A call that is cancelled, disconnects or passes its deadline
cancels its turn in the engine at once; the conversation keeps what was generated. Idle
conversations expire with the engine's conversation_ttl_s.

Warm-up: `PensieveServer(engine, warm_up=True)` (what `pensieve serve` and `pensieve cluster`
do) opens its port at once with gRPC health NOT_SERVING, compiles the engine's programs
(`engine.warm_up()`) on a background thread, then reports SERVING. Meanwhile health checks,
reflection and GetStats answer; Chat and Generate calls wait behind the warm-up (their deadline
still runs) and then proceed; if the warm-up fails they end UNAVAILABLE. `warm_up_later(options)`
gives the engine options for such a server (the engine's own precompile off).

Security: `PensieveServer(engine, api_keys=ApiKeys(["k"]), tls=ServerTls(cert, key),
limits=Limits(...))`: every call but gRPC health needs a key (serving/interceptors.py), the port
speaks TLS, request messages over limits.max_request_bytes are refused before parsing. MemPool
(KV between replicas) is never on the public port: it listens on the internal port (loopback by
default) behind the cluster secret, and pushes KV only to configured peers (internal.py).

    startup.py        PensieveServer: the service, health and reflection on the public port
    internal.py       the internal port: MemPool behind the cluster secret, its peers
    background.py     BackgroundServer: one on its own thread
    service.py        PensieveService, the servicer, over the parts below
    turns.py          Chat and Generate turns as response streams
    conversations.py  the open Chat conversations, their turns, expiry
    worker.py         worker threads that run the turns; draining at shutdown
    calls.py          status codes of the calls, counted in the metrics
    warm_up.py        the warm-up gate; warm_up_later, describe_programs
    metrics.py        Prometheus metrics on an optional HTTP port
"""

from serving.server.background import BackgroundServer
from serving.server.internal import InternalOptions
from serving.server.metrics import Metrics
from serving.server.service import SERVICE_NAME, PensieveService
from serving.server.startup import DEFAULT_HOST, ROLES, PensieveServer
from serving.server.warm_up import PRECOMPILE_ENV, describe_programs, warm_up_later

__all__ = ["BackgroundServer", "DEFAULT_HOST", "InternalOptions", "Metrics", "PRECOMPILE_ENV",
           "PensieveServer", "PensieveService", "ROLES", "SERVICE_NAME", "describe_programs",
           "warm_up_later"]
