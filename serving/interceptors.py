"""Who may call: grpc.aio server interceptors that refuse a call before its handler runs (and
before its request is parsed).

    | guard                 | on                         | refuses                              |
    |-----------------------|----------------------------|--------------------------------------|
    | api_key_guard         | the public port (a server, | a call without "authorization:       |
    |                       | a router)                  | Bearer KEY" of a configured key:     |
    |                       |                            | UNAUTHENTICATED. gRPC health stays   |
    |                       |                            | open (load balancers' probes)        |
    | cluster_secret_guard  | a server's internal port   | no x-pensieve-cluster-secret:        |
    |                       | (MemPool)                  | UNAUTHENTICATED; a wrong one:        |
    |                       |                            | PERMISSION_DENIED                    |

A method the server does not serve stays UNIMPLEMENTED, whoever calls it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health

from serving.auth import CLUSTER_SECRET_METADATA, ApiKeys, ClusterSecret, Unauthenticated

Denial = tuple[grpc.StatusCode, str]
Check = Callable[[Sequence], "Denial | None"]     # invocation metadata -> None (allowed) or why not
HEALTH_METHODS = f"/{health.SERVICE_NAME}/"        # "/grpc.health.v1.Health/"


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
             message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with code; the request is
    never parsed (no deserializer)."""
    async def refuse(request, context):
        await context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class CallGuard(grpc.aio.ServerInterceptor):
    """Refuses every call whose metadata `check` denies, except methods under `open_prefixes`
    (e.g. gRPC health)."""

    def __init__(self, check: Check, open_prefixes: Sequence[str] = ()):
        self.check = check
        self.open_prefixes = tuple(open_prefixes)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self.open_prefixes):
            return handler
        denied = self.check(handler_call_details.invocation_metadata)
        return handler if denied is None else _refusal(handler, *denied)


def api_key_guard(api_keys: ApiKeys) -> CallGuard:
    """Every call but gRPC health needs one of api_keys (metadata authorization: Bearer KEY)."""
    def check(metadata) -> Denial | None:
        try:
            api_keys.owner_from_metadata(metadata)
        except Unauthenticated as e:
            return grpc.StatusCode.UNAUTHENTICATED, str(e)
        return None
    return CallGuard(check, (HEALTH_METHODS,))


def cluster_secret_guard(secret: ClusterSecret) -> CallGuard:
    """Every call needs the cluster secret (metadata x-pensieve-cluster-secret)."""
    def check(metadata) -> Denial | None:
        ok = secret.check(metadata)
        if ok is None:
            return (grpc.StatusCode.UNAUTHENTICATED,
                    f"internal service: send the cluster secret as metadata "
                    f"{CLUSTER_SECRET_METADATA!r}")
        return None if ok else (grpc.StatusCode.PERMISSION_DENIED, "wrong cluster secret")
    return CallGuard(check)


def public_interceptors(api_keys: ApiKeys | None) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors of a public port: the API key guard when keys are configured."""
    return [api_key_guard(api_keys)] if api_keys is not None and api_keys.enabled else []


__all__ = ["CallGuard", "HEALTH_METHODS", "api_key_guard", "cluster_secret_guard",
           "public_interceptors"]
