"""Prefill/decode disaggregation: while some healthy replica only prefills (role "prefill") and
some healthy replica decodes, a turn's prompt runs on a prefill replica and its KV is pushed to
the decode replica the turn then streams from. Before that, the conversation's KV flows back
from its decode replica to the prefill replica (MemServe), so only the new turn is prefilled.
On any failure the decode replica computes what it lacks itself.
"""

from __future__ import annotations

import logging

import grpc

from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.router.cache_view import CacheView
from serving.router.chooser import ReplicaChooser
from serving.router.errors import FAILOVER_CODES, NoReplica
from serving.router.kv_mover import KVMover
from serving.router.records import Conversation
from serving.router.replicas import ReplicaSet
from serving.router.routing import Decision
from serving.router.stats import RouterStats

log = logging.getLogger(__name__)


class Disaggregator:
    """Runs turns' prompts on prefill replicas and hands their KV to decode replicas."""

    def __init__(self, replicas: ReplicaSet, chooser: ReplicaChooser, mover: KVMover,
                 cache: CacheView, stats: RouterStats):
        self.replicas = replicas
        self.chooser = chooser
        self.mover = mover
        self.cache = cache
        self.stats = stats

    def active(self) -> bool:
        """Some healthy replica only prefills and some healthy replica decodes."""
        return self.replicas.disaggregated()

    async def prefill(self, conv: Conversation, ids: list[int]) -> Decision | None:
        """Run a turn's prompt on a prefill replica and push its KV to the decode replica the
        turn then streams from (returned; None: no replica for one of them)."""
        route = self.chooser.route
        try:
            p = self.replicas[route(ids, None, ("prefill", "both"), conv.engine_salt).replica]
            decode = route(ids, conv.home, ("decode", "both"), conv.engine_salt)
        except NoReplica:
            return None
        d = self.replicas[decode.replica]
        if p is d:
            return decode
        home = self.replicas[conv.home] if conv.home is not None else None
        if home is not None and home.healthy and conv.ids and home.index in conv.cids:
            await self.mover.transfer(home, conv.cids[home.index], p, "", False, conv.ids,
                                      self.stats.to_prefill, why="KV back to prefill",
                                      salt=conv.engine_salt, owner=conv.owner)
        prefill = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(
            max_tokens=1, temperature=0.0, ignore_eos=True), cache_salt=conv.salt)
        try:
            last = None
            async for resp in p.stub.Generate(prefill, timeout=60,
                                              metadata=conv.caller.auth or None):
                last = resp
        except grpc.aio.AioRpcError as e:
            log.warning("prefill on %s failed (%s): decoding replica computes the prompt",
                        p.target, e.code().name)
            if e.code() in FAILOVER_CODES:
                self.replicas.mark_down(p, f"{e.code().name}: {e.details()}")
            return decode
        self.stats.prefills += 1
        p.routed += 1
        p.add_load(last.usage.prefilled_tokens + last.usage.recomputed_tokens)
        conv.engine_only[p.index] = last.conversation_id
        self.cache.learn(p, ids, last.conversation_id, conv.engine_salt)
        reply = await self.mover.transfer(p, last.conversation_id, d, conv.cids.get(d.index, ""),
                                          True, ids, self.stats.to_decode, limit=len(ids),
                                          why="prefill to decode", force=True, salt=conv.engine_salt,
                                          owner=conv.owner)
        if reply is not None:
            conv.adopted(d.index, reply.target_conversation_id)
        return decode

    def describe(self) -> dict:
        """Disaggregation's state and counters, for GetStats."""
        return {"active": self.active(), "prefills": self.stats.prefills,
                "to_decode": self.stats.to_decode.as_dict(),
                "to_prefill": self.stats.to_prefill.as_dict()}


__all__ = ["Disaggregator"]
