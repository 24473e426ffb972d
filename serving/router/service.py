"""The router's gRPC servicer: the pensieve.v1.Pensieve API over its composed parts.

    replicas   ReplicaSet             the replica servers: stubs, health, roles, load
    cache      CacheView              the prefix tree and the replicas' cache reports
    chooser    ReplicaChooser         the routing policy over the healthy replicas
    mover      KVMover                a conversation's KV between replicas (MemPool)
    disagg     Disaggregator          prefill/decode disaggregation
    directory  ConversationDirectory  which conversation lives where; forgetting
    stats      RouterStats            the counters every part reports to

Chat and Generate run in serving/router/chat.py and generate.py; EndConversation is the
directory's; GetStats sums the healthy replicas' stats and adds the router's own
(`router_stats()`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Callable, Sequence

import grpc

from serving.auth import ApiKeys
from serving.errors import status_for
from serving.mempool import CostModel
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.router.cache_view import CacheView
from serving.router.chat import ChatTurns
from serving.router.chooser import ReplicaChooser
from serving.router.directory import ConversationDirectory
from serving.router.disaggregation import Disaggregator
from serving.router.errors import NoReplica, RemoteError
from serving.router.generate import GenerateCalls
from serving.router.keys import ChatKeys
from serving.router.kv_mover import KVMover
from serving.router.links import Caller, ReplicaAddress, ReplicaLinks
from serving.router.replicas import ROLES, ReplicaSet
from serving.router.routing import E2Config
from serving.router.stats import RouterStats

log = logging.getLogger(__name__)
MAX_CONVERSATIONS = 10_000     # default cap on the conversations the router remembers


class RouterService(pb_grpc.PensieveServicer):
    """One pensieve.v1.Pensieve endpoint in front of the replica servers at `targets`
    ("HOST:PORT[,internal=[HOST:]PORT]", serving/router/links.py). api_keys: its callers' keys
    (owners); links: how it reaches the replicas (TLS, cluster secret, its own key)."""

    def __init__(self, targets: Sequence[str | ReplicaAddress], policy: str = "e2",
                 tokenizer=None,
                 e2: E2Config = E2Config(), window_s: float = 60.0, kv_move: str = "auto",
                 roles: Sequence[str] | None = None, cost: CostModel | None = None,
                 cache_report_interval_s: float = 1.0, conversation_ttl_s: float | None = None,
                 max_conversations: int | None = MAX_CONVERSATIONS,
                 clock: Callable[[], float] = time.monotonic, api_keys: ApiKeys | None = None,
                 links: ReplicaLinks = ReplicaLinks()):
        self.api_keys = api_keys if api_keys is not None else ApiKeys()
        self.stats = RouterStats()
        self.keys = ChatKeys(tokenizer)
        self.replicas = ReplicaSet(targets, window_s, roles, links)
        self.cache = CacheView(self.replicas, self.stats, self.keys.exact,
                               cache_report_interval_s)
        self.chooser = ReplicaChooser(self.replicas, self.cache, self.stats, policy, e2)
        self.mover = KVMover(self.cache, cost, kv_move)
        self.disagg = Disaggregator(self.replicas, self.chooser, self.mover, self.cache,
                                    self.stats)
        self.directory = ConversationDirectory(self.replicas, self.cache, self.stats,
                                               conversation_ttl_s, max_conversations, clock)
        self.chats = ChatTurns(self.replicas, self.chooser, self.cache, self.mover,
                               self.disagg, self.directory, self.keys, self.stats)
        self.generates = GenerateCalls(self.replicas, self.chooser, self.cache,
                                       self.directory, self.keys, self.stats)
        self.active_streams = 0

    def connect(self) -> None:
        self.replicas.connect()

    async def close(self) -> None:
        await self.directory.close()          # ends of forgotten conversations on their way
        await self.replicas.close()

    # -- RPCs -----------------------------------------------------------------------------------

    async def Chat(self, request: pb.ChatRequest, context):
        caller = Caller.of(context, self.api_keys)
        async for response in self._guard(context, self.chats.chat(request, context, caller)):
            yield response

    async def Generate(self, request: pb.GenerateRequest, context):
        caller = Caller.of(context, self.api_keys)
        async for response in self._guard(context,
                                          self.generates.generate(request, context, caller)):
            yield response

    async def EndConversation(self, request: pb.EndConversationRequest, context):
        try:
            await self.directory.end(request.conversation_id, Caller.of(context, self.api_keys))
            return pb.EndConversationResponse()
        except Exception as e:
            await _abort(context, e)

    async def GetStats(self, request: pb.GetStatsRequest, context):
        stats = await asyncio.gather(*(self.replicas.stats(r) for r in self.replicas))
        live = [s for s in stats if s is not None]
        out = pb.GetStatsResponse(model=live[0].model if live else "",
                                  active_streams=self.active_streams,
                                  server_conversations=len(self.conversations))
        for s in live:
            for f in ("running", "waiting", "conversations", "pages_used", "pages_total",
                      "hit_tokens", "miss_tokens"):
                setattr(out, f, getattr(out, f) + getattr(s, f))
        out.stats_json = json.dumps({
            "router": self.router_stats(),
            "replicas": [json.loads(s.stats_json) if s is not None else None for s in stats]},
            sort_keys=True)
        return out

    async def _guard(self, context, responses: AsyncIterator) -> AsyncIterator:
        self.active_streams += 1
        error = None
        try:
            async for response in responses:
                yield response
        except asyncio.CancelledError:
            raise
        except Exception as e:
            error = e
        finally:
            await responses.aclose()
            self.active_streams -= 1
        if error is not None:
            await _abort(context, error)

    # -- the parts' operations, for the server, the cluster and tests ---------------------------

    def route(self, ids: list[int], home: int | None, roles: Sequence[str] = ROLES,
              salt: str = ""):
        """The replica for a request (ReplicaChooser.route)."""
        return self.chooser.route(ids, home, roles, salt)

    def apply_report(self, replica, reply: pb.CacheReportResponse, sent_at: float) -> None:
        """Reconcile the tree with a cache report (CacheView.apply_report)."""
        self.cache.apply_report(replica, reply, sent_at)

    def expire(self) -> int:
        """Forget what is idle past the TTL (ConversationDirectory.expire)."""
        return self.directory.expire()

    async def evacuate(self, index: int) -> int:
        """A replica is leaving (graceful shutdown): route nothing more to it and move the KV
        of every idle conversation living there to another replica (or leave it to be
        recomputed, as the cost model says). Returns how many moved by transfer."""
        src = self.replicas.leave(index)
        moved = 0
        for conv in self.directory.homed_at(index):
            roles = ("decode", "both") if self.disagg.active() else ROLES
            try:
                choice = self.chooser.route(conv.ids, None, roles, conv.engine_salt)
                dst = self.replicas[choice.replica]
            except (LookupError, NoReplica):
                break
            if await self.mover.move(conv, src, dst, self.stats.moves):
                conv.home = dst.index
                moved += 1
                if conv.dropped:      # forgotten while it moved: end the new copy too
                    self.directory.end_later(conv.replica_ids(), conv.caller.auth)
        return moved

    def router_stats(self) -> dict[str, Any]:
        """The router's own statistics (GetStats' stats_json "router")."""
        return {
            "policy": self.policy, **self.stats.report_stats(), **self.mover.describe(),
            "disaggregation": self.disagg.describe(),
            "conversations": len(self.conversations),
            "conversation_table": self.directory.describe(),
            **self.cache.describe(),
            "replicas": [{**d, **self.cache.describe_replica(r)} for d, r in
                         zip(self.replicas.describe(time.monotonic()), self.replicas)]}

    # -- the parts' state by its old names (tests, benchmarks) -----------------------------------

    policy = property(lambda self: self.chooser.policy)
    tree = property(lambda self: self.cache.tree)
    conversations = property(lambda self: self.directory.conversations)
    generated = property(lambda self: self.directory.generated)
    reports = property(lambda self: self.stats.reports)
    reasons = property(lambda self: self.stats.reasons)
    counters = property(lambda self: self.stats.counters)
    e2 = property(lambda self: self.chooser.e2,
                  lambda self, value: setattr(self.chooser, "e2", value))
    kv_move = property(lambda self: self.mover.kv_move,
                       lambda self, value: setattr(self.mover, "kv_move", value))
    events = property(lambda self: self.stats.events,
                      lambda self, value: setattr(self.stats, "events", value))


async def _abort(context, error: Exception) -> None:
    if isinstance(error, RemoteError):
        code, message = error.code, error.details
    elif isinstance(error, NoReplica):
        code, message = grpc.StatusCode.UNAVAILABLE, str(error)
    else:
        code, message = status_for(error)
        if code == grpc.StatusCode.INTERNAL:
            log.error("router call failed", exc_info=error)
    await context.abort(code, message)


__all__ = ["MAX_CONVERSATIONS", "RouterService"]
