"""The conversation table: which conversation lives where (the router's conversations and
Generate ids), and forgetting them.

EndConversation forwards the end to every replica holding a copy and forgets the conversation
(a turn in flight finishes first, as on a replica). An idle conversation is forgotten after
conversation_ttl_s (None: never) and, beyond max_conversations, the least recently used idle
one is; either way the router ends its copies on the replicas (in the background) and drops
their holders from the prefix tree, as it does for EndConversation. A conversation with a turn
in flight is never forgotten. Its id is then unknown (NOT_FOUND, as from a replica whose TTL
passed): a client that sends the whole history again (no conversation_id) starts a new
conversation, routed like any other. Generate ids follow the same TTL and cap, but forgetting
one only drops the router's mapping: the engine conversation that ran it is the replica's
anonymous one (later prompts may share its prefix), left to the replica's own TTL and cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import grpc

from serving.errors import ConversationNotFound, clip
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.router.cache_view import CacheView
from serving.router.links import Caller, Metadata
from serving.router.records import Conversation, Generated
from serving.router.replicas import ReplicaSet
from serving.router.stats import RouterStats
from serving.router.table import ConversationTable

log = logging.getLogger(__name__)


class ConversationDirectory:
    """The router's conversations (`conversations`: router id -> Conversation) and Generate
    results (`generated`: result id -> Generated), bounded by a TTL and a cap."""

    def __init__(self, replicas: ReplicaSet, cache: CacheView, stats: RouterStats,
                 ttl_s: float | None = None, max_conversations: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.replicas = replicas
        self.cache = cache
        self.stats = stats
        self.conversations = ConversationTable(ttl_s, max_conversations, clock)
        self.generated = ConversationTable(ttl_s, max_conversations, clock)
        self.ending: set[asyncio.Task] = set()       # ends of forgotten copies on replicas

    # -- looking up -------------------------------------------------------------------------------

    def lookup(self, cid: str) -> Conversation | None:
        """The conversation `cid`, or None: unknown, or idle past the TTL (forgotten now, in
        case the expiry loop did not come by yet)."""
        conv = self.conversations.get(cid)
        if conv is not None and self.conversations.is_expired(conv):
            self.forget(conv, "expired")
            return None
        return conv

    def lookup_generated(self, rid: str) -> Generated | None:
        gen = self.generated.get(rid)
        if gen is not None and self.generated.is_expired(gen):
            self.generated.pop(rid)
            self.stats.forgotten["generations"]["expired"] += 1
            return None
        return gen

    def homed_at(self, index: int) -> list[Conversation]:
        """The idle conversations whose latest turn ran on replica `index`."""
        return [c for c in self.conversations.values()
                if c.home == index and not c.busy and c.ids]

    # -- remembering ------------------------------------------------------------------------------

    def remember(self, conv: Conversation) -> None:
        """A conversation accepted a turn: it is (still) known, as the most recently used;
        beyond the cap the least recently used idle ones are forgotten."""
        if conv.dropped:
            return
        self.conversations.touch(conv.id, conv)
        for old in self.conversations.trim():
            self.forget(old, "evicted")

    def touch(self, conv: Conversation) -> None:
        """Mark conv used now, if it is still known."""
        if conv.id in self.conversations:
            self.conversations.touch(conv.id, conv)

    def turn_ended(self, conv: Conversation) -> None:
        """conv's turn is over: idle from now, or its copies ended if it was ended meanwhile."""
        conv.busy = False
        if conv.dropped:
            self.end_later(conv.replica_ids(), conv.caller.auth)
        else:
            self.touch(conv)

    def remember_generated(self, rid: str, gen: Generated) -> None:
        self.generated.touch(rid, gen)
        for _ in self.generated.trim():
            self.stats.forgotten["generations"]["evicted"] += 1

    # -- forgetting -------------------------------------------------------------------------------

    async def end(self, cid: str, caller: Caller = Caller()) -> None:
        """EndConversation: forget `cid` (a conversation or a Generate id of the caller's) and
        end its copies on the replicas (a busy conversation's after its turn)."""
        if not cid:
            raise ValueError("conversation_id is empty")
        gen = self.lookup_generated(cid)
        if gen is not None and gen.caller.owner == caller.owner:
            self.generated.pop(cid)
            self.stats.forgotten["generations"]["ended"] += 1
            await self.end_on_replicas([(gen.replica, gen.conversation_id)], caller.auth)
            return
        conv = self.lookup(cid)
        if conv is None or conv.owner != caller.owner:     # another owner's: as if unknown
            raise ConversationNotFound(f"no conversation {clip(cid)}")
        self.forget(conv, "ended", end=False)
        if not conv.busy:            # else turn_ended ends the copies when the turn is over
            await self.end_on_replicas(conv.replica_ids(), conv.caller.auth)

    def forget(self, conv: Conversation, why: str, end: bool = True) -> None:
        """Forget conv (why: ended, expired, evicted). end: end its copies on the replicas in
        the background (a busy one's after its turn)."""
        self.conversations.pop(conv.id)
        if conv.dropped:
            return
        conv.dropped = True
        self.stats.forgotten["conversations"][why] += 1
        if end and not conv.busy:
            self.end_later(conv.replica_ids(), conv.caller.auth)

    def expire(self) -> int:
        """Forget the conversations and Generate ids idle for longer than the TTL. Returns how
        many conversations it forgot."""
        expired = self.conversations.expire()
        for conv in expired:
            self.forget(conv, "expired")
        self.stats.forgotten["generations"]["expired"] += len(self.generated.expire())
        return len(expired)

    async def expiry_loop(self) -> None:
        period = min(max(self.conversations.ttl_s / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            try:
                self.expire()
            except Exception:     # keep expiring
                log.exception("forgetting expired conversations failed")

    def end_later(self, where: list[tuple[int, str]], auth: Metadata = ()) -> None:
        """End each (replica, its conversation id) in the background, as the caller whose
        authorization is `auth`."""
        if not where:
            return
        task = asyncio.get_running_loop().create_task(self.end_on_replicas(where, auth))
        self.ending.add(task)
        task.add_done_callback(self.ending.discard)

    async def end_on_replicas(self, where: list[tuple[int, str]], auth: Metadata = ()) -> None:
        """End each (replica, its conversation id) there, as the caller whose authorization is
        `auth` (the conversation's owner); once it is gone there, its holder leaves the prefix
        tree (the replica's next cache report would say the same)."""
        async def end(index: int, replica_cid: str) -> None:
            r = self.replicas[index]
            try:
                await r.stub.EndConversation(
                    pb.EndConversationRequest(conversation_id=replica_cid), timeout=10,
                    metadata=auth or None)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:     # down, or busy: it still holds
                    log.debug("ending %s on %s failed: %s", replica_cid, r.target, e.code().name)
                    return                                   # it (its reports will say)
            self.cache.let_go(index, replica_cid)
        await asyncio.gather(*(end(i, c) for i, c in where))

    async def close(self) -> None:
        """Wait a little for the ends still on their way, then cancel them."""
        if self.ending:
            await asyncio.wait(list(self.ending), timeout=5)
            for task in list(self.ending):
                task.cancel()

    def describe(self) -> dict[str, Any]:
        """The table's size, bounds and what it forgot, for GetStats."""
        table, forgotten = self.conversations, self.stats.forgotten
        return {"held": len(table), "in_flight": table.busy(), "ttl_s": table.ttl_s,
                "max_conversations": table.max_entries or 0, **forgotten["conversations"],
                "generations": {"held": len(self.generated), **forgotten["generations"]}}


__all__ = ["ConversationDirectory"]
