"""Conversations and the pages that hold their KV between turns.

    | Conversation field | meaning                                                          |
    |--------------------|------------------------------------------------------------------|
    | token_ids          | the whole sequence of the last (or current) turn, prompt + output |
    | num_computed       | tokens [0, num_computed) have KV in `pages`                       |
    | pages              | ceil(num_computed / page_size) pages, more while a turn runs       |
    | anonymous          | created for a request without an id: a later request whose prompt |
    |                    | starts with its tokens may adopt it (stateless clients)           |
    | busy / flushing    | a turn runs in it / that turn is done but for its cache flush     |
"""

from __future__ import annotations

import dataclasses
import itertools
import time

from pensieve_jax.cache import PageAllocator


@dataclasses.dataclass(eq=False)
class Conversation:
    id: str
    anonymous: bool
    token_ids: list[int] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    busy: bool = False          # a turn runs in it
    flushing: bool = False      # ... and that turn only has its last token's KV left to compute
    last_used: float = dataclasses.field(default_factory=time.monotonic)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ConversationStore:
    def __init__(self, allocator: PageAllocator, page_size: int):
        self.allocator = allocator
        self.page_size = page_size
        self.conversations: dict[str, Conversation] = {}
        self._ids = itertools.count()
        self.evicted_tokens = 0

    def new_id(self, prefix: str = "conv") -> str:
        return f"{prefix}-{next(self._ids)}"

    def get_or_create(self, conversation_id: str | None, prompt: list[int]) -> Conversation:
        """The conversation a request runs in. With no id, adopt the idle anonymous conversation
        sharing the longest token prefix with the prompt (if any), else start a new one."""
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

    def truncate(self, conv: Conversation, num_tokens: int) -> None:
        """Keep KV for tokens [0, num_tokens) only; pages past them go back to the pool."""
        conv.num_computed = min(conv.num_computed, num_tokens)
        keep = -(-conv.num_computed // self.page_size)
        if len(conv.pages) > keep:
            self.allocator.free(conv.pages[keep:])
            del conv.pages[keep:]

    def drop_kv(self, conv: Conversation) -> None:
        self.evicted_tokens += conv.num_computed
        self.truncate(conv, 0)

    def reserve(self, conv: Conversation, num_tokens: int) -> bool:
        """Make `conv` hold pages for tokens [0, num_tokens), evicting idle conversations' KV
        (least recently used first) when the pool is short. False if it still does not fit."""
        need = -(-num_tokens // self.page_size) - len(conv.pages)
        if need <= 0:
            return True
        if not self.allocator.can_allocate(need):
            self.evict_idle(need - self.allocator.num_free)
        if not self.allocator.can_allocate(need):
            return False
        conv.pages.extend(self.allocator.allocate(need))
        return True

    def evict_idle(self, num_pages: int) -> int:
        """Drop the KV of idle conversations, LRU first, until num_pages are freed."""
        freed = 0
        idle = sorted((c for c in self.conversations.values() if not c.busy and c.pages),
                      key=lambda c: c.last_used)
        for conv in idle:
            if freed >= num_pages:
                break
            freed += len(conv.pages)
            self.drop_kv(conv)
        return freed

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

    def cached_tokens(self) -> int:
        return sum(c.num_computed for c in self.conversations.values() if not c.busy)
