"""Which cached chunk leaves a tier first: Pensieve's retention value, or plain LRU.

A chunk is `chunk_pages` consecutive pages of one idle conversation, always the front-most chunk
of that conversation in the tier (causal attention makes leading tokens the cheapest to
recompute). The policy scores candidate chunks; the lowest score is evicted first.

The `Evictor` takes an idle conversation's front-most chunk of pages it alone holds (device ->
host -> disk -> dropped; a tier that is missing or full passes the chunk on to the next);
shared pages go only when no private page is left, and then only this conversation's reference
goes. A host chunk goes to disk only if the policy values it above the disk chunk it would
displace (else it is dropped); a conversation's dropped pages always form a prefix, so pages in
front of a dropped chunk go too (they would be recomputed anyway).
"""

from __future__ import annotations

import time
from typing import Mapping, Protocol

from pensieve_jax.kvcache.ledger import Conversation, PageLedger
from pensieve_jax.model.config import ModelConfig


class EvictionPolicy(Protocol):
    name: str

    def score(self, first_token: int, num_tokens: int, idle_s: float, last_used: float) -> float:
        """Lower is evicted first. first_token: position of the chunk's first token."""


class PensievePolicy:
    """Retention value = recompute cost of the chunk / time its conversation has been idle.

    Cost of prefilling the token at position p is modelled as a + b * p: a for the weights
    (2 * parameters per token) and b for attention over p earlier tokens (4 * heads * head_dim
    per layer), so a chunk further into a conversation costs more to rebuild.
    """

    name = "pensieve"

    def __init__(self, config: ModelConfig):
        c = config
        per_layer_params = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim +
                            c.num_heads * c.head_dim * c.hidden_size +
                            3 * c.hidden_size * c.intermediate_size)
        self.a = 2.0 * per_layer_params
        self.b = 4.0 * c.num_heads * c.head_dim

    def cost(self, first_token: int, num_tokens: int) -> float:
        mid = first_token + (num_tokens - 1) / 2
        return num_tokens * (self.a + self.b * mid)

    def score(self, first_token: int, num_tokens: int, idle_s: float, last_used: float) -> float:
        return self.cost(first_token, num_tokens) / max(idle_s, 1e-3)


class LRUPolicy:
    """Least recently used conversation first (its front chunk first)."""

    name = "lru"

    def score(self, first_token: int, num_tokens: int, idle_s: float, last_used: float) -> float:
        return last_used + first_token * 1e-9     # ties inside a conversation: front first


def make_policy(name: str, config: ModelConfig) -> EvictionPolicy:
    if name == "pensieve":
        return PensievePolicy(config)
    if name == "lru":
        return LRUPolicy()
    raise ValueError(f"unknown eviction policy {name!r} (available: pensieve, lru)")


