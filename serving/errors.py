"""Errors of the serving layer and how they travel as gRPC status codes.

Server side, `status_for(exc)` maps what the engine and the server raise to a status code and a
message. Client side, `from_rpc_error(err)` turns a status back into an exception that is both a
`RemoteError` (with `.code`) and the exception the in-process API raises for the same problem,
so `except ValueError` / `except EngineOverloaded` work the same locally and remotely:

    | status              | server raises (examples)                          | client raises      |
    |---------------------|---------------------------------------------------|--------------------|
    | INVALID_ARGUMENT    | ValueError, TypeError: no messages, unknown role,  | InvalidArgument    |
    |                     | bad sampling values, prompt over max_model_len     |   (ValueError)     |
    | NOT_FOUND           | ConversationNotFound, SessionClosed                | NotFound           |
    | FAILED_PRECONDITION | TurnInProgress, engine ConversationBusy            | FailedPrecondition |
    | RESOURCE_EXHAUSTED  | EngineOverloaded (max_queued_requests),            | ResourceExhausted  |
    |                     | TooManyConversations (max_conversations)           |                    |
    | DEADLINE_EXCEEDED   | (the client's deadline passed)                     | DeadlineExceeded   |
    | UNAVAILABLE         | ShuttingDown, NotReady (the warm-up failed)        | Unavailable        |
    | UNAUTHENTICATED     | serving.auth.Unauthenticated (no or a wrong key)   | UnauthenticatedError |
    | INTERNAL            | anything else, e.g. engine TurnFailed              | RemoteError        |

Messages quote client input through `clip()`: at most ~100 characters of it. An INTERNAL
status says only "internal error (request id X)": the server logs the error with that id.
"""

from __future__ import annotations

import grpc

from pensieve_jax.engine.errors import EngineOverloaded, TurnFailed
from pensieve_jax.kvcache.errors import ConversationBusy
from pensieve_jax.session import SessionClosed
from serving.auth import Unauthenticated

ECHO_CHARS = 100      # at most this much of a client's input is quoted back in an error


def clip(value: object, limit: int = ECHO_CHARS) -> str:
    """repr() of client input for an error message, cut to about `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


class ConversationNotFound(LookupError):
    """No such conversation: never started, ended, or expired (conversation_ttl_s)."""


class TurnInProgress(RuntimeError):
    """The conversation's previous turn is still running."""


class TooManyConversations(EngineOverloaded):
    """The server holds max_conversations conversations and every one has a turn running."""


class ShuttingDown(RuntimeError):
    """The server is draining and takes no new turns."""


class NotReady(RuntimeError):
    """The server cannot take turns: its engine failed to warm up (or it stopped first)."""


def status_for(exc: BaseException, request_id: str | None = None) -> tuple[grpc.StatusCode, str]:
    """The status code and message a server reports for an exception. An INTERNAL one tells no
    internals: "internal error (request id X)" (request_id, or a TurnFailed's own), which the
    server logs with the error."""
    code = grpc.StatusCode.INTERNAL
    if isinstance(exc, EngineOverloaded):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    elif isinstance(exc, (TurnInProgress, ConversationBusy)):
        code = grpc.StatusCode.FAILED_PRECONDITION
    elif isinstance(exc, (ConversationNotFound, SessionClosed)):
        code = grpc.StatusCode.NOT_FOUND
    elif isinstance(exc, (ValueError, TypeError)):
        code = grpc.StatusCode.INVALID_ARGUMENT
    elif isinstance(exc, TimeoutError):
        code = grpc.StatusCode.DEADLINE_EXCEEDED
    elif isinstance(exc, (ShuttingDown, NotReady)):
        code = grpc.StatusCode.UNAVAILABLE
    elif isinstance(exc, Unauthenticated):
        code = grpc.StatusCode.UNAUTHENTICATED
    if code == grpc.StatusCode.INTERNAL:
        request_id = request_id or (exc.request_id if isinstance(exc, TurnFailed) else None)
        return code, f"internal error (request id {request_id})" if request_id else \
            "internal error"
    return code, str(exc) or type(exc).__name__


class RemoteError(Exception):
    """A failed call; `code` is its grpc.StatusCode, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(RemoteError, ValueError):
    pass


class NotFound(RemoteError, ConversationNotFound):
    pass


class FailedPrecondition(RemoteError, TurnInProgress):
    pass


class ResourceExhausted(RemoteError, EngineOverloaded):
    pass


class DeadlineExceeded(RemoteError, TimeoutError):
    pass


class Unavailable(RemoteError, ConnectionError):
    pass


class UnauthenticatedError(RemoteError, Unauthenticated):
    pass


_CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def from_rpc_error(err: grpc.RpcError) -> RemoteError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    return _CLIENT_ERRORS.get(code, RemoteError)(code, details)
