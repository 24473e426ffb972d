"""Conversations and where their KV lives between turns: device pages, host pages, or dropped.

    | Conversation field | meaning                                                          |
    |--------------------|------------------------------------------------------------------|
    | token_ids          | the whole sequence of the last (or current) turn, prompt + output |
    | num_computed       | tokens [0, num_computed) have had their KV computed               |
    | pages[i]           | device page of tokens [i*ps, (i+1)*ps), or -1 if not on device    |
    | host_pages[i]      | host page of page index i (when swapped out)                      |
    | cow                | (i, device page): page i is to be copied from that page (a shared |
    |                    | page this conversation will write into), a reference held on it  |
    | salt               | cache salt: pages are shared only between equal salts            |
    | anonymous          | created for a request without an id: a later request whose prompt |
    |                    | starts with its tokens may adopt it (stateless clients)           |
    | busy / flushing    | a turn runs in it / that turn is done but for its cache flush     |

Pages are reference-counted: with prompt sharing (`PrefixIndex`) one device or host page may be
held by many conversations. A page with more than one holder is never written (copy on write).
Eviction takes an idle conversation's front-most chunk of pages it alone holds (device -> host,
host -> dropped); shared pages go only when no private page is left, and then only this
conversation's reference goes. A returning conversation gets its pages back from its own tiers
or from the index, and recomputes the one range that is left (usually a prefix).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable

from pensieve_jax.kvcache.pages import PageAllocator
from pensieve_jax.kvcache.eviction import EvictionMixin, EvictionPolicy, LRUPolicy
from pensieve_jax.kvcache.prefix_index import PrefixIndex, common_prefix
from pensieve_jax.kvcache.restore import RestoreMixin, RestorePlan, SwapIn

__all__ = ["Conversation", "ConversationStore", "RestorePlan", "SwapIn", "common_prefix"]


@dataclasses.dataclass(eq=False)
class Conversation:
    id: str
    anonymous: bool
    salt: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    host_pages: dict[int, int] = dataclasses.field(default_factory=dict)
    cow: tuple[int, int] | None = None
    shared_tokens: int = 0      # computed tokens it was given by a fork, not yet accounted
    num_computed: int = 0
    busy: bool = False          # a turn runs in it
    flushing: bool = False      # ... and that turn only has its last token's KV left to compute
    last_used: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def dropped(self) -> int:
        """Leading pages whose KV this conversation holds in no tier."""
        for i, p in enumerate(self.pages):
            if p >= 0 or i in self.host_pages or (self.cow and self.cow[0] == i):
                return i
        return len(self.pages)


class ConversationStore(RestoreMixin, EvictionMixin):
    """Every conversation of an engine and the pages it holds; restoring a returning one
    (pensieve_jax/kvcache/restore.py) and evicting idle ones (pensieve_jax/kvcache/eviction.py) are mixed in."""

    def __init__(self, allocator: PageAllocator, page_size: int,
                 host_allocator: PageAllocator | None = None,
                 policy: EvictionPolicy | None = None, chunk_pages: int = 2,
                 sharing: bool = True):
        self.allocator = allocator
        self.host = host_allocator              # None: no host tier
        self.page_size = page_size
        self.policy = policy or LRUPolicy()
        self.chunk_pages = chunk_pages
        self.index = PrefixIndex(page_size) if sharing else None
        # (first token, tokens) -> True if recomputing them beats loading their page from host
        self.recompute_cheaper: Callable[[int, int], bool] | None = None
        self.conversations: dict[str, Conversation] = {}
        self.closing: set[str] = set()           # ended while busy: removed at release
        self._ids = itertools.count()
        self.swap_out: list[tuple[int, int]] = []     # (device page, host page), to copy
        self.swap_in: list[SwapIn] = []               # host -> device copies to make
        self.copies: list[tuple[int, int]] = []       # (device page, device page), to copy
        self.counts = dict.fromkeys(("device_to_host_pages", "host_dropped_pages",
                                     "device_dropped_pages", "evicted_tokens",
                                     "released_shared_pages", "copied_on_write_pages",
                                     "recomputed_not_loaded_pages"), 0)

    def new_id(self, prefix: str = "conv") -> str:
        return f"{prefix}-{next(self._ids)}"

    def get_or_create(self, conversation_id: str | None, prompt: list[int],
                      salt: str = "") -> Conversation:
        """The conversation a request runs in. With no id, adopt the idle (or flushing)
        anonymous conversation of the same salt sharing the longest token prefix, if any. With
        prompt sharing, a prompt that does not extend that conversation forks it instead: a new
        conversation shares the common pages, and the other keeps its whole history."""
        if conversation_id is not None:
            conv = self.conversations.get(conversation_id)
            if conv is None:
                conv = self.conversations[conversation_id] = Conversation(conversation_id, False,
                                                                          salt)
            elif conv.salt != salt:
                raise ValueError(f"conversation {conversation_id!r} belongs to another cache_salt")
            return conv
        best, best_len = None, 0
        for conv in self.conversations.values():
            if conv.anonymous and conv.salt == salt and (not conv.busy or conv.flushing):
                n = common_prefix(conv.token_ids, prompt)
                if n > best_len:
                    best, best_len = conv, n
        if best is not None and (self.index is None or best_len == len(best.token_ids)):
            return best
        conv = Conversation(self.new_id("anon"), True, salt)
        self.conversations[conv.id] = conv
        if best is not None:
            self._fork(best, conv, best_len)
        return conv

    def _fork(self, src: Conversation, conv: Conversation, num_tokens: int) -> None:
        """conv (new) starts from src's KV of its first num_tokens tokens: the leading pages src
        holds on device or host are shared, a partly used last page is copied on write."""
        ps = self.page_size
        num_tokens = min(num_tokens, src.num_computed)
        for i in range(-(-num_tokens // ps)):
            partial = (i + 1) * ps > num_tokens
            if i < len(src.pages) and src.pages[i] >= 0:
                self.allocator.share([src.pages[i]])
                if partial:
                    conv.cow = (i, src.pages[i])
                    conv.pages.append(-1)
                else:
                    conv.pages.append(src.pages[i])
            elif i in src.host_pages and not partial:
                self.host.share([src.host_pages[i]])
                conv.host_pages[i] = src.host_pages[i]
                conv.pages.append(-1)
            else:
                break
            conv.num_computed = min(num_tokens, (i + 1) * ps)
        conv.token_ids = list(src.token_ids[:conv.num_computed])
        conv.shared_tokens = conv.num_computed

    def cached_prefix(self, conversation_id: str | None, prompt: list[int], salt: str) -> int:
        """Tokens of prompt a request could find cached (its conversation's or shared)."""
        conv = self.conversations.get(conversation_id) if conversation_id else None
        own = common_prefix(conv.token_ids[:conv.num_computed], prompt) if conv else 0
        if self.index is None:
            return own
        nodes, partial = self.index.match(salt, prompt, len(prompt) - 1)
        return max(own, self.index.matched_tokens(nodes, partial))

    # -- pages of one conversation ------------------------------------------------------------

    def _free_device(self, pages) -> None:
        for p in pages:
            self.allocator.free([p])
            if self.index is not None and self.allocator.ref_count(p) == 0:
                self.index.forget_device(p)

    def _free_host(self, pages) -> None:
        for p in pages:
            self.host.free([p])
            if self.index is not None and self.host.ref_count(p) == 0:
                self.index.forget_host(p)

    def _release_page(self, conv: Conversation, i: int) -> None:
        """conv no longer holds page i in any tier."""
        if i < len(conv.pages) and conv.pages[i] >= 0:
            self._free_device([conv.pages[i]])
            conv.pages[i] = -1
        if i in conv.host_pages:
            self._free_host([conv.host_pages.pop(i)])
        if conv.cow and conv.cow[0] == i:
            self._free_device([conv.cow[1]])
            conv.cow = None

    def truncate(self, conv: Conversation, num_tokens: int) -> None:
        """Keep KV for tokens [0, num_tokens) only; pages past them go back to their pools."""
        conv.num_computed = min(conv.num_computed, num_tokens)
        keep = -(-conv.num_computed // self.page_size)
        for i in sorted(set(range(keep, len(conv.pages))) | {i for i in conv.host_pages
                                                            if i >= keep}):
            self._release_page(conv, i)
        del conv.pages[keep:]

    def drop_kv(self, conv: Conversation) -> None:
        self.counts["evicted_tokens"] += conv.num_computed
        self.truncate(conv, 0)

    def register(self, conv: Conversation) -> None:
        """Offer conv's full computed pages to other conversations (prompt sharing)."""
        if self.index is not None:
            n = conv.num_computed // self.page_size * self.page_size
            self.index.insert(conv.salt, conv.token_ids[:n], conv.pages[:n // self.page_size])

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
        """The conversation's turn is over (finished, aborted, or its cache flush preempted);
        one that was ended meanwhile goes now."""
        conv.busy = conv.flushing = False
        conv.last_used = time.monotonic()
        if conv.cow is not None:     # a turn that never ran: eviction could not take back the
            self.truncate(conv, conv.cow[0] * self.page_size)   # page it was to copy from
        if keep_kv:
            self.register(conv)
        else:
            self.truncate(conv, 0)
        if conv.id in self.closing:
            self.closing.discard(conv.id)
            self.remove(conv.id)

    def end(self, conversation_id: str) -> bool:
        """Forget a conversation and free its cache, after its turn if one is running (see
        release). False if unknown."""
        if conversation_id not in self.conversations:
            return False
        if self.conversations[conversation_id].busy:
            self.closing.add(conversation_id)
        else:
            self.remove(conversation_id)
        return True

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

    def take_transfers(self):
        """(swap-outs, device copies, swap-ins) planned since the last call, to run in that
        order before the next step."""
        out, copies, into = self.swap_out, self.copies, self.swap_in
        self.swap_out, self.copies, self.swap_in = [], [], []
        return out, copies, into

    def swapped_in(self, host_pages: list[int]) -> None:
        """Host pages whose contents were copied back to the device can be let go."""
        self._free_host(host_pages)

    # -- stats --------------------------------------------------------------------------------

    def resident_tokens(self) -> dict[str, int]:
        """Tokens of idle conversations by tier (device / host; shared pages once each)."""
        ps = self.page_size
        device, host = set(), set()
        for c in self.conversations.values():
            if not c.busy:
                device.update(p for p in c.pages if p >= 0)
                host.update(c.host_pages.values())
        return {"device": len(device) * ps, "host": len(host) * ps}

    def cached_tokens(self) -> int:
        return sum(c.num_computed for c in self.conversations.values() if not c.busy)

    def sharing_stats(self) -> dict[str, int]:
        shared = sum(1 for p in range(self.allocator.num_pages) if self.allocator.ref_count(p) > 1)
        return {"shared_pages": shared,
                **(self.index.stats() if self.index is not None else {})}
