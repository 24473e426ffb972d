"""grpc.aio channels from one server to another (a router to its replicas, a replica to its
peers): TLS when credentials are given, and metadata every call on the channel carries (the
cluster secret on a channel to an internal port).

    channel = aio_channel("10.0.0.2:50061", GRPC_OPTIONS, credentials=None,
                          metadata=secret.metadata())
"""

from __future__ import annotations

from typing import Any, Sequence

import grpc
from grpc.aio import Metadata


class _AddMetadata:
    """Adds fixed metadata to a call's details."""

    def __init__(self, metadata: Sequence[tuple[str, str]]):
        self.metadata = tuple(metadata)

    def details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        merged = Metadata.from_tuple(tuple(d.metadata or ()) + self.metadata)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, merged, d.credentials,
                                          d.wait_for_ready)


# grpc.aio files an interceptor under one kind of call only: one class per kind
class _UnaryUnary(_AddMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self.details(client_call_details), request)


class _UnaryStream(_AddMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self.details(client_call_details), request)


class _StreamUnary(_AddMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self.details(client_call_details), request_iterator)


class _StreamStream(_AddMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details,
                                      request_iterator):
        return await continuation(self.details(client_call_details), request_iterator)


def call_metadata(metadata: Sequence[tuple[str, str]]) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors adding `metadata` to every call of their channel, of every kind."""
    return [kind(metadata) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def aio_channel(target: str, options: Sequence[tuple[str, Any]] = (),
                credentials: grpc.ChannelCredentials | None = None,
                metadata: Sequence[tuple[str, str]] = ()) -> grpc.aio.Channel:
    """A grpc.aio channel to target: TLS with credentials (else plaintext); every call carries
    `metadata`."""
    interceptors = call_metadata(metadata) if metadata else None
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, list(options),
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(target, list(options), interceptors=interceptors)


__all__ = ["aio_channel", "call_metadata"]
