"""The pensieve.v1.Pensieve servicer over an Engine: Chat, Generate, EndConversation, GetStats.

A thin servicer over its parts: the open Chat conversations (ConversationTable), the worker
threads of the turns (WorkerPool), the warm-up gate turns wait behind (WarmUpGate), how calls
end and what they count (CallReporter), and the turns themselves (Turns).

Each call's owner is the API key it carries (serving.auth; "" without keys: the server's
interceptor has refused calls without a valid one). Conversations belong to the owner that
created them; any other owner is told NOT_FOUND. limits.max_conversations caps the
conversations kept (serving/server/conversations.py)."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, AsyncIterator

from serving.auth import ApiKeys
from serving.limits import Limits
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.server.calls import CallReporter
from serving.server.conversations import ConversationTable
from serving.server.metrics import Metrics
from serving.server.turns import Turns
from serving.server.warm_up import WarmUpGate
from serving.server.worker import WorkerPool

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine
    from serving.mempool import MemPoolService

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Pensieve"].full_name   # "pensieve.v1.Pensieve"


class PensieveService(pb_grpc.PensieveServicer):
    """The RPCs. Runs on one event loop; blocking engine calls go to worker threads."""

    def __init__(self, engine: "Engine", metrics: Metrics | None = None,
                 model_name: str | None = None, max_streams: int = 1024, *,
                 api_keys: ApiKeys | None = None, limits: Limits | None = None):
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name or engine.model.config.name
        self.ttl = engine.config.conversation_ttl_s
        self.api_keys = api_keys if api_keys is not None else ApiKeys()
        self.limits = limits if limits is not None else Limits()
        self.conversations = ConversationTable(engine, self.ttl, self.limits.max_conversations)
        self.workers = WorkerPool(max_streams)
        self.warm_up = WarmUpGate()
        self.calls = CallReporter(metrics)
        self.turns = Turns(engine, self.conversations, self.workers, self.warm_up,
                           self.calls.observe)
        self.role = "both"              # prefill | decode | both: a hint for routers
        self.mempool: MemPoolService | None = None   # its MemPoolService, once served

    @property
    def active_streams(self) -> int:
        """Chat and Generate calls in progress."""
        return self.calls.active_streams

    @property
    def draining(self) -> bool:
        """Shutting down: no new turns start."""
        return self.workers.draining

    # -- RPCs -----------------------------------------------------------------------------------

    def owner(self, context) -> str:
        """The caller's owner id ("" without API keys); Unauthenticated without a valid key."""
        return self.api_keys.owner_from_metadata(context.invocation_metadata())

    async def Chat(self, request: pb.ChatRequest, context) -> AsyncIterator[pb.ChatResponse]:
        async def turn():
            async for response in self.turns.chat(request, self.owner(context)):
                yield response
        async for response in self.calls.stream("Chat", context, turn()):
            yield response

    async def Generate(self, request: pb.GenerateRequest, context):
        async def turn():
            async for response in self.turns.generate(request, self.owner(context)):
                yield response
        async for response in self.calls.stream("Generate", context, turn()):
            yield response

    async def EndConversation(self, request: pb.EndConversationRequest, context):
        return await self.calls.unary("EndConversation", context, self._end(request, context))

    async def GetStats(self, request: pb.GetStatsRequest, context):
        return await self.calls.unary("GetStats", context, self._stats(context))

    async def _end(self, request: pb.EndConversationRequest,
                   context) -> pb.EndConversationResponse:
        owner = self.owner(context)
        if not request.conversation_id:
            raise ValueError("conversation_id is empty")
        await self.conversations.end(request.conversation_id, owner)
        return pb.EndConversationResponse()

    async def _stats(self, context) -> pb.GetStatsResponse:
        self.owner(context)
        stats = await asyncio.to_thread(self.engine.stats)
        stats["role"] = self.role
        if self.mempool is not None:
            stats["mempool"] = dict(self.mempool.stats)
        device = stats["pages"]["device"]
        return pb.GetStatsResponse(
            stats_json=json.dumps(stats, sort_keys=True), model=self.model_name,
            running=stats["running"], waiting=stats["waiting"],
            conversations=stats["conversations"], pages_used=device["used"],
            pages_total=device["total"], hit_tokens=stats["hit_tokens"],
            miss_tokens=stats["miss_tokens"], active_streams=self.active_streams,
            server_conversations=len(self.conversations))

    # -- for MemPool (serving.mempool.ChatConversations) ----------------------------------------

    def adopt(self, conversation_id: str, cache_salt: str | None = None, owner: str = "") -> None:
        """Open a Chat conversation of `owner` on an engine conversation that already exists (its
        KV was imported through MemPool), unless it is open already: a router continues it with
        ChatRequest.conversation_id plus the messages and history_token_ids of what it holds."""
        self.conversations.adopt(conversation_id, cache_salt, owner)

    def turn_running(self, conversation_id: str) -> bool:
        """Whether the Chat conversation has a turn in progress."""
        return self.conversations.turn_running(conversation_id)

    # -- lifecycle ------------------------------------------------------------------------------

    async def expire_loop(self) -> None:
        """Forget conversations idle for longer than the engine's conversation_ttl_s."""
        await self.conversations.expire_loop()

    async def drain(self, grace: float) -> None:
        """Let running turns finish for up to `grace` seconds, then cancel the rest (their
        streams end with finish_reason "abort")."""
        await self.workers.drain(grace)

    def close(self) -> None:
        self.workers.close()
