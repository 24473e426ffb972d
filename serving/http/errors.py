"""HTTP errors in OpenAI's shape, and how gRPC status codes of the target become them.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature",
               "code": "invalid_value"}}

    | gRPC status          | HTTP | type                    | code                  |
    |----------------------|------|-------------------------|-----------------------|
    | INVALID_ARGUMENT     | 400  | invalid_request_error   | invalid_value         |
    | UNAUTHENTICATED      | 401  | authentication_error    | invalid_api_key       |
    | NOT_FOUND            | 404  | invalid_request_error   | not_found             |
    | FAILED_PRECONDITION  | 409  | invalid_request_error   | conflict              |
    | RESOURCE_EXHAUSTED   | 429  | rate_limit_error        | queue_full            |
    |   (message too big)  | 413  | invalid_request_error   | request_too_large     |
    | UNAVAILABLE          | 503  | service_unavailable     | unavailable           |
    | DEADLINE_EXCEEDED    | 504  | timeout_error           | timeout               |
    | anything else        | 500  | server_error            | internal_error        |

`param` of a 400 is the request field the target's message names (see `param_in`).
"""

from __future__ import annotations

import re
from typing import Mapping

import grpc
from fastapi.responses import JSONResponse

from serving.errors import clip

_BY_STATUS: dict[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "permission_denied"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "invalid_request_error", "conflict"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "queue_full"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error", "timeout"),
}
_INTERNAL = (500, "server_error", "internal_error")
_TOO_LARGE = re.compile(r"larger than max|too large|max_request_bytes", re.IGNORECASE)


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with HTTP `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"www-authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    """A 400 naming the bad field."""
    return ApiError(400, message, "invalid_request_error", param, code)


def not_found(message: str, param: str | None = None, code: str = "not_found") -> ApiError:
    return ApiError(404, message, "invalid_request_error", param, code)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, "authentication_error", None, "invalid_api_key")


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body larger than {limit} bytes", "invalid_request_error",
                    None, "request_too_large")


def unknown_model(model: object, served: str) -> ApiError:
    return not_found(f"the model {clip(model)} does not exist; this server serves {served!r}",
                     "model", "model_not_found")


def param_in(message: str, fields: Mapping[str, str]) -> str | None:
    """The request field a target's error message is about: the first of `fields` (the target's
    names -> the HTTP request's names) that the message mentions as a word."""
    best: tuple[int, str] | None = None
    for name, param in fields.items():
        found = re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", message)
        if found and (best is None or found.start() < best[0]):
            best = (found.start(), param)
    return best[1] if best else None


def from_status(code: grpc.StatusCode, details: str,
                fields: Mapping[str, str] | None = None) -> ApiError:
    """The HTTP error for a gRPC status of the target. INTERNAL details stay out of the reply
    (the target logged them)."""
    status, kind, short = _BY_STATUS.get(code, _INTERNAL)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE.search(details or ""):
        status, kind, short = 413, "invalid_request_error", "request_too_large"
    if status == 500:
        return ApiError(500, "the server failed to process the request", kind, None, short)
    param = param_in(details or "", fields) if status == 400 and fields else None
    return ApiError(status, details or code.name, kind, param, short)


def from_rpc_error(err: grpc.RpcError, fields: Mapping[str, str] | None = None) -> ApiError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return from_status(code, details or "", fields)
