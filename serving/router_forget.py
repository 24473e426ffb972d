"""Forgetting conversations: EndConversation, and the TTL and cap on what the router remembers.
Mixed into RouterService (serving/router.py), whose conversation tables and replicas it uses.

The router's conversations live in a `ConversationTable`. EndConversation forwards the end to
every replica holding a copy and forgets it (a turn in flight finishes first, as on a replica).
An idle conversation is forgotten after conversation_ttl_s (None: never) and, beyond
max_conversations, the least recently used idle one is; either way the router ends its copies on
the replicas (in the background) and drops their holders from the prefix tree, as it does for
EndConversation. A conversation with a turn in flight is never forgotten. Its id is then unknown
(NOT_FOUND, as from a replica whose TTL passed): a client that sends the whole history again (no
conversation_id) starts a new conversation, routed like any other. Generate ids follow the same
TTL and cap, but forgetting one only drops the router's mapping: the engine conversation that
ran it is the replica's anonymous one (later prompts may share its prefix), left to the
replica's own TTL and cache.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from serving.errors import ConversationNotFound
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.router_state import Conversation, Generated

log = logging.getLogger("serving.router")      # the router's one logger, whichever module logs


class ForgetMixin:
    # -- EndConversation ------------------------------------------------------------------------

    async def _end(self, cid: str) -> pb.EndConversationResponse:
        if not cid:
            raise ValueError("conversation_id is empty")
        gen = self._lookup_generated(cid)
        if gen is not None:
            self.generated.pop(cid)
            self.forgotten["generations"]["ended"] += 1
            await self._end_on_replicas([(gen.replica, gen.conversation_id)])
            return pb.EndConversationResponse()
        conv = self._lookup(cid)
        if conv is None:
            raise ConversationNotFound(f"no conversation {cid!r}")
        self._forget(conv, "ended", end=False)
        if not conv.busy:            # else _chat ends the copies when the turn is over
            await self._end_on_replicas(conv.replica_ids())
        return pb.EndConversationResponse()

    # -- forgetting conversations -----------------------------------------------------------

    def _lookup(self, cid: str) -> Conversation | None:
        """The conversation `cid`, or None: unknown, or idle past the TTL (forgotten now, in
        case the expiry loop did not come by yet)."""
        conv = self.conversations.get(cid)
        if conv is not None and self.conversations.is_expired(conv):
            self._forget(conv, "expired")
            return None
        return conv

    def _lookup_generated(self, rid: str) -> Generated | None:
        gen = self.generated.get(rid)
        if gen is not None and self.generated.is_expired(gen):
            self.generated.pop(rid)
            self.forgotten["generations"]["expired"] += 1
            return None
        return gen

    def _remember(self, conv: Conversation) -> None:
        """A conversation accepted a turn: it is (still) known, as the most recently used;
        beyond the cap the least recently used idle ones are forgotten."""
        if conv.dropped:
            return
        self.conversations.touch(conv.id, conv)
        for old in self.conversations.trim():
            self._forget(old, "evicted")

    def _forget(self, conv: Conversation, why: str, end: bool = True) -> None:
        """Forget conv (why: ended, expired, evicted). end: end its copies on the replicas in
        the background (a busy one's after its turn)."""
        self.conversations.pop(conv.id)
        if conv.dropped:
            return
        conv.dropped = True
        self.forgotten["conversations"][why] += 1
        if end and not conv.busy:
            self._end_later(conv.replica_ids())

    def expire(self) -> int:
        """Forget the conversations and Generate ids idle for longer than the TTL. Returns how
        many conversations it forgot."""
        expired = self.conversations.expire()
        for conv in expired:
            self._forget(conv, "expired")
        self.forgotten["generations"]["expired"] += len(self.generated.expire())
        return len(expired)

    async def expiry_loop(self) -> None:
        period = min(max(self.conversations.ttl_s / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            try:
                self.expire()
            except Exception:     # keep expiring
                log.exception("forgetting expired conversations failed")

    def _end_later(self, where: list[tuple[int, str]]) -> None:
        if not where:
            return
        task = asyncio.get_running_loop().create_task(self._end_on_replicas(where))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _end_on_replicas(self, where: list[tuple[int, str]]) -> None:
        """End each (replica, its conversation id) there; once it is gone there, its holder
        leaves the prefix tree (the replica's next cache report would say the same)."""
        async def end(index: int, replica_cid: str) -> None:
            r = self.replicas[index]
            try:
                await r.stub.EndConversation(
                    pb.EndConversationRequest(conversation_id=replica_cid), timeout=10)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:     # down, or busy: it still holds
                    log.debug("ending %s on %s failed: %s", replica_cid, r.target, e.code().name)
                    return                                   # it (its reports will say)
            self.tree.hold((), index, replica_cid, time.monotonic())
            r.learnt.pop(replica_cid, None)
        await asyncio.gather(*(end(i, c) for i, c in where))


__all__ = ["ForgetMixin"]
