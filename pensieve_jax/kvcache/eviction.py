"""Which cached chunk leaves a tier first: Pensieve's retention value, or plain LRU.

A chunk is `chunk_pages` consecutive pages of one idle conversation, always the front-most chunk
of that conversation in the tier (causal attention makes leading tokens the cheapest to
recompute). The policy scores candidate chunks; the lowest score is evicted first.

The `Evictor` takes an idle conversation's front-most chunk of pages it alone holds (device ->
host, host -> dropped); shared pages go only when no private page is left, and then only this
conversation's reference goes.
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
    """Evicts idle conversations' chunks from the device (to the host tier, or dropped) and
    from the host tier, choosing them by the policy. Device -> host copies are queued in
    `swap_out` for the swapper (pensieve_jax/kvcache/swap.py) to run before the next step."""

    def __init__(self, ledger: PageLedger, conversations: Mapping[str, Conversation],
                 policy: EvictionPolicy, chunk_pages: int = 2):
        self.ledger = ledger
        self.conversations = conversations      # the store's: candidates are its idle ones
        self.policy = policy
        self.chunk_pages = chunk_pages
        self.swap_out: list[tuple[int, int]] = []     # (device page, host page), to copy
        self.counts = dict.fromkeys(("device_to_host_pages", "host_dropped_pages",
                                     "device_dropped_pages", "released_shared_pages"), 0)

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
            else:       # host pages in front of a dropped chunk would be recomputed anyway
                ledger.free_host([victim.host_pages.pop(i) for i in sorted(victim.host_pages)
                                  if i < chunk[0]])
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
            victim, _ = self._pick(lambda c: sorted(c.host_pages)[:self.chunk_pages])
            if victim is None:
                return False
            chunk = sorted(victim.host_pages)[:self.chunk_pages]
            self.ledger.free_host([victim.host_pages.pop(i) for i in chunk])
            self.counts["host_dropped_pages"] += len(chunk)
        return True

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
        now, ps = time.monotonic(), self.ledger.page_size
        best, best_chunk, best_score = None, [], None
        for conv in self.conversations.values():
            if conv.busy:
                continue
            run = chunk_of(conv)
            if not run:
                continue
            start = run[0] * ps
            n = max(min(len(run) * ps, conv.num_computed - start), 1)
            score = self.policy.score(start, n, now - conv.last_used, conv.last_used)
            if weight is not None:
                score *= weight(conv, run)
            if best_score is None or score < best_score:
                best, best_chunk, best_score = conv, run, score
        return best, best_chunk
