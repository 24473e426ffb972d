"""Conversations and where their KV lives between turns: device pages, host pages, or dropped.

    | Conversation field | meaning                                                          |
    |--------------------|------------------------------------------------------------------|
    | token_ids          | the whole sequence of the last (or current) turn, prompt + output |
    | num_computed       | tokens [0, num_computed) have had their KV computed               |
    | pages[i]           | device page of tokens [i*ps, (i+1)*ps), or -1 if not on device    |
    | host_pages[i]      | host page of page index i (when swapped out)                      |
    | dropped            | leading page indices whose KV is gone: recomputed on return       |
    | anonymous          | created for a request without an id: a later request whose prompt |
    |                    | starts with its tokens may adopt it (stateless clients)           |
    | busy / flushing    | a turn runs in it / that turn is done but for its cache flush     |

Tier order inside a conversation is always  dropped < host < device  by page index: eviction
takes the front-most chunk of a tier (device -> host, host -> dropped), so a returning
conversation recomputes a prefix, loads the middle from host and finds the rest on device.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

from pensieve_jax.cache import PageAllocator
from pensieve_jax.eviction import EvictionPolicy, LRUPolicy


@dataclasses.dataclass(eq=False)
class Conversation:
    id: str
    anonymous: bool
    token_ids: list[int] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    host_pages: dict[int, int] = dataclasses.field(default_factory=dict)
    dropped: int = 0
    num_computed: int = 0
    busy: bool = False          # a turn runs in it
    flushing: bool = False      # ... and that turn only has its last token's KV left to compute
    last_used: float = dataclasses.field(default_factory=time.monotonic)

    def first_device_page(self) -> int:
        return self.dropped + len(self.host_pages)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ConversationStore:
    def __init__(self, allocator: PageAllocator, page_size: int,
                 host_allocator: PageAllocator | None = None,
                 policy: EvictionPolicy | None = None, chunk_pages: int = 2):
        self.allocator = allocator
        self.host = host_allocator              # None: no host tier
        self.page_size = page_size
        self.policy = policy or LRUPolicy()
        self.chunk_pages = chunk_pages
        self.conversations: dict[str, Conversation] = {}
        self._ids = itertools.count()
        self.swap_out: list[tuple[int, int]] = []     # (device page, host page), to copy
        self.swap_in: list[tuple[int, int]] = []      # (host page, device page), to copy
        self.counts = dict.fromkeys(("device_to_host_pages", "host_dropped_pages",
                                     "device_dropped_pages", "evicted_tokens"), 0)

    def new_id(self, prefix: str = "conv") -> str:
        return f"{prefix}-{next(self._ids)}"

    def get_or_create(self, conversation_id: str | None, prompt: list[int]) -> Conversation:
        """The conversation a request runs in. With no id, adopt the idle (or flushing)
        anonymous conversation sharing the longest token prefix with the prompt, if any."""
        if conversation_id is not None:
            conv = self.conversations.get(conversation_id)
            if conv is None:
                conv = self.conversations[conversation_id] = Conversation(conversation_id, False)
            return conv
        best, best_len = None, 0
        for conv in self.conversations.values():
            if conv.anonymous and (not conv.busy or conv.flushing):
                n = common_prefix(conv.token_ids, prompt)
                if n > best_len:
                    best, best_len = conv, n
        if best is not None:
            return best
        conv = Conversation(self.new_id("anon"), True)
        self.conversations[conv.id] = conv
        return conv

    # -- pages of one conversation ------------------------------------------------------------

    def truncate(self, conv: Conversation, num_tokens: int) -> None:
        """Keep KV for tokens [0, num_tokens) only; pages past them go back to their pools."""
        conv.num_computed = min(conv.num_computed, num_tokens)
        keep = -(-conv.num_computed // self.page_size)
        self.allocator.free([p for p in conv.pages[keep:] if p >= 0])
        del conv.pages[keep:]
        for i in [i for i in conv.host_pages if i >= keep]:
            self.host.free([conv.host_pages.pop(i)])
        conv.dropped = min(conv.dropped, keep)

    def drop_kv(self, conv: Conversation) -> None:
        self.counts["evicted_tokens"] += conv.num_computed
        self.truncate(conv, 0)

    def restore_cost(self, conv: Conversation) -> int:
        """Device pages needed to bring every page of conv back (from host or by recompute)."""
        return sum(1 for p in conv.pages if p < 0)

    def restore(self, conv: Conversation) -> int:
        """Give every page of conv a device page (call after making room for restore_cost):
        host pages are queued for swap-in; dropped ones must be recomputed. Returns the number
        of leading tokens to recompute."""
        missing = [i for i, p in enumerate(conv.pages) if p < 0]
        for i, page in zip(missing, self.allocator.allocate(len(missing))):
            conv.pages[i] = page
            if i in conv.host_pages:
                self.swap_in.append((conv.host_pages.pop(i), page))
        front = min(conv.dropped * self.page_size, conv.num_computed)
        conv.dropped = 0
        return front

    def reserve(self, conv: Conversation, num_tokens: int) -> bool:
        """Make conv hold device pages for tokens [0, num_tokens), evicting idle conversations'
        chunks when the pool is short. False if it still does not fit."""
        need = -(-num_tokens // self.page_size) - len(conv.pages)
        if need <= 0:
            return True
        if not self.make_room(need):
            return False
        conv.pages.extend(self.allocator.allocate(need))
        return True

    def release(self, conv: Conversation, keep_kv: bool) -> None:
        conv.busy = conv.flushing = False
        conv.last_used = time.monotonic()
        if not keep_kv:
            self.truncate(conv, 0)

    def remove(self, conversation_id: str) -> bool:
        conv = self.conversations.get(conversation_id)
        if conv is None or conv.busy:
            return False
        self.truncate(conv, 0)
        del self.conversations[conversation_id]
        return True

    def expire(self, ttl_s: float) -> int:
        """Forget idle conversations unused for ttl_s seconds; returns how many."""
        cutoff = time.monotonic() - ttl_s
        old = [c.id for c in self.conversations.values() if not c.busy and c.last_used < cutoff]
        for cid in old:
            self.remove(cid)
        return len(old)

    # -- eviction -----------------------------------------------------------------------------

    def make_room(self, num_pages: int, to_host_only: bool = False) -> bool:
        """Evict idle conversations' front chunks from the device until num_pages are free:
        to the host tier when there is one (making room there by dropping host chunks), else
        dropped. to_host_only: never drop anything (ahead-of-time swap-out)."""
        while self.allocator.num_free < num_pages:
            victim = self._pick(lambda c: c.pages and c.first_device_page() < len(c.pages),
                                lambda c: c.first_device_page())
            if victim is None:
                return False
            first = victim.first_device_page()
            chunk = list(range(first, min(first + self.chunk_pages, len(victim.pages))))
            if self.host is not None and self._host_room(len(chunk), to_host_only):
                for i, host_page in zip(chunk, self.host.allocate(len(chunk))):
                    self.swap_out.append((victim.pages[i], host_page))
                    victim.host_pages[i] = host_page
                self.counts["device_to_host_pages"] += len(chunk)
            elif to_host_only:
                return False
            else:                       # drop: whatever is in front of the chunk goes too
                for i in sorted(victim.host_pages):
                    self.host.free([victim.host_pages.pop(i)])
                    self.counts["host_dropped_pages"] += 1
                victim.dropped = chunk[-1] + 1
                self.counts["device_dropped_pages"] += len(chunk)
            self.allocator.free([victim.pages[i] for i in chunk])
            for i in chunk:
                victim.pages[i] = -1
        return True

    def _host_room(self, num_pages: int, no_drops: bool) -> bool:
        while self.host.num_free < num_pages:
            if no_drops:
                return False
            victim = self._pick(lambda c: bool(c.host_pages), lambda c: c.dropped)
            if victim is None:
                return False
            first = victim.dropped
            for i in range(first, min(first + self.chunk_pages, first + len(victim.host_pages))):
                self.host.free([victim.host_pages.pop(i)])
                self.counts["host_dropped_pages"] += 1
                victim.dropped = i + 1
        return True

    def _pick(self, has_chunk, first_page) -> Conversation | None:
        """The idle conversation whose front chunk (starting at first_page(conv)) scores lowest."""
        now = time.monotonic()
        best, best_score = None, None
        for conv in self.conversations.values():
            if conv.busy or not has_chunk(conv):
                continue
            start = first_page(conv) * self.page_size
            n = min(self.chunk_pages * self.page_size, max(conv.num_computed - start, 1))
            score = self.policy.score(start, n, now - conv.last_used, conv.last_used)
            if best_score is None or score < best_score:
                best, best_score = conv, score
        return best

    def swap_out_ahead(self, min_free_pages: int) -> None:
        """Copy idle chunks to the host tier ahead of need, until min_free_pages are free."""
        if self.host is not None and self.allocator.num_free < min_free_pages:
            self.make_room(min_free_pages, to_host_only=True)

    def take_transfers(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        out, into = self.swap_out, self.swap_in
        self.swap_out, self.swap_in = [], []
        return out, into

    def swapped_in(self, host_pages: list[int]) -> None:
        """Host pages whose contents were copied back to the device can be reused."""
        self.host.free(host_pages)

    # -- stats --------------------------------------------------------------------------------

    def resident_tokens(self) -> dict[str, int]:
        """Tokens of idle conversations by tier (device / host)."""
        ps = self.page_size
        device = host = 0
        for c in self.conversations.values():
            if not c.busy:
                device += sum(1 for p in c.pages if p >= 0) * ps
                host += len(c.host_pages) * ps
        return {"device": device, "host": host}

    def cached_tokens(self) -> int:
        return sum(c.num_computed for c in self.conversations.values() if not c.busy)
