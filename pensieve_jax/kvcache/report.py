"""What an engine's cache holds, as versioned reports (the replica side of a router's global
prefix tree: Preble's "replicas report inserts and evictions").

    tracker = CacheTracker(engine)            # anything with cache_scan(previous) and a config
    r = tracker.report()                      # full: every conversation holding KV
    r = tracker.report(r.epoch, r.version)    # only what changed since (nothing: same version)

A conversation holds the leading tokens whose KV has a copy on device or host, its own pages or
the prefix index's (`PageLedger.held_tokens`), or in its page files on disk (`held_tokens`): a
returning conversation is best served where its KV is, even on disk (after a restart all of it
may be), though a KV transfer exports only its device and host part. A dropped prefix is not
held, so a conversation whose front chunk was evicted holds nothing (its later pages only save
recomputation once the front is recomputed). Conversations holding nothing are left out.
Shared prompt prefixes need no report of their own: a page the prefix index can serve from
the start is in the held prefix of some conversation (held prefixes read the index for pages a
conversation let go).

Each refresh reads the engine on its thread (`Engine.cache_scan` runs `scan` there), comparing
a cheap key per conversation (held tokens, length, last use, salt) with the previous refresh, so
token ids are copied only for conversations that changed. A conversation with a turn running is reported as
it was before the turn (or as it is, when first seen): it is read again when the turn is over.
Every refresh that changes something gets the next version; a caller that sends the epoch and
version of the last report it applied gets the conversations changed since and the ids removed
since (tombstones, the last `max_tombstones` of them; older callers get a full report).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Iterable, NamedTuple, Protocol

from pensieve_jax.kvcache.conversations import ConversationStore

__all__ = ["CacheReport", "CacheSource", "CacheTracker", "Held", "held_tokens", "scan"]


class Held(NamedTuple):
    """One conversation's held prefix, as of the refresh that gave it `version`."""
    conversation_id: str
    salt: str
    token_ids: tuple[int, ...]
    key: tuple
    version: int = 0


class CacheReport(NamedTuple):
    epoch: str
    version: int
    full: bool
    conversations: list[Held]      # new or changed since the caller's version (all, if full)
    removed: list[str]             # ids that hold nothing any more (empty if full)
    num_conversations: int         # conversations holding KV now
    page_size: int


def scan(store: ConversationStore, previous: dict[str, Held]) -> dict[str, Held]:
    """Every conversation holding KV, reusing previous entries whose key did not change. Runs
    on the engine thread."""
    out: dict[str, Held] = {}
    for conv in store.conversations.values():
        prev = previous.get(conv.id)
        if conv.busy and prev is not None:
            out[conv.id] = prev
            continue
        n = held_tokens(store, conv)
        key = (conv.salt, n, len(conv.token_ids), conv.last_used, conv.busy)
        if prev is not None and prev.key == key:
            out[conv.id] = prev
        elif n > 0:
            out[conv.id] = Held(conv.id, conv.salt, tuple(conv.token_ids[:n]), key)
    return out


def held_tokens(store: ConversationStore, conv) -> int:
    """Leading tokens of conv whose KV has a copy on device or host (the store's held_tokens),
    and on from there while its pages are on any tier, page files on disk included."""
    n = store.held_tokens(conv)
    if not conv.disk_pages:
        return n
    ps = store.page_size
    i, n_pages = n // ps, min(-(-conv.num_computed // ps), len(conv.pages))
    while i < n_pages and (i in conv.disk_pages or conv.pages[i] >= 0 or i in conv.host_pages):
        i += 1
    return max(n, min(conv.num_computed, i * ps))


class CacheSource(Protocol):
    """What a CacheTracker reads: an Engine."""

    def cache_scan(self, previous: dict[str, Held]) -> dict[str, Held]:
        """`scan` of its store, run on its engine thread."""


class CacheTracker:
    """Versioned reports of what one engine holds (thread-safe). Each report reads the engine
    anew, so it reflects every turn finished before it was asked for (routers rely on that);
    min_interval_s > 0 lets reports asked for within that time share one read instead.
    page_size: the cache's page size (default: source.config.page_size, an Engine's)."""

    def __init__(self, source: CacheSource, min_interval_s: float = 0.0,
                 max_tombstones: int = 4096, page_size: int | None = None):
        self.source = source
        self.page_size = source.config.page_size if page_size is None else page_size
        self.min_interval_s = min_interval_s
        self.max_tombstones = max_tombstones
        self.epoch = uuid.uuid4().hex[:16]
        self.version = 0
        self.floor = 0                       # a diff since a version below this is not possible
        self.entries: dict[str, Held] = {}
        self.removed: dict[str, int] = {}    # id -> version it was removed at (oldest first)
        self.refreshes = 0
        self._last = float("-inf")
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Read the engine now (blocks until its current step ends)."""
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        previous = self.entries
        current = self.source.cache_scan(previous)
        self._last = time.monotonic()
        self.refreshes += 1
        changed = [h for cid, h in current.items() if previous.get(cid) is not h]
        gone = [cid for cid in previous if cid not in current]
        if not changed and not gone:
            return
        self.version += 1
        v = self.version
        for h in changed:
            current[h.conversation_id] = h._replace(version=v)
            self.removed.pop(h.conversation_id, None)
        for cid in gone:
            self.removed[cid] = v
        while len(self.removed) > self.max_tombstones:
            cid = next(iter(self.removed))
            self.floor = max(self.floor, self.removed.pop(cid))
        self.entries = current

    def report(self, epoch: str = "", since: int = 0) -> CacheReport:
        """What changed after version `since` of `epoch` (everything, if that is not this
        tracker's epoch or too old)."""
        with self._lock:
            if time.monotonic() - self._last >= self.min_interval_s:
                self._refresh()
            full = epoch != self.epoch or not self.floor <= since <= self.version
            if full:
                convs: Iterable[Held] = self.entries.values()
                removed: list[str] = []
            else:
                convs = (h for h in self.entries.values() if h.version > since)
                removed = [cid for cid, v in self.removed.items() if v > since]
            return CacheReport(self.epoch, self.version, full, list(convs), removed,
                               len(self.entries), self.page_size)
