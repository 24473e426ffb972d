"""The gateway's own Prometheus metrics, and GET /metrics (them plus the server's registry).

    pensieve_http_requests_total{route, status}       HTTP requests by route and status code
    pensieve_http_request_duration_seconds{route}     histogram: until the response (a stream:
                                                      its last event) was sent
    pensieve_http_active_requests                     requests in progress (streams included)
"""

from __future__ import annotations

import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0)
ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/responses", "/health",
          "/metrics")


def route_of(path: str) -> str:
    """The route label of a path (ids left out, unknown paths pooled: bounded labels)."""
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{id}"
    return path if path in ROUTES else "other"


class GatewayMetrics:
    """Counters of the gateway, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("pensieve_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.duration = Histogram("pensieve_http_request_duration_seconds",
                                  "HTTP request duration (streams: until the last event)",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.active = Gauge("pensieve_http_active_requests", "HTTP requests in progress",
                            registry=self.registry)

    def exposition(self, server: CollectorRegistry | None) -> Response:
        """GET /metrics: the gateway's metrics, then the server's registry (if any)."""
        body = generate_latest(self.registry)
        if server is not None:
            body += generate_latest(server)
        return Response(body, media_type=CONTENT_TYPE_LATEST)


class CountRequests:
    """ASGI middleware: counts every HTTP request in a GatewayMetrics."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = self.metrics
        route, start, status = route_of(scope.get("path", "")), time.monotonic(), [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        m.active.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            m.active.dec()
            m.requests.labels(route, str(status[0])).inc()
            m.duration.labels(route).observe(time.monotonic() - start)
