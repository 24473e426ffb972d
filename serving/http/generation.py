"""One stateless turn through gRPC Generate, answered whole (JSON) or streamed (SSE), in the
shape of an endpoint (chat completions or completions: a `Shape`)."""

from __future__ import annotations

import dataclasses
import logging
from typing import AsyncIterator, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serving.http.errors import ApiError
from serving.http.streams import (DONE, ClientGone, client_closed, data, error_event,
                                  event_stream, first, unless_disconnected)
from serving.pensieve.v1 import pensieve_pb2 as pb

log = logging.getLogger(__name__)


class Shape(Protocol):
    """How an endpoint writes a turn: whole, or as stream chunks."""

    def whole(self, text: str, finish_reason: str, usage: pb.Usage) -> dict: ...

    def opening(self) -> dict | None: ...            # a first chunk before any text (or None)

    def piece(self, text: str) -> dict: ...

    def closing(self, finish_reason: str) -> dict: ...   # the chunk with the finish reason

    def usage(self, usage: pb.Usage) -> dict: ...     # the usage chunk (include_usage)


@dataclasses.dataclass
class Finished:
    text: str
    finish_reason: str
    usage: pb.Usage
    conversation_id: str


async def collect(responses: AsyncIterator[pb.GenerateResponse]) -> Finished:
    """A whole Generate (or Chat) call: its text, finish reason and usage."""
    pieces, last = [], None
    async for response in responses:
        pieces.append(response.text)
        last = response
    if last is None or not last.finish_reason:
        raise ApiError(502, "the target ended the turn without a result", "server_error",
                       None, "bad_gateway")
    return Finished("".join(pieces), last.finish_reason, last.usage, last.conversation_id)


async def answer(request: Request, responses: AsyncIterator[pb.GenerateResponse],
                 shape: Shape, stream: bool, include_usage: bool) -> Response:
    """The HTTP response of a Generate call: JSON, or SSE chunks then `data: [DONE]`."""
    if not stream:
        try:
            done = await unless_disconnected(request, collect(responses))
        except ClientGone:
            return client_closed()
        return JSONResponse(shape.whole(done.text, done.finish_reason, done.usage))
    try:
        head, responses = await first(responses, request)
    except ClientGone:
        return client_closed()
    return event_stream(_chunks(head, responses, shape, include_usage))


async def _chunks(head: pb.GenerateResponse | None, rest: AsyncIterator[pb.GenerateResponse],
                  shape: Shape, include_usage: bool) -> AsyncIterator[bytes]:
    opening = shape.opening()
    if opening is not None:
        yield data(opening)
    try:
        response = head
        while response is not None:
            if response.text:
                yield data(shape.piece(response.text))
            if response.finish_reason:
                yield data(shape.closing(response.finish_reason))
                if include_usage:
                    yield data(shape.usage(response.usage))
            response = await anext(rest, None)
    except ApiError as e:
        yield error_event(e)
    except Exception as e:                 # the stream must end with an event, not a reset
        log.exception("stream failed")
        yield error_event(ApiError(500, f"the stream failed: {type(e).__name__}",
                                   "server_error", None, "internal_error"))
    yield DONE
