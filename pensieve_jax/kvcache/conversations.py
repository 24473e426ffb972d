"""Conversations and where their KV lives between turns: device pages, host pages, or dropped.

The store is built from three parts, each in its own module:

    | part     | class (module)            | does                                             |
    |----------|---------------------------|--------------------------------------------------|
    | ledger   | PageLedger (ledger.py)    | which conversation holds which device/host page:  |
    |          |                           | references, sharing, the prefix index            |
    | evictor  | Evictor (eviction.py)     | idle conversations' chunks leave the device (to   |
    |          |                           | host, or dropped), the host tier (to disk, or    |
    |          |                           | dropped) and the disk tier, by a policy          |
    | restorer | Restorer (restore.py)     | a returning conversation gets its pages back from |
    |          |                           | its own tiers or the index, and recomputes the   |
    |          |                           | one range that is left (usually a prefix)        |

The store keeps the conversations themselves (creating, adopting, forking, rewinding, ending
them) and is the facade the scheduler and engine call; the `Conversation` record is described in
ledger.py. A conversation's `token_ids` are its token history, the one copy in the process
(issue 19): a Session reads and sets it through the engine (engine/history.py, Engine.history).
It outlives the conversation's KV: a stateless turn, eviction, a
preemption, a failed turn or conversation_ttl_s let KV go; the history goes only with the
conversation (`end`; `expire` for one no open Session holds).
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable

from pensieve_jax.kvcache import disk_restart
from pensieve_jax.kvcache.disk_cache import DiskCache
from pensieve_jax.kvcache.errors import ConversationBusy
from pensieve_jax.kvcache.eviction import EvictionPolicy, Evictor, LRUPolicy
from pensieve_jax.kvcache.ledger import Conversation, PageLedger
from pensieve_jax.kvcache.pages import PageAllocator
from pensieve_jax.kvcache.prefix_index import PrefixIndex, common_prefix
from pensieve_jax.kvcache.restore import RestorePlan, Restorer, SwapIn

__all__ = ["Conversation", "ConversationStore", "RestorePlan", "SwapIn", "common_prefix"]


class ConversationStore:
    """Every conversation of an engine and the pages it holds: the conversations here, their
    pages in `ledger`, eviction in `evictor`, restoring in `restorer` (built by the store)."""

    def __init__(self, allocator: PageAllocator, page_size: int,
                 host_allocator: PageAllocator | None = None,
                 policy: EvictionPolicy | None = None, chunk_pages: int = 2,
                 sharing: bool = True, disk: DiskCache | None = None):
        self.ledger = PageLedger(allocator, page_size, host_allocator,
                                 PrefixIndex(page_size) if sharing else None,
                                 disk if disk is not None and disk.enabled else None)
        self.conversations: dict[str, Conversation] = {}
        self.closing: set[str] = set()           # ended while busy: removed at release
        self.held: set[str] = set()              # an open Session's: expire keeps the history
        self.evictor = Evictor(self.ledger, self.conversations, policy or LRUPolicy(),
                               chunk_pages)
        self.restorer = Restorer(self.ledger)
        self.evicted_tokens = 0                  # computed tokens let go by drop_kv
        # the parts, as the scheduler and engine see them (docstrings: the parts' own)
        self.allocator, self.host = self.ledger.device, self.ledger.host   # host None: no tier
        self.index, self.page_size = self.ledger.index, page_size   # index None: no sharing
        self.policy = self.evictor.policy
        self.truncate, self.register = self.ledger.truncate, self.ledger.register
        self.held_tokens = self.ledger.held_tokens
        self.make_room, self.swap_out_ahead = self.evictor.make_room, self.evictor.swap_out_ahead
        self.attach_shared, self.make_writable = (self.restorer.attach_shared,
                                                  self.restorer.make_writable)
        self.plan_restore, self.restore = self.restorer.plan_restore, self.restorer.restore

    @property
    def recompute_cheaper(self) -> Callable[[int, int], bool] | None:
        """(first token, tokens) -> True if recomputing them beats loading their page from
        host memory (None: always load); the restorer's."""
        return self.restorer.recompute_cheaper

    @recompute_cheaper.setter
    def recompute_cheaper(self, fn: Callable[[int, int], bool] | None) -> None:
        self.restorer.recompute_cheaper = fn

    @property
    def counts(self) -> dict[str, int]:
        """Page and token counters of the evictor, the store and the restorer."""
        return {**self.evictor.counts, "evicted_tokens": self.evicted_tokens,
                **self.restorer.counts}

    # -- conversations ------------------------------------------------------------------------

    def new_anonymous(self, salt: str = "") -> Conversation:
        """A new, empty anonymous conversation (an unguessable id: 128 random bits)."""
        conv = Conversation(f"anon-{secrets.token_hex(16)}", True, salt)
        self.conversations[conv.id] = conv
        return conv

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
        conv = self.new_anonymous(salt)
        if best is not None:
            self.ledger.fork(best, conv, best_len)
        return conv

    def reopen(self, conversation_id: str, token_ids: list[int], salt: str = "") -> Conversation:
        """A conversation an earlier process kept (a state directory), created idle with its
        token history and the KV unclaimed page files on disk hold for it (disk_restart.claim).
        Raises ValueError if the id is in use."""
        if conversation_id in self.conversations:
            raise ValueError(f"conversation {conversation_id[:100]!r} already exists")
        conv = Conversation(conversation_id, False, salt, list(token_ids))
        if self.ledger.disk is not None:
            disk_restart.claim(self.ledger.disk, conv)
        self.conversations[conversation_id] = conv
        return conv

    def cached_prefix(self, conversation_id: str | None, prompt: list[int], salt: str) -> int:
        """Tokens of prompt a request could find cached (its conversation's or shared)."""
        conv = self.conversations.get(conversation_id) if conversation_id else None
        own = common_prefix(conv.token_ids[:conv.num_computed], prompt) if conv else 0
        if self.index is None:
            return own
        nodes, partial = self.index.match(salt, prompt, len(prompt) - 1)
        return max(own, self.index.matched_tokens(nodes, partial))

    def drop_kv(self, conv: Conversation) -> None:
        """Let all of conv's KV go (it is recomputed when its turn runs again)."""
        self.evicted_tokens += conv.num_computed
        self.truncate(conv, 0)

    def reserve(self, conv: Conversation, num_tokens: int) -> bool:
        """Make conv hold device pages for tokens [0, num_tokens), evicting idle conversations'
        chunks when the pool is short. False if it still does not fit."""
        need = -(-num_tokens // self.page_size) - len(conv.pages)
        if need <= 0:
            return True
        if not self.evictor.make_room(need):
            return False
        conv.pages.extend(self.ledger.device.allocate(need))
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
        self.held.discard(conversation_id)
        if conversation_id not in self.conversations:
            return False
        if self.conversations[conversation_id].busy:
            self.closing.add(conversation_id)
        else:
            self.remove(conversation_id)
        return True

    def remove(self, conversation_id: str) -> bool:
        """Forget an idle conversation and free its cache. False if unknown or busy."""
        conv = self.conversations.get(conversation_id)
        if conv is None or conv.busy:
            return False
        self.truncate(conv, 0)
        del self.conversations[conversation_id]
        return True

    def expire(self, ttl_s: float) -> int:
        """Forget idle conversations unused for ttl_s seconds; one `held` (an open Session's)
        only loses its KV, its token history stays until `end`. Returns how many."""
        cutoff = time.monotonic() - ttl_s
        old = [c for c in self.conversations.values() if not c.busy and c.last_used < cutoff
               and (c.id not in self.held or c.pages or c.num_computed)]
        for conv in old:
            if conv.id in self.held:
                self.truncate(conv, 0)
            else:
                self.remove(conv.id)
        return len(old)

    def rewind(self, conversation_id: str, token_ids: list[int], salt: str = "") -> Conversation:
        """Between its turns, a named conversation's token history becomes exactly token_ids
        (it is created if unknown, and `held`): the KV of the computed prefix they share stays,
        the rest goes. ValueError if it has another salt; ConversationBusy while a turn runs."""
        conv = self.get_or_create(conversation_id, token_ids, salt)
        if conv.busy:
            raise ConversationBusy(f"conversation {conversation_id[:100]!r} has a turn running")
        self.ledger.rewind(conv, token_ids)
        self.held.add(conversation_id)
        return conv

    def take_transfers(self):
        """(swap-outs, device copies, swap-ins) planned since the last call, to run in that
        order before the next step."""
        return (self.evictor.take_swap_outs(), *self.restorer.take_copies())

    def swapped_in(self, host_pages: list[int]) -> None:
        """Host pages whose contents were copied back to the device can be let go."""
        self.ledger.free_host(host_pages)

    # -- stats --------------------------------------------------------------------------------

    def report_stats(self) -> dict[str, Any]:
        """A Reporter (model/reporting.py): conversations, `counts`, cached_tokens_resident
        (computed tokens of idle conversations, shared ones per holder), resident_tokens,
        sharing (device pages held by several conversations, the index's size), eviction_policy."""
        index = self.index.stats() if self.index is not None else {}
        return {"conversations": len(self.conversations), **self.counts,
                "cached_tokens_resident": sum(c.num_computed for c in
                                              self.conversations.values() if not c.busy),
                "resident_tokens": resident_tokens(self.conversations.values(), self.page_size),
                "eviction_policy": self.policy.name,
                "sharing": {"shared_pages": self.ledger.shared_device_pages(), **index,
                            "enabled": self.index is not None}}


def resident_tokens(conversations, page_size: int) -> dict[str, int]:
    """Tokens of the idle ones of conversations by tier (device / host / disk; shared pages once
    each; whole pages)."""
    device, host, disk = set(), set(), 0
    for c in conversations:
        if not c.busy:
            device.update(p for p in c.pages if p >= 0)
            host.update(c.host_pages.values())
            disk += len(c.disk_pages)
    return {"device": len(device) * page_size, "host": len(host) * page_size,
            "disk": disk * page_size}
