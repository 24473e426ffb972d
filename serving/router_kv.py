"""Moving conversations' KV between replicas (MemPool), and prefill/decode disaggregation.
Mixed into RouterService (serving/router.py), whose replicas, routing and prefix tree it uses.

Moves: a turn routed away from the conversation's home replica (a rebalance, a failover with
the home still up) or a replica leaving (`evacuate`) has the conversation's KV pushed from the
old replica to the new one (MemPool.Match on both, then MemPool.Transfer) when the cost model
(serving/mempool.py `CostModel`, or kv_move: "transfer", "recompute") says loading it beats
recomputing it; otherwise the new replica recomputes it.

Disaggregation: while some healthy replica only prefills (role "prefill") and some healthy
replica decodes, a turn's prompt runs on a prefill replica and its KV is pushed to the decode
replica the turn then streams from. Before that, the conversation's KV flows back from its
decode replica to the prefill replica (MemServe), so only the new turn is prefilled. On any
failure the decode replica computes what it lacks itself.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.router_errors import _RETRY, NoReplica
from serving.router_state import ROLES, Conversation, MoveCounters, Replica
from serving.routing import Decision

log = logging.getLogger("serving.router")      # the router's one logger, whichever module logs


class KVMixin:
    # -- MemPool: moving KV between replicas ----------------------------------------------------

    async def _transfer(self, src: Replica, src_cid: str, dst: Replica, dst_cid: str,
                        adopt: bool, tokens: list[int], counters: MoveCounters,
                        limit: int | None = None, why: str = "move", force: bool = False,
                        salt: str = ""):
        """Push src's KV of a conversation (of cache salt `salt`) to dst when the cost model (or
        kv_move) says loading it beats recomputing it. Returns the TransferResponse, or None
        (dst recomputes). The KV keeps its salt on dst (the chunks carry the source's)."""
        if self.kv_move == "recompute" and not force:
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
                conversation_id=src_cid, target=dst.target, target_conversation_id=dst_cid,
                adopt=adopt, limit_tokens=limit), timeout=60)
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
        self._learn(dst, tokens[:reply.num_tokens], reply.target_conversation_id, salt)
        return reply

    async def _move(self, conv: Conversation, src: Replica, dst: Replica,
                    counters: MoveCounters) -> bool:
        """Move conv's KV from src to dst (a rebalance, a failover with src still up, an
        evacuation), when that is cheaper than recomputing it there."""
        src_cid = conv.cids.get(src.index)
        if src_cid is None or not conv.ids:
            return False
        dst_cid = conv.cids.get(dst.index, "")
        reply = await self._transfer(src, src_cid, dst, dst_cid, True, conv.ids, counters,
                                     salt=conv.salt)
        if reply is None:
            return False
        if reply.target_conversation_id != dst_cid:
            conv.cids[dst.index] = reply.target_conversation_id
            conv.covered[dst.index] = 0          # the next Chat sends messages + exact ids
        return True

    async def evacuate(self, index: int) -> int:
        """A replica is leaving (graceful shutdown): route nothing more to it and move the KV
        of every idle conversation living there to another replica (or leave it to be
        recomputed, as the cost model says). Returns how many moved by transfer."""
        src = self.replicas[index]
        src.leaving = True
        self.mark_down(src, "leaving (evacuated)")
        moved = 0
        for conv in list(self.conversations.values()):
            if conv.home != index or conv.busy or not conv.ids:
                continue
            roles = ("decode", "both") if self.disaggregated() else ROLES
            try:
                dst = self.replicas[self.route(conv.ids, None, roles, conv.salt).replica]
            except (LookupError, NoReplica):
                break
            if await self._move(conv, src, dst, self.moves):
                conv.home = dst.index
                moved += 1
                if conv.dropped:      # forgotten while it moved: end the new copy too
                    self._end_later(conv.replica_ids())
        return moved

    # -- prefill/decode disaggregation ----------------------------------------------------------

    def disaggregated(self) -> bool:
        """Some healthy replica only prefills and some healthy replica decodes."""
        up = {r.role for r in self.replicas if r.healthy}
        return "prefill" in up and bool(up & {"decode", "both"})

    async def _disaggregate(self, conv: Conversation, ids: list[int]) -> Decision | None:
        """Run a turn's prompt on a prefill replica and push its KV to the decode replica the
        turn then streams from (returned). Before that, the conversation's KV flows back from
        its decode replica to the prefill replica (MemServe), so only the new turn is
        prefilled. On any failure the decode replica computes what it lacks itself."""
        try:
            p = self.replicas[self.route(ids, None, ("prefill", "both"), conv.salt).replica]
            decode = self.route(ids, conv.home, ("decode", "both"), conv.salt)
        except NoReplica:
            return None
        d = self.replicas[decode.replica]
        if p is d:
            return decode
        home = self.replicas[conv.home] if conv.home is not None else None
        if home is not None and home.healthy and conv.ids and home.index in conv.cids:
            await self._transfer(home, conv.cids[home.index], p, "", False, conv.ids,
                                 self.disagg["to_prefill"], why="KV back to prefill",
                                 salt=conv.salt)
        prefill = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(
            max_tokens=1, temperature=0.0, ignore_eos=True), cache_salt=conv.salt)
        try:
            last = None
            async for resp in p.stub.Generate(prefill, timeout=60):
                last = resp
        except grpc.aio.AioRpcError as e:
            log.warning("prefill on %s failed (%s): decoding replica computes the prompt",
                        p.target, e.code().name)
            if e.code() in _RETRY:
                self.mark_down(p, f"{e.code().name}: {e.details()}")
            return decode
        self.disagg["prefills"] += 1
        p.routed += 1
        p.add_load(last.usage.prefilled_tokens + last.usage.recomputed_tokens)
        conv.engine_only[p.index] = last.conversation_id
        self._learn(p, ids, last.conversation_id, conv.salt)
        reply = await self._transfer(p, last.conversation_id, d, conv.cids.get(d.index, ""),
                                     True, ids, self.disagg["to_decode"], limit=len(ids),
                                     why="prefill to decode", force=True, salt=conv.salt)
        if reply is not None and reply.target_conversation_id != conv.cids.get(d.index):
            conv.cids[d.index] = reply.target_conversation_id
            conv.covered[d.index] = 0
        return decode


__all__ = ["KVMixin"]
