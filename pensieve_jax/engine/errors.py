"""What the engine raises to its callers."""

from __future__ import annotations


class EngineOverloaded(RuntimeError):
    """Too many unfinished requests (EngineConfig.max_queued_requests)."""


class EngineClosed(RuntimeError):
    """The engine was closed (Engine.close): it takes no more work; turns still queued or
    running when it closed end with this error."""
