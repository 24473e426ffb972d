"""The gateway's table of stored Responses (POST /v1/responses with store=true): bounded, in
memory, oldest entries dropped first.

Each entry knows its owner, the message history up to and including its reply, the
instructions its conversation runs under, and the target's conversation id. A conversation's
latest stored response is the one `previous_response_id` continues statefully (gRPC Chat on the
kept KV); an older one (a fork) is continued by resending its history.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

DEFAULT_MAX_RESPONSES = 10_000


@dataclasses.dataclass
class StoredResponse:
    id: str
    owner: str
    conversation_id: str                         # the target's conversation ("" if ended)
    instructions: str | None
    history: tuple[dict[str, str], ...]          # the messages, this reply included (no
                                                 # system message of the instructions)
    response: dict[str, Any]                     # the response object, as returned
    metadata: tuple[tuple[str, str], ...] = ()   # the gRPC metadata (the key) that created it


class ResponseStore:
    """Stored responses by id, at most `max_responses` (the oldest dropped first)."""

    def __init__(self, max_responses: int = DEFAULT_MAX_RESPONSES):
        if max_responses < 1:
            raise ValueError(f"max_responses must be >= 1, got {max_responses}")
        self.max_responses = max_responses
        self._entries: collections.OrderedDict[str, StoredResponse] = collections.OrderedDict()
        self._latest: dict[str, str] = {}        # conversation id -> its latest response id

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The entry, if it exists and belongs to owner (another owner's is not found)."""
        entry = self._entries.get(response_id)
        return entry if entry is not None and entry.owner == owner else None

    def is_latest(self, entry: StoredResponse) -> bool:
        """Whether entry is its conversation's latest turn (so the KV holds its history)."""
        return bool(entry.conversation_id) and \
            self._latest.get(entry.conversation_id) == entry.id

    def advance(self, conversation_id: str) -> None:
        """The conversation ran a turn that is not stored: no stored response is its latest."""
        self._latest.pop(conversation_id, None)

    def put(self, entry: StoredResponse) -> list[StoredResponse]:
        """Store entry as its conversation's latest turn. Returns the entries dropped to stay
        within max_responses that were their conversation's latest (their conversations
        should be ended: nothing can continue them any more)."""
        self._entries[entry.id] = entry
        self._latest[entry.conversation_id] = entry.id
        dropped = []
        while len(self._entries) > self.max_responses:
            _, old = self._entries.popitem(last=False)
            if self._latest.get(old.conversation_id) == old.id:
                del self._latest[old.conversation_id]
                dropped.append(old)
        return dropped

    def delete(self, entry: StoredResponse) -> bool:
        """Forget entry; True if it was its conversation's latest (end the conversation)."""
        self._entries.pop(entry.id, None)
        if self._latest.get(entry.conversation_id) == entry.id:
            del self._latest[entry.conversation_id]
            return True
        return False
