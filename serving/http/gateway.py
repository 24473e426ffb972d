"""HttpGateway: the OpenAI-compatible HTTP API (FastAPI on uvicorn) in front of a Pensieve gRPC
target, a `pensieve serve` server or a router, on the running event loop.

    gw = HttpGateway("127.0.0.1:50051", model_name="smollm2", api_keys=ApiKeys(["k"]))
    port = await gw.start("127.0.0.1", 8000)          # 0: a free port
    ...
    await gw.shutdown()

Every request goes on as a gRPC call carrying the caller's key, so the target's validation,
limits and ownership apply unchanged; the gateway itself checks the key (401), the body size
(413, before parsing) and the request's fields (400), and keeps the stored Responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import grpc
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from serving.auth import ApiKeys
from serving.http.app import build_app
from serving.http.context import GatewayContext
from serving.http.metrics import GatewayMetrics
from serving.http.response_store import DEFAULT_MAX_RESPONSES, ResponseStore
from serving.http.upstream import Upstream
from serving.limits import Limits

SHUTDOWN_GRACE_S = 5.0


class _Uvicorn(uvicorn.Server):
    """uvicorn.Server that leaves signal handling to its host (the CLI, a test)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpGateway:
    """The gateway's app and its uvicorn server. `app` is the FastAPI app (for unit tests);
    its gRPC channel opens on start(), or on the first call on the loop that serves `app`."""

    def __init__(self, grpc_target: str, model_name: str, api_keys: ApiKeys | None = None,
                 grpc_credentials: grpc.ChannelCredentials | None = None,
                 max_request_bytes: int = Limits().max_request_bytes,
                 metrics_registry: CollectorRegistry | None = None,
                 max_responses: int = DEFAULT_MAX_RESPONSES):
        if not model_name:
            raise ValueError("model_name is empty")
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
        self.target = grpc_target
        self.context = GatewayContext(
            Upstream(grpc_target, grpc_credentials, max_request_bytes), model_name, api_keys,
            max_request_bytes, ResponseStore(max_responses), GatewayMetrics(),
            metrics_registry)
        self.app: FastAPI = build_app(self.context)
        self.host = "127.0.0.1"
        self.scheme = "http"
        self.port: int | None = None
        self._server: _Uvicorn | None = None
        self._serving: asyncio.Task | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0,
                    ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> int:
        """Listen on host:port (0: a free port) with TLS if a certificate is given; returns
        the port once the server accepts connections."""
        if (ssl_certfile is None) != (ssl_keyfile is None):
            raise ValueError("TLS needs both ssl_certfile and ssl_keyfile")
        self.context.upstream.open()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on such sockets (and their accepted
        # connections), else every small SSE write waits for a delayed ACK (~40 ms)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
        config = uvicorn.Config(self.app, lifespan="off", log_level="warning",
                                access_log=False, ssl_certfile=ssl_certfile,
                                ssl_keyfile=ssl_keyfile,
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        self._server = _Uvicorn(config)
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._serving.done():         # failed to start: raise its error
                self._serving.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        self.port = sock.getsockname()[1]
        self.host = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        self.scheme = "https" if ssl_certfile else "http"
        return self.port

    @property
    def url(self) -> str:
        """The base URL of the OpenAI API ("http://127.0.0.1:PORT/v1"), once started."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/v1"

    async def shutdown(self) -> None:
        """Stop accepting, let requests in flight finish for a few seconds, close the channel
        (cancelling what is still running)."""
        if self._server is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception, SystemExit):
                await self._serving
            self._server = None
        for task in list(self.context.background):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, SHUTDOWN_GRACE_S)
        await self.context.upstream.close()
