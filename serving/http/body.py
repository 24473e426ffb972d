"""Request bodies: read with a size limit (413 before any parsing), then parsed as a JSON object."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from serving.http.errors import invalid, too_large


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body; 413 when Content-Length says it is over `limit`, or once the streamed
    bytes pass it (a chunked body, or a Content-Length that lied)."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise invalid("Content-Length is not a number", None) from None
        if declared > limit:
            raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 400 if it is not one."""
    raw = await read_body(request, limit)
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"the body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(value, dict):
        raise invalid(f"the body must be a JSON object, got {type(value).__name__}", None,
                      "invalid_json")
    return value


def _no_constant(name: str):
    """NaN and Infinity are not JSON: refuse them rather than pass them on."""
    raise ValueError(f"{name} is not a JSON number")
