"""`ConversationTable`: the router's conversations (or Generate ids) in least recently used
order, bounded. An entry idle for ttl_s is forgotten, and beyond max_entries the least recently
used idle one is. An entry with a turn in flight (busy) is never forgotten.
"""

from __future__ import annotations

import collections
import collections.abc
import time
from typing import Any, Callable, Iterator


class ConversationTable(collections.abc.Mapping):
    """id -> Conversation (or Generated), least recently used first, bounded.

    touch() adds an entry or marks it used now. An entry is expired when it is idle (not busy)
    and was last used more than ttl_s ago (None: never); `expire()` takes those out, `trim()`
    the least recently used idle ones beyond max_entries (None or 0: no cap). Busy entries are
    skipped by both, so with turns in flight the table may hold more than max_entries for a
    while. clock: seconds, monotonic (tests pass a fake one)."""

    def __init__(self, ttl_s: float | None = None, max_entries: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0 or None, got {ttl_s!r}")
        if max_entries is not None and max_entries < 0:
            raise ValueError(f"max_entries must be >= 0 or None, got {max_entries!r}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries or None
        self.clock = clock
        self._items: collections.OrderedDict[str, Any] = collections.OrderedDict()

    def __getitem__(self, key: str):
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def touch(self, key: str, entry) -> None:
        """Add `entry` as `key`, or mark it used now (the most recently used)."""
        entry.last_used = self.clock()
        self._items[key] = entry
        self._items.move_to_end(key)

    def pop(self, key: str, default=None):
        return self._items.pop(key, default)

    def is_expired(self, entry, now: float | None = None) -> bool:
        if self.ttl_s is None or entry.busy:
            return False
        return (self.clock() if now is None else now) - entry.last_used > self.ttl_s

    def expire(self) -> list:
        """Take out and return the idle entries unused for longer than ttl_s."""
        if self.ttl_s is None:
            return []
        now, out = self.clock(), []
        for key, entry in list(self._items.items()):      # oldest first
            if now - entry.last_used <= self.ttl_s:
                break                                      # the rest were used since
            if not entry.busy:
                out.append(self._items.pop(key))
        return out

    def trim(self) -> list:
        """Take out and return the least recently used idle entries beyond max_entries."""
        if self.max_entries is None or len(self._items) <= self.max_entries:
            return []
        out = []
        for key, entry in list(self._items.items()):
            if len(self._items) <= self.max_entries:
                break
            if not entry.busy:
                out.append(self._items.pop(key))
        return out

    def busy(self) -> int:
        """How many entries have a turn in flight."""
        return sum(1 for e in self._items.values() if e.busy)


__all__ = ["ConversationTable"]
