"""How an RPC ends and what it counts: the gRPC status of its outcome (serving.errors), and in
the server's Metrics (if any) calls by method and code, streams in progress, finished turns."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import AsyncIterator, Awaitable

import grpc

from pensieve_jax.engine.request import Usage
from serving.errors import status_for
from serving.server.metrics import Metrics

log = logging.getLogger(__name__)


def cancel_code(context) -> grpc.StatusCode:
    """A cancelled call's code: DEADLINE_EXCEEDED past its deadline, else CANCELLED."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
        else grpc.StatusCode.CANCELLED


class CallReporter:
    """Runs the RPCs' bodies: an error ends the call with its status code (INTERNAL ones are
    logged with a request id, the client told only that id); each call's final code, the streams in progress and each finished turn's usage go
    to the metrics."""

    def __init__(self, metrics: Metrics | None = None):
        self.metrics = metrics
        self.active_streams = 0

    def count(self, method: str, code: grpc.StatusCode) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(method, code.name).inc()

    def observe(self, usage: Usage) -> None:
        """A finished turn."""
        if self.metrics is not None:
            self.metrics.observe_turn(usage)

    async def stream(self, method: str, context, responses: AsyncIterator) -> AsyncIterator:
        """A streaming call: responses' items, then its status."""
        self.active_streams += 1
        if self.metrics is not None:
            self.metrics.active.inc()
        error = None
        try:
            async for response in responses:
                yield response
        except asyncio.CancelledError:
            self.count(method, cancel_code(context))
            raise
        except Exception as e:  # reported as a status below
            error = e
        finally:
            await responses.aclose()
            self.active_streams -= 1
            if self.metrics is not None:
                self.metrics.active.dec()
        await self._finish(method, context, error)

    async def unary(self, method: str, context, call: Awaitable):
        """A unary call: call's result, or its error as the call's status."""
        try:
            response = await call
        except asyncio.CancelledError:
            self.count(method, cancel_code(context))
            raise
        except Exception as e:
            await self._finish(method, context, e)
        else:
            self.count(method, grpc.StatusCode.OK)
            return response

    async def _finish(self, method: str, context, error: Exception | None) -> None:
        if error is None:
            self.count(method, grpc.StatusCode.OK)
            return
        request_id = getattr(error, "request_id", None) or secrets.token_hex(8)
        code, message = status_for(error, request_id)
        if code == grpc.StatusCode.INTERNAL:      # the client gets only the request id
            log.error("%s failed (request id %s)", method, request_id, exc_info=error)
        self.count(method, code)
        await context.abort(code, message)
