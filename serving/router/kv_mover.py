"""Moving a conversation's KV between replicas through MemPool.

A turn routed away from the conversation's home replica (a rebalance, a failover with the home
still up) or a replica leaving (evacuation) has the conversation's KV pushed from the old
replica to the new one (MemPool.Match on both, then MemPool.Transfer) when the cost model
(serving/mempool `CostModel`, or kv_move: "transfer", "recompute") says loading it beats
recomputing it; otherwise the new replica recomputes it. Replicas the router knows no internal
(MemPool) address of recompute. The Transfer names the conversation's owner (metadata
x-pensieve-owner): the copy the target adopts belongs to the same owner.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from serving.auth import OWNER_METADATA
from serving.mempool import CostModel
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.router.cache_view import CacheView
from serving.router.records import Conversation
from serving.router.replicas import Replica
from serving.router.stats import MoveCounters

KV_MOVES = ("auto", "transfer", "recompute")

log = logging.getLogger(__name__)


class KVMover:
    """Pushes conversations' KV from replica to replica, or leaves it to be recomputed, as
    kv_move and the cost model say. What it pushes, the cache view credits to the target."""

    def __init__(self, cache: CacheView, cost: CostModel | None = None, kv_move: str = "auto"):
        if kv_move not in KV_MOVES:
            raise ValueError(f"kv_move must be one of {KV_MOVES}, got {kv_move!r}")
        self.cache = cache
        self.cost = cost or CostModel()
        self.kv_move = kv_move

    async def transfer(self, src: Replica, src_cid: str, dst: Replica, dst_cid: str,
                       adopt: bool, tokens: list[int], counters: MoveCounters,
                       limit: int | None = None, why: str = "move", force: bool = False,
                       salt: str = "", owner: str = ""):
        """Push src's KV of a conversation (of cache salt `salt`, belonging to `owner`) to dst
        when the cost model (or kv_move) says loading it beats recomputing it. Returns the
        TransferResponse, or None (dst recomputes). The KV keeps its salt on dst (the chunks
        carry the source's)."""
        if (self.kv_move == "recompute" and not force) or src.mempool is None or \
                dst.mempool is None:
            counters.recomputes += 1
            return None
        try:
            have, lack = await asyncio.gather(
                src.mempool.Match(pb.MatchRequest(conversation_id=src_cid, token_ids=tokens,
                                                  cache_salt=salt), timeout=10),
                dst.mempool.Match(pb.MatchRequest(conversation_id=dst_cid, token_ids=tokens,
                                                  cache_salt=salt), timeout=10))
            own = lack.conversation_tokens if dst_cid or not adopt else 0
            held = max(own, lack.shared_tokens)
            size = have.layout.page_size or 1
            pages = -(-have.conversation_tokens // size) - own // size
            choice = self.cost.choose(have.conversation_tokens - held,
                                      max(pages, 0) * have.page_bytes)
            transfer = force or self.kv_move == "transfer" or choice.transfer
            log.info("%s %s -> %s: %d tokens (%d bytes): transfer %.4f s vs recompute %.4f s: %s",
                     why, src.target, dst.target, choice.tokens, choice.bytes, choice.transfer_s,
                     choice.recompute_s, "transfer" if transfer else "recompute")
            if not transfer or have.conversation_tokens <= own:
                counters.recomputes += 1
                return None
            reply = await src.mempool.Transfer(pb.TransferRequest(
                conversation_id=src_cid, target=dst.internal, target_conversation_id=dst_cid,
                adopt=adopt, limit_tokens=limit), timeout=60,
                metadata=((OWNER_METADATA, owner),) if owner else None)
        except grpc.aio.AioRpcError as e:
            log.warning("%s %s -> %s failed (%s: %s): recomputing", why, src.target, dst.target,
                        e.code().name, e.details())
            counters.failed += 1
            return None
        counters.transfers += 1
        counters.tokens += reply.sent_tokens
        counters.bytes += reply.bytes
        counters.seconds += reply.seconds
        self.cost.observe_transfer(reply.bytes, reply.seconds)
        self.cache.learn(dst, tokens[:reply.num_tokens], reply.target_conversation_id, salt)
        return reply

    async def move(self, conv: Conversation, src: Replica, dst: Replica,
                   counters: MoveCounters) -> bool:
        """Move conv's KV from src to dst (a rebalance, a failover with src still up, an
        evacuation), when that is cheaper than recomputing it there."""
        src_cid = conv.cids.get(src.index)
        if src_cid is None or not conv.ids:
            return False
        dst_cid = conv.cids.get(dst.index, "")
        reply = await self.transfer(src, src_cid, dst, dst_cid, True, conv.ids, counters,
                                    salt=conv.engine_salt, owner=conv.owner)
        if reply is None:
            return False
        conv.adopted(dst.index, reply.target_conversation_id)
        return True

    def describe(self) -> dict:
        """The move mode and the cost model, for GetStats."""
        return {"kv_move": self.kv_move, "cost_model": self.cost.as_dict()}


__all__ = ["KVMover", "KV_MOVES"]
