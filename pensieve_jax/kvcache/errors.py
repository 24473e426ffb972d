"""Errors of the KV cache layer that the layers above raise and catch too."""

from __future__ import annotations

__all__ = ["ConversationBusy"]


class ConversationBusy(RuntimeError):
    """The conversation has a turn running (or its last turn's cache flush is still to run)."""
