"""What the engine raises to its callers."""

from __future__ import annotations

ECHO_CHARS = 100      # at most this much of a caller's input is quoted back in an error


class EngineOverloaded(RuntimeError):
    """Too many unfinished requests (EngineConfig.max_queued_requests)."""


class EngineClosed(RuntimeError):
    """The engine was closed (Engine.close): it takes no more work; turns still queued or
    running when it closed end with this error."""


class TurnFailed(RuntimeError):
    """An internal error ended this turn alone (a step it ran in failed); other turns and
    conversations are unaffected. request_id: the turn's, as the engine logged it."""

    def __init__(self, message: str, request_id: str = ""):
        super().__init__(message)
        self.request_id = request_id


def brief(value: object, limit: int = ECHO_CHARS) -> str:
    """repr() of caller input for an error message, cut to about `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"
