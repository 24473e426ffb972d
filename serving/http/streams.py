"""Server-sent events and client disconnects.

A turn's gRPC call is cancelled as soon as its HTTP client goes away:
- before the response starts (queued, prefilling, or a whole non-streamed reply), by racing the
  work against the client's http.disconnect (`unless_disconnected`);
- while streaming, by Starlette's StreamingResponse, which cancels the body iterator when the
  client disconnects; the iterator's `finally` cancels the call (serving/http/upstream.py).
An error after the response started goes out as a last event (`error_event`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, TypeVar

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from serving.http.errors import ApiError

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"
CLIENT_CLOSED = 499          # nginx's code for a client that closed the request (never sent)


class ClientGone(Exception):
    """The HTTP client disconnected before its response started."""


def data(obj: Any) -> bytes:
    """One SSE `data:` event of a JSON object (chat and completions streams)."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def named(event: str, obj: Any) -> bytes:
    """One SSE event with an `event:` name (Responses streams)."""
    return f"event: {event}\n".encode() + data(obj)


def error_event(err: ApiError) -> bytes:
    return data(err.body())


def event_stream(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


def client_closed() -> Response:
    return Response(status_code=CLIENT_CLOSED)


async def _disconnected(request: Request) -> None:
    """Return once the client has disconnected (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """await work, cancelling it (and raising ClientGone) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task in done:
        return task.result()
    raise ClientGone()


async def first(stream: AsyncIterator[T], request: Request) -> tuple[T | None, AsyncIterator[T]]:
    """The stream's first item (None if it is empty) and the stream, started: errors before
    the first item surface here, so they can still be answered with their HTTP status."""
    try:
        item = await unless_disconnected(request, anext(stream))
    except StopAsyncIteration:
        return None, stream
    return item, stream
