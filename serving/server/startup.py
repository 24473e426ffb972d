"""PensieveServer: the Pensieve service, gRPC health (grpc.health.v1) and server reflection on the
public port, MemPool on the internal port (serving/server/internal.py), started and shut down on
a grpc.aio event loop, warmed up in the background (serving/server/warm_up.py).

Security on the public port: api_keys (every call but health needs one: interceptors.py), TLS
(tls: serving.tls.ServerTls), and a cap on the size of a request message
(limits.max_request_bytes, enforced by gRPC before parsing: RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.auth import ApiKeys, ClusterSecret
from serving.errors import NotReady
from serving.interceptors import public_interceptors
from serving.limits import Limits
from serving.mempool import MemPoolService
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.server.internal import LOOPBACK, InternalOptions, InternalServer, peer_credentials
from serving.server.metrics import Metrics
from serving.server.service import SERVICE_NAME, PensieveService
from serving.server.state import KeptConversations
from serving.server.warm_up import describe_programs
from serving.tls import ServerTls

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine

log = logging.getLogger(__name__)

DEFAULT_HOST = LOOPBACK
ROLES = ("prefill", "decode", "both")      # what a router may use a replica for


class PensieveServer:
    """The service plus gRPC health (grpc.health.v1) and server reflection on the public port;
    MemPool on the internal port.

    warm_up: after start() opens the port (health NOT_SERVING), run engine.warm_up() on a
    background thread, then report SERVING (`wait_ready()`); turns wait for it. Without it (or
    for an engine without warm_up) health is SERVING from start().

    api_keys: the keys callers must send (None or none: no authentication). limits: what a
    request may ask (max_request_bytes caps the public port's messages). tls: the public (and
    internal) port's certificate. internal: where MemPool listens and its peers; cluster_secret:
    what MemPool's callers must send (None: a random one). options: more gRPC server options
    for the public port. state_dir: keep Chat conversations across restarts there
    (serving/server/state.py; the engine's own if it was built with one, as `pensieve serve
    --state-dir` does; else the engine's disk tier should use its kv/ folder)."""

    def __init__(self, engine: "Engine", host: str = DEFAULT_HOST, port: int = 0,
                 metrics: Metrics | None = None, model_name: str | None = None,
                 max_streams: int = 1024, options: list[tuple[str, Any]] | None = None,
                 role: str = "both", warm_up: bool = False, *, api_keys: ApiKeys | None = None,
                 limits: Limits | None = None, tls: ServerTls | None = None,
                 internal: InternalOptions | None = None,
                 cluster_secret: str | ClusterSecret | None = None, state_dir: str | None = None):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.engine = engine
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.metrics = metrics
        self.api_keys = api_keys if api_keys is not None else ApiKeys()
        self.limits = limits if limits is not None else Limits()
        self.tls = tls
        self.service = PensieveService(engine, metrics, model_name, max_streams,
                                       api_keys=self.api_keys, limits=self.limits)
        self.service.role = role
        self.kept = KeptConversations(engine, state_dir) if state_dir is not None or \
            getattr(engine, "kept", None) is not None else None
        self.service.conversations.kept = self.kept
        internal = internal if internal is not None else InternalOptions()
        self.cluster_secret = cluster_secret if isinstance(cluster_secret, ClusterSecret) \
            else ClusterSecret(cluster_secret)
        self.mempool = MemPoolService(self.service, internal.peers, self.cluster_secret,
                                      peer_credentials(internal))
        self.service.mempool = self.mempool
        self.internal = InternalServer(self.mempool, internal, self.cluster_secret, tls)
        self.health = health.aio.HealthServicer()
        self._options = [("grpc.max_receive_message_length", self.limits.max_request_bytes),
                         *(options or ())]
        self._server: grpc.aio.Server | None = None
        self._expiry: asyncio.Task | None = None
        self.warm_up = warm_up and callable(getattr(engine, "warm_up", None))
        self.warm_s: float | None = None      # how long the warm-up took
        self.programs: dict | None = None     # engine.stats()["programs"] after it, if any
        self._warming: asyncio.Task | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def internal_target(self) -> str:
        """Where MemPool listens (HOST:PORT), once started."""
        return self.internal.target

    @property
    def replica_address(self) -> str:
        """This server as a router's --replica: "HOST:PORT,internal=HOST:PORT"."""
        return f"{self.target},internal={self.internal_target}"

    @property
    def ready(self) -> bool:
        """Started, and warm (health SERVING)."""
        return self._server is not None and self.service.warm_up.is_open

    async def wait_ready(self) -> None:
        """Return once the server is warm (health SERVING); raises NotReady if the warm-up
        failed or the server stopped first."""
        await self.service.warm_up.wait()

    async def _warm(self) -> None:
        start = time.monotonic()
        try:
            await asyncio.to_thread(self.engine.warm_up)
            stats = await asyncio.to_thread(self.engine.stats)
        except Exception as e:
            log.error("warm-up failed: turns end UNAVAILABLE", exc_info=e)
            self.service.warm_up.open(
                NotReady(f"the engine failed to warm up: {type(e).__name__}: {e}"))
            return
        self.warm_s = time.monotonic() - start
        self.programs = stats.get("programs") if isinstance(stats, dict) else None
        if self._server is None or self.service.draining:
            return
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.service.warm_up.open()
        log.info("warm after %.1f s%s: health SERVING", self.warm_s, describe_programs(
            self.programs))

    async def start(self) -> int:
        if self.kept is not None:        # before any call can name them
            n = await asyncio.to_thread(self.kept.reopen_all, self.service.conversations)
            log.info("reopened %d kept conversations", n)
        server = grpc.aio.server(options=self._options,
                                 interceptors=public_interceptors(self.api_keys))
        pb_grpc.add_PensieveServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{self.host}:{self.requested_port}"
        self.port = server.add_secure_port(address, self.tls.credentials()) \
            if self.tls is not None else server.add_insecure_port(address)
        await self.internal.start()
        await server.start()
        self._server = server
        status = health_pb2.HealthCheckResponse
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status.NOT_SERVING if self.warm_up else status.SERVING)
        if self.warm_up:
            self.service.warm_up.close()
            self._warming = asyncio.create_task(self._warm())
        if self.service.ttl is not None:
            self._expiry = asyncio.create_task(self.service.expire_loop())
        return self.port

    async def shutdown(self, grace: float = 5.0) -> None:
        """Take no new calls; let in-flight turns finish for up to `grace` seconds, then cancel
        them (each stream still ends cleanly, with finish_reason "abort"). With a state
        directory, the kept conversations' KV then goes to page files in what is left of
        `grace`, the most recently used first (the rest is recomputed after a restart)."""
        if self._server is None:
            return
        deadline = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()
        self.service.warm_up.open(NotReady("the server stopped before its engine was warm"))
        stopping = asyncio.create_task(self._server.stop(grace + 10.0))   # new calls: UNAVAILABLE
        await self.service.drain(grace)
        await stopping
        if self.kept is not None:        # the idle conversations' KV to page files
            start = time.monotonic()
            pages = await asyncio.to_thread(self.kept.flush, deadline)
            log.info("kept conversations flushed: %d pages written in %.2f s (%.2f s of the "
                     "grace were left)", pages, time.monotonic() - start, deadline - start)
            self.kept.close()
        await self.internal.stop(0)
        if self._expiry is not None:
            self._expiry.cancel()
        if self._warming is not None:
            self._warming.cancel()           # its thread finishes the warm-up on its own
        await self.mempool.close()
        self.service.close()
        self._server = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
