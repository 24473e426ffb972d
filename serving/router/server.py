"""`RouterServer`: the router service (serving/router/service.py) plus gRPC health and
reflection on one port, and the router's background loops (health checks, cache reports,
forgetting idle conversations).

Its port, as a server's: the API keys of its service (every call but health needs one), TLS
(tls), and a cap on a request message's size (max_request_bytes, before parsing)."""

from __future__ import annotations

import asyncio
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.limits import Limits
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.interceptors import public_interceptors
from serving.router.replicas import SERVICE_NAME
from serving.router.service import RouterService
from serving.tls import ServerTls


class RouterServer:
    """The router service plus gRPC health and reflection on one port. kwargs: RouterService's
    (api_keys, links, ...)."""

    def __init__(self, targets: Sequence[str], policy: str = "e2", tokenizer=None,
                 host: str = "127.0.0.1", port: int = 0, health_period_s: float = 1.0, *,
                 tls: ServerTls | None = None,
                 max_request_bytes: int = Limits().max_request_bytes, **kwargs):
        self.service = RouterService(targets, policy, tokenizer, **kwargs)
        self.tls = tls
        self.max_request_bytes = max_request_bytes
        self.host, self.requested_port, self.port = host, port, None
        self.health_period_s = health_period_s
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> int:
        service = self.service
        service.connect()
        # one round of health checks first: a replica still warming up (NOT_SERVING) or not
        # there is marked down before any call can be routed to it
        try:
            await asyncio.wait_for(service.replicas.check_all(), timeout=5)
        except asyncio.TimeoutError:
            pass
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", self.max_request_bytes)],
            interceptors=public_interceptors(service.api_keys))
        pb_grpc.add_PensieveServicer_to_server(service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{self.host}:{self.requested_port}"
        self.port = server.add_secure_port(address, self.tls.credentials()) \
            if self.tls is not None else server.add_insecure_port(address)
        await server.start()
        self._server = server
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        loops = [service.replicas.health_loop(self.health_period_s)]
        period = service.cache.interval_s
        if period > 0 and service.keys.exact:
            loops.append(service.cache.report_loop(period))
        if service.conversations.ttl_s is not None:
            loops.append(service.directory.expiry_loop())
        self._tasks = [asyncio.create_task(loop) for loop in loops]
        return self.port

    async def shutdown(self, grace: float = 5.0) -> None:
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        for task in self._tasks:
            task.cancel()
        await self.service.close()
        self._server = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


__all__ = ["RouterServer"]
