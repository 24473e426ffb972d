"""Limits a server enforces before any expensive work (issue 20). One Limits serves gRPC and HTTP.

    | limit              | where it is enforced                                               |
    |--------------------|--------------------------------------------------------------------|
    | max_request_bytes  | the transport (gRPC max_receive_message_length, HTTP body size),  |
    |                    | before parsing; RESOURCE_EXHAUSTED / 413                           |
    | max_conversations  | the server's conversation table: beyond it the least recently used |
    |                    | idle conversation is ended (its cache freed); None: no cap          |
"""

from __future__ import annotations

import dataclasses

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 4 * MIB
    """The largest request message a client may send (bytes), checked before it is parsed."""
    max_conversations: int | None = None
    """Conversations a server keeps; beyond, the least recently used idle one is ended."""

    def __post_init__(self):
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if self.max_conversations is not None and self.max_conversations < 1:
            raise ValueError(f"max_conversations must be >= 1 (or None: no cap), got "
                             f"{self.max_conversations}")
