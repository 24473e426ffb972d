"""The gateway's side of gRPC: one grpc.aio channel to the Pensieve target (a server or a
router), its calls as async iterators that raise ApiError (serving/http/errors.py), and the
target's gRPC health.

Every call carries the HTTP caller's API key as metadata (`authorization: Bearer KEY`), so the
target applies its own authentication, ownership, validation and limits unchanged. Leaving a
call's iteration early (the HTTP client went away) cancels the call, and so the turn.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client import SERVICE_CONFIG
from serving.http.errors import from_rpc_error
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc

Metadata = Sequence[tuple[str, str]]
HEALTH_TIMEOUT_S = 2.0


class Upstream:
    """A channel to `target` (TLS with `credentials`), opened on the running event loop."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None,
                 max_send_bytes: int = 4 << 20):
        self.target = target
        self.credentials = credentials
        self.options: list[tuple[str, Any]] = [
            ("grpc.service_config", SERVICE_CONFIG),
            ("grpc.max_send_message_length", max_send_bytes + (64 << 10))]
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.PensieveStub | None = None
        self.health: health_pb2_grpc.HealthStub | None = None

    def open(self) -> None:
        """Open the channel on the running event loop (grpc.aio channels belong to one)."""
        if self.channel is not None:
            return
        if self.credentials is not None:
            self.channel = grpc.aio.secure_channel(self.target, self.credentials, self.options)
        else:
            self.channel = grpc.aio.insecure_channel(self.target, self.options)
        self.stub = pb_grpc.PensieveStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    def _stub(self) -> pb_grpc.PensieveStub:
        self.open()
        return self.stub

    async def _stream(self, call, fields: Mapping[str, str] | None) -> AsyncIterator:
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, fields) from None
        finally:
            call.cancel()               # a no-op once the call has ended

    def generate(self, request: pb.GenerateRequest, metadata: Metadata,
                 fields: Mapping[str, str] | None = None
                 ) -> AsyncIterator[pb.GenerateResponse]:
        """A Generate call's responses; ApiError for a failed call (400 `param` from fields)."""
        return self._stream(self._stub().Generate(request, metadata=tuple(metadata)), fields)

    def chat(self, request: pb.ChatRequest, metadata: Metadata,
             fields: Mapping[str, str] | None = None) -> AsyncIterator[pb.ChatResponse]:
        """A Chat call's responses (the first one, with no text, says the turn was taken)."""
        return self._stream(self._stub().Chat(request, metadata=tuple(metadata)), fields)

    async def end(self, conversation_id: str, metadata: Metadata) -> bool:
        """End a conversation; False if the target does not know it (any more)."""
        try:
            await self._stub().EndConversation(
                pb.EndConversationRequest(conversation_id=conversation_id),
                metadata=tuple(metadata))
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise from_rpc_error(e) from None
        return True

    async def serving(self) -> bool:
        """Whether the target's gRPC health says SERVING."""
        self.open()
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(service=""),
                                            timeout=HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING
