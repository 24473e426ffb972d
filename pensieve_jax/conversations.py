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
from typing import Callable, NamedTuple

from pensieve_jax.cache import PageAllocator
from pensieve_jax.eviction import EvictionPolicy, LRUPolicy
from pensieve_jax.prefix_index import PrefixIndex, common_prefix

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


class SwapIn(NamedTuple):
    host_page: int
    device_page: int
    conversation: Conversation
    index: int             # page index in the conversation (it may be gone by the time the
                           # copy lands: then the copy is skipped)


class RestorePlan(NamedTuple):
    new_pages: int         # device pages to allocate
    front: tuple[int, int]  # token range [start, end) to recompute
    host_tokens: int       # cached tokens coming back from host pages
    shared_tokens: int     # cached tokens taken from other conversations' pages


class ConversationStore:
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
        return max(own, len(nodes) * self.page_size + (partial.num_tokens if partial else 0))

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

    def attach_shared(self, conv: Conversation, prompt: list[int]) -> int:
        """Extend conv's cached prefix of prompt with pages other conversations hold (whole
        pages shared; a page matching only in part is copied on write). Call after truncating
        conv to its own cached prefix. Returns the tokens gained."""
        limit = len(prompt) - 1         # the last prompt token always runs
        if self.index is None or conv.num_computed >= limit:
            return 0
        nodes, partial = self.index.match(conv.salt, prompt, limit)
        ps = self.page_size
        total = len(nodes) * ps + (partial.num_tokens if partial else 0)
        gained = total - conv.num_computed
        if gained <= 0:
            return 0
        first = conv.num_computed // ps
        new_pages, new_host = [], {}
        for i in range(first, len(nodes)):       # take references before letting ours go
            if nodes[i].device >= 0:
                self.allocator.share([nodes[i].device])
                new_pages.append(nodes[i].device)
            else:
                self.host.share([nodes[i].host])
                new_host[i] = nodes[i].host
                new_pages.append(-1)
        if partial:
            self.allocator.share([partial.node.device])
        self.truncate(conv, first * ps)
        conv.pages.extend(new_pages)
        conv.host_pages.update(new_host)
        if partial:
            conv.cow = (len(conv.pages), partial.node.device)
            conv.pages.append(-1)
        conv.num_computed = total
        return gained

    def make_writable(self, conv: Conversation) -> None:
        """The page the next token goes into must be conv's alone: a shared one is copied
        first, and an indexed one leaves the index (its contents are about to change)."""
        i = conv.num_computed // self.page_size
        if conv.num_computed % self.page_size == 0 or i >= len(conv.pages):
            return
        page = conv.pages[i]
        if page < 0:
            return                      # on host or recomputed: it arrives in a fresh page
        if self.allocator.ref_count(page) > 1:
            conv.cow, conv.pages[i] = (i, page), -1      # our reference now guards the source
        elif self.index is not None:
            self.index.forget_device(page)

    def plan_restore(self, conv: Conversation) -> RestorePlan:
        """Settle where each page of conv comes from before its turn runs: its own device or
        host page, a page the index holds (shared), or recomputation. The pages to recompute
        form one range (from the first page with no copy anywhere to the last), and anything
        conv holds inside it is let go. Idempotent; `restore` carries the plan out."""
        ps, full = self.page_size, conv.num_computed // self.page_size
        path = self.index.path(conv.salt, conv.token_ids, full * ps) if self.index else []

        def has_copy(i):
            return (conv.pages[i] >= 0 or i in conv.host_pages or
                    (conv.cow is not None and conv.cow[0] == i) or
                    (i < len(path) and path[i].has_copy()))
        missing = [i for i in range(len(conv.pages)) if not has_copy(i)]
        lo, hi = (missing[0], missing[-1] + 1) if missing else (len(conv.pages),) * 2
        if self.recompute_cheaper is not None:
            lo, hi = self._recompute_instead_of_load(conv, path, lo, hi)
        for i in range(lo, hi):
            self._release_page(conv, i)
        shared = 0
        for i, node in enumerate(path):
            if lo <= i < hi or conv.pages[i] >= 0 or i in conv.host_pages:
                continue
            if node.device >= 0:
                self.allocator.share([node.device])
                conv.pages[i] = node.device
                shared += ps
            elif node.host >= 0:
                self.host.share([node.host])
                conv.host_pages[i] = node.host
                shared += ps
        host = sum(min(ps, conv.num_computed - i * ps) for i in conv.host_pages)
        front = (lo * ps, min(hi * ps, conv.num_computed)) if lo < hi else (0, 0)
        return RestorePlan(sum(1 for p in conv.pages if p < 0), front, host, shared)

    def _recompute_instead_of_load(self, conv: Conversation, path, lo: int, hi: int):
        """Grow the recompute range [lo, hi) over neighbouring pages that would come from host
        memory while recomputing them is cheaper than loading them (per page, front first when
        nothing is missing yet)."""
        ps, n = self.page_size, len(conv.pages)

        def loads(i):
            if conv.pages[i] >= 0 or (conv.cow is not None and conv.cow[0] == i):
                return False
            return i in conv.host_pages or (i < len(path) and path[i].has_copy() and
                                            path[i].device < 0)

        def cheaper(i):
            return loads(i) and self.recompute_cheaper(i * ps, min(ps, conv.num_computed - i * ps))
        if lo == hi:
            first = next((i for i in range(n) if loads(i)), None)
            if first is None or not cheaper(first):
                return lo, hi
            lo, hi = first, first + 1
            self.counts["recomputed_not_loaded_pages"] += 1
        while lo > 0 and cheaper(lo - 1):
            lo -= 1
            self.counts["recomputed_not_loaded_pages"] += 1
        while hi < n and cheaper(hi):
            hi += 1
            self.counts["recomputed_not_loaded_pages"] += 1
        return lo, hi

    def restore(self, conv: Conversation) -> int:
        """Give every page of conv a device page (after plan_restore and making room for its
        new_pages): host pages are queued for swap-in, copies on write for copying. Returns
        the number of pages to swap in (the conversation waits for them to land; its pages are
        offered to the index again once it has run)."""
        missing = [i for i, p in enumerate(conv.pages) if p < 0]
        loads = 0
        for i, page in zip(missing, self.allocator.allocate(len(missing))):
            conv.pages[i] = page
            if i in conv.host_pages:
                self.swap_in.append(SwapIn(conv.host_pages.pop(i), page, conv, i))
                loads += 1
            elif conv.cow is not None and conv.cow[0] == i:
                self.copies.append((conv.cow[1], page))
                self._free_device([conv.cow[1]])       # the copy runs before any later write
                conv.cow = None
                self.counts["copied_on_write_pages"] += 1
        return loads

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
        conv.busy = conv.flushing = False
        conv.last_used = time.monotonic()
        if keep_kv:
            self.register(conv)
        else:
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
        """Evict idle conversations' chunks from the device until num_pages are free: to the
        host tier when there is one (making room there by dropping host chunks), else dropped.
        Shared pages go last, one holder at a time. to_host_only: never drop anything."""
        while self.allocator.num_free < num_pages:
            victim, chunk = self._pick_device_chunk(shared=False)
            if victim is None:
                if to_host_only:
                    return False
                victim, chunk = self._pick_device_chunk(shared=True)
                if victim is None:
                    return False
                for i in chunk:
                    self._release_page(victim, i)
                self.counts["released_shared_pages"] += len(chunk)
                continue
            pages = [victim.pages[i] for i in chunk]
            if self.host is not None and self._host_room(len(chunk), to_host_only):
                for i, page, host_page in zip(chunk, pages, self.host.allocate(len(chunk))):
                    self.swap_out.append((page, host_page))
                    victim.host_pages[i] = host_page
                    if self.index is not None:
                        self.index.moved_to_host(page, host_page)
                self.counts["device_to_host_pages"] += len(chunk)
            elif to_host_only:
                return False
            else:       # host pages in front of a dropped chunk would be recomputed anyway
                self._free_host([victim.host_pages.pop(i) for i in sorted(victim.host_pages)
                                 if i < chunk[0]])
                self.counts["device_dropped_pages"] += len(chunk)
            self._free_device(pages)
            for i in chunk:
                victim.pages[i] = -1
        return True

    def _host_room(self, num_pages: int, no_drops: bool) -> bool:
        while self.host.num_free < num_pages:
            if no_drops:
                return False
            victim, _ = self._pick(lambda c: sorted(c.host_pages)[:self.chunk_pages])
            if victim is None:
                return False
            chunk = sorted(victim.host_pages)[:self.chunk_pages]
            self._free_host([victim.host_pages.pop(i) for i in chunk])
            self.counts["host_dropped_pages"] += len(chunk)
        return True

    def _pick_device_chunk(self, shared: bool):
        """The idle conversation and chunk (page indices) to evict from the device next: the
        front-most run of pages it holds alone (shared=False) or with others (shared=True)."""
        refs = self.allocator.ref_count

        def chunk(conv):
            run = []
            for i, p in enumerate(conv.pages):
                if p >= 0 and (refs(p) > 1) == shared:
                    run.append(i)
                    if len(run) == self.chunk_pages:
                        break
                elif run:
                    break
            return run
        return self._pick(chunk, weight=(lambda c, run: max(refs(c.pages[i]) for i in run))
                          if shared else None)

    def _pick(self, chunk_of, weight=None):
        """The idle conversation whose chunk (chunk_of(conv): page indices, front first) scores
        lowest under the policy (times weight(conv, chunk): shared pages are worth more)."""
        now = time.monotonic()
        best, best_chunk, best_score = None, [], None
        for conv in self.conversations.values():
            if conv.busy:
                continue
            run = chunk_of(conv)
            if not run:
                continue
            start = run[0] * self.page_size
            n = max(min(len(run) * self.page_size, conv.num_computed - start), 1)
            score = self.policy.score(start, n, now - conv.last_used, conv.last_used)
            if weight is not None:
                score *= weight(conv, run)
            if best_score is None or score < best_score:
                best, best_chunk, best_score = conv, run, score
        return best, best_chunk

    def swap_out_ahead(self, min_free_pages: int) -> None:
        """Copy idle chunks to the host tier ahead of need, until min_free_pages are free."""
        if self.host is not None and self.allocator.num_free < min_free_pages:
            self.make_room(min_free_pages, to_host_only=True)

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