class Evictor:
    """Evicts idle conversations' chunks from the device (to the host tier, or dropped), from
    the host tier (to disk, or dropped) and from disk, choosing them by the policy. Device ->
    host copies are queued in `swap_out`, and page files in the ledger's DiskCache, for the
    swapper (pensieve_jax/kvcache/swap.py) to run before the next step."""

    def __init__(self, ledger: PageLedger, conversations: Mapping[str, Conversation],
                 policy: EvictionPolicy, chunk_pages: int = 2):
        self.ledger = ledger
        self.conversations = conversations      # the store's: candidates are its idle ones
        self.policy = policy
        self.chunk_pages = chunk_pages
        self.swap_out: list[tuple[int, int]] = []     # (device page, host page), to copy
        self.counts = dict.fromkeys(("device_to_host_pages", "host_dropped_pages",
                                     "device_dropped_pages", "released_shared_pages",
                                     "host_to_disk_pages", "disk_dropped_pages"), 0)

    def take_swap_outs(self) -> list[tuple[int, int]]:
        """The (device page, host page) copies queued since the last call."""
        out, self.swap_out = self.swap_out, []
        return out

    def make_room(self, num_pages: int, to_host_only: bool = False) -> bool:
        """Evict idle conversations' chunks from the device until num_pages are free: to the
        host tier when there is one (making room there by dropping host chunks), else dropped.
        Shared pages go last, one holder at a time. to_host_only: never drop anything."""
        ledger = self.ledger
        while ledger.device.num_free < num_pages:
            victim, chunk = self._pick_device_chunk(shared=False)
            if victim is None:
                if to_host_only:
                    return False
                victim, chunk = self._pick_device_chunk(shared=True)
                if victim is None:
                    return False
                for i in chunk:
                    ledger.release_page(victim, i)
                self.counts["released_shared_pages"] += len(chunk)
                continue
            pages = [victim.pages[i] for i in chunk]
            if ledger.host is not None and self._host_room(len(chunk), to_host_only):
                for i, page, host_page in zip(chunk, pages, ledger.host.allocate(len(chunk))):
                    self.swap_out.append((page, host_page))
                    victim.host_pages[i] = host_page
                    if ledger.index is not None:
                        ledger.index.moved_to_host(page, host_page)
                self.counts["device_to_host_pages"] += len(chunk)
            elif to_host_only:
                return False
            else:       # pages in front of a dropped chunk would be recomputed anyway
                self._drop_front(victim, chunk[0])
                self.counts["device_dropped_pages"] += len(chunk)
            ledger.free_device(pages)
            for i in chunk:
                victim.pages[i] = -1
        return True

    def swap_out_ahead(self, min_free_pages: int) -> None:
        """Copy idle chunks to the host tier ahead of need, until min_free_pages are free."""
        if self.ledger.host is not None and self.ledger.device.num_free < min_free_pages:
            self.make_room(min_free_pages, to_host_only=True)

    def _host_room(self, num_pages: int, no_drops: bool) -> bool:
        while self.ledger.host.num_free < num_pages:
            if no_drops:
                return False
            victim, chunk = self._pick(lambda c: sorted(c.host_pages)[:self.chunk_pages])
            if victim is None:
                return False
            if self._to_disk(victim, chunk):
                continue
            self._drop_front(victim, chunk[0])
            self.ledger.free_host([victim.host_pages.pop(i) for i in chunk])
            self.counts["host_dropped_pages"] += len(chunk)
        return True

    def _drop_front(self, conv: Conversation, first: int) -> None:
        """conv's host and disk pages in front of page `first` go (it is being dropped)."""
        for i in sorted({*conv.host_pages, *conv.disk_pages}):
            if i < first:
                self.ledger.release_page(conv, i)

    def _to_disk(self, conv: Conversation, chunk: list[int]) -> bool:
        """Move conv's host pages `chunk` to a page file, making room on disk by dropping
        unclaimed files, then disk chunks the policy values less. False: no disk tier, or the
        chunk is worth less than what it would displace."""
        disk, ps = self.ledger.disk, self.ledger.page_size
        if disk is None or not disk.enabled:
            return False
        tokens = [conv.token_ids[i * ps:min((i + 1) * ps, conv.num_computed)] for i in chunk]
        f = disk.plan(conv.id, conv.salt, chunk, tokens,
                      [self._source(conv.host_pages[i]) for i in chunk])
        if not self._disk_room(f.nbytes, self._score(conv, chunk, time.monotonic())):
            return False
        disk.add(f)
        for slot, i in enumerate(chunk):
            conv.disk_pages[i] = (f.name, slot)
        self.ledger.free_host([conv.host_pages.pop(i) for i in chunk])
        self.counts["host_to_disk_pages"] += len(chunk)
        return True

    def _source(self, host_page: int) -> tuple[str, int]:
        """Where a host page's contents are now: its device page while the copy to it is still
        queued (then the copy is cancelled if no one else holds the host page), else itself."""
        for j, (device_page, h) in enumerate(self.swap_out):
            if h == host_page:
                if self.ledger.host.ref_count(host_page) == 1:
                    del self.swap_out[j]
                return ("device", device_page)
        return ("host", host_page)

    def _disk_room(self, nbytes: int, worth: float) -> bool:
        """Free nbytes on disk for a chunk the policy scores `worth`."""
        disk = self.ledger.disk
        if nbytes > disk.capacity_bytes:
            return False
        disk.poll()                          # files let go while being written free up
        while disk.free_bytes < nbytes:
            if disk.drop_unclaimed():
                continue
            victim, chunk = self._pick(self._front_disk_chunk)
            if victim is None or self._score(victim, chunk, time.monotonic()) > worth:
                return False
            for i in chunk:
                self.ledger.release_page(victim, i)
            self.counts["disk_dropped_pages"] += len(chunk)
        return True

    @staticmethod
    def _front_disk_chunk(conv: Conversation) -> list[int]:
        """The page indices of conv's front-most page file."""
        if not conv.disk_pages:
            return []
        name = conv.disk_pages[min(conv.disk_pages)][0]
        return sorted(i for i, (n, _) in conv.disk_pages.items() if n == name)

    def _pick_device_chunk(self, shared: bool):
        """The idle conversation and chunk (page indices) to evict from the device next: the
        front-most run of pages it holds alone (shared=False) or with others (shared=True)."""
        refs = self.ledger.device.ref_count

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
            score = self._score(conv, run, now)
            if weight is not None:
                score *= weight(conv, run)
            if best_score is None or score < best_score:
                best, best_chunk, best_score = conv, run, score
        return best, best_chunk

    def _score(self, conv: Conversation, run: list[int], now: float) -> float:
        """The policy's score of conv's pages `run` (page indices, front first)."""
        start = run[0] * self.ledger.page_size
        n = max(min(len(run) * self.ledger.page_size, conv.num_computed - start), 1)
        return self.policy.score(start, n, now - conv.last_used, conv.last_used)
