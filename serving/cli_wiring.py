"""What `pensieve serve|router|cluster` build from their security and HTTP options: the API keys,
TLS, limits and the server's internal port options, and the OpenAI HTTP gateway
(serving/http) started next to a gRPC port."""

from __future__ import annotations

from typing import TYPE_CHECKING

from serving.auth import ApiKeys
from serving.limits import Limits
from serving.tls import ServerTls, read_pem, scheme

if TYPE_CHECKING:
    from serving.cli_options import HttpOptions, SecurityOptions, Serve
    from serving.server.internal import InternalOptions

WILDCARDS = ("0.0.0.0", "::", "[::]", "")


class OptionError(ValueError):
    """A security option names a file that cannot be read, or a value out of range (the
    command exits with status 2 and this message)."""


def api_keys(options: "SecurityOptions") -> ApiKeys:
    """--api-key (repeated), --api-keys-file and PENSIEVE_API_KEY."""
    try:
        return ApiKeys.from_options(options.api_key, options.api_keys_file)
    except OSError as e:
        raise OptionError(f"--api-keys-file: {e}") from None


def server_tls(options: "SecurityOptions") -> ServerTls | None:
    """--tls-cert and --tls-key (both or neither)."""
    try:
        return ServerTls.from_options(options.tls_cert, options.tls_key)
    except (ValueError, OSError) as e:
        raise OptionError(str(e)) from None


def limits(options: "SecurityOptions", max_conversations: int | None = None) -> Limits:
    """--max-request-bytes and --max-conversations."""
    try:
        return Limits(max_request_bytes=options.max_request_bytes,
                      max_conversations=max_conversations)
    except ValueError as e:
        raise OptionError(str(e)) from None


def ca_certificate(path: str | None, option: str) -> bytes | None:
    """The PEM a --*-tls-ca option names (None: no TLS)."""
    try:
        return read_pem(path, option) if path is not None else None
    except (ValueError, OSError) as e:
        raise OptionError(str(e)) from None


def internal_options(args: "Serve") -> "InternalOptions":
    """--internal-host, --internal-port, --peer and --peer-tls-ca."""
    from serving.server.internal import InternalOptions
    return InternalOptions(args.internal_host, args.internal_port, tuple(args.peer),
                           ca_certificate(args.peer_tls_ca, "--peer-tls-ca"))


def dial_target(host: str, port: int) -> str:
    """An address this machine reaches a server bound to host:port at (loopback for a
    wildcard bind)."""
    return f"{'127.0.0.1' if host in WILDCARDS else host}:{port}"


async def start_http(http: "HttpOptions", host: str, grpc_port: int, model_name: str,
                     keys: ApiKeys, tls: ServerTls | None, max_request_bytes: int,
                     metrics_registry=None):
    """With --http-port: the OpenAI HTTP gateway over the gRPC port (same keys, TLS and
    request cap), started and announced; else None. Its gRPC calls trust the server's own
    certificate (self-signed, or a file carrying its chain up to the root)."""
    if http.http_port is None:
        return None
    from serving.http import HttpGateway
    gateway = HttpGateway(dial_target(host, grpc_port), model_name=http.served_model_name or
                          model_name, api_keys=keys,
                          grpc_credentials=tls.self_trust() if tls is not None else None,
                          max_request_bytes=max_request_bytes, metrics_registry=metrics_registry)
    port = await gateway.start(host, http.http_port,
                               ssl_certfile=tls.cert_file if tls is not None else None,
                               ssl_keyfile=tls.key_file if tls is not None else None)
    print(f"pensieve: OpenAI API on {scheme(tls)}://{host}:{port}/v1", flush=True)
    return gateway


async def stop_http(gateway) -> None:
    if gateway is not None:
        await gateway.shutdown()


__all__ = ["OptionError", "api_keys", "ca_certificate", "dial_target", "internal_options", "limits", "server_tls", "start_http",
           "stop_http"]
