"""The pensieve.v1.MemPool servicer: Match, Export, Import, Transfer and CacheReport over the
engine of the Pensieve service it is served next to.

It is served on the server's internal port only (serving/server/internal.py), behind the cluster
secret. Transfer pushes KV only to `peers` (the internal addresses the operator configured,
`--peer`; others: PERMISSION_DENIED), sending the secret (and TLS to them with
peer_credentials). A conversation adopted by an Import belongs to the owner the call names in
metadata x-pensieve-owner (a router passes its client's owner on; Transfer forwards it)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Protocol, Sequence

import grpc

from pensieve_jax.kvcache.pages import OutOfPages
from pensieve_jax.kvcache.report import CacheTracker
from pensieve_jax.kvcache.transfer import ExportedKV, NoSuchConversation
from serving.auth import OWNER_METADATA, ClusterSecret, metadata_value, new_id
from serving.channels import aio_channel
from serving.errors import ConversationNotFound, TurnInProgress, clip, status_for
from serving.mempool.wire import GRPC_OPTIONS, Received, cache_report_to_proto, from_chunks, \
    layout_to_proto, to_chunks
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine

log = logging.getLogger(__name__)


class ChatConversations(Protocol):
    """What MemPool needs of the Pensieve service next to it (serving.server.PensieveService)."""
    engine: "Engine"

    def turn_running(self, conversation_id: str) -> bool:
        """Whether the Chat conversation has a turn in progress."""

    def adopt(self, conversation_id: str, cache_salt: str | None = None, owner: str = "") -> None:
        """Open a Chat conversation of `owner` on an engine conversation, unless it is open
        already."""


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, NoSuchConversation):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, OutOfPages):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    return status_for(exc)


def _owner(context) -> str:
    """The owner an internal call names (x-pensieve-owner), "" for none."""
    return metadata_value(context.invocation_metadata(), OWNER_METADATA) or ""


class MemPoolService(pb_grpc.MemPoolServicer):
    """MemPool over the engine of a PensieveService (whose Chat conversations it may adopt)."""

    def __init__(self, service: ChatConversations, peers: Sequence[str] = (),
                 secret: ClusterSecret | None = None,
                 peer_credentials: grpc.ChannelCredentials | None = None):
        self.service = service
        self.engine = service.engine
        self.peers: set[str] = set(peers)        # Transfer targets allowed (internal addresses)
        self.secret = secret                     # sent to peers
        self.peer_credentials = peer_credentials
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.stats = dict.fromkeys(("exports", "imports", "transfers", "sent_bytes",
                                    "received_bytes", "cache_reports"), 0)
        self._tracker: CacheTracker | None = None

    async def _fail(self, context, exc: BaseException):
        code, message = _status(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("MemPool call failed", exc_info=exc)
        await context.abort(code, message)

    async def Match(self, request: pb.MatchRequest, context) -> pb.MatchResponse:
        try:
            own, shared = await asyncio.to_thread(
                self.engine.match_kv, request.conversation_id or None,
                list(request.token_ids), request.cache_salt)
            layout = self.engine.kv_layout()
        except Exception as e:
            await self._fail(context, e)
        return pb.MatchResponse(conversation_tokens=own, shared_tokens=shared,
                                layout=layout_to_proto(layout), page_bytes=layout.page_bytes)

    async def _export(self, cid: str, start: int, limit: int | None) -> ExportedKV:
        self._check_idle(cid)
        kv = await asyncio.to_thread(self.engine.export_kv, cid, start, limit)
        self.stats["exports"] += 1
        self.stats["sent_bytes"] += kv.nbytes
        return kv

    def _check_idle(self, cid: str) -> None:
        if self.service.turn_running(cid):
            raise TurnInProgress(f"conversation {clip(cid)} has a turn in progress")

    async def Export(self, request: pb.ExportRequest, context):
        try:
            limit = request.limit_tokens if request.HasField("limit_tokens") else None
            kv = await self._export(request.conversation_id, request.start_token, limit)
        except Exception as e:
            await self._fail(context, e)
            return
        for chunk in to_chunks(kv, request.conversation_id, chunk_bytes=request.chunk_bytes):
            yield chunk

    def allow_peers(self, targets: Sequence[str]) -> None:
        """Allow Transfers to these internal addresses too (HOST:PORT, as Transfer names them)."""
        self.peers.update(targets)

    async def Import(self, request_iterator, context) -> pb.ImportResponse:
        start = time.perf_counter()
        try:
            got = await from_chunks(request_iterator)
            cid = await self.import_received(got, _owner(context))
        except Exception as e:
            await self._fail(context, e)
        return pb.ImportResponse(conversation_id=cid, num_tokens=got.kv.num_tokens,
                                 bytes=got.nbytes, seconds=time.perf_counter() - start)

    async def import_received(self, got: Received, owner: str = "") -> str:
        """Import into the engine; with adopt, open a Chat conversation of `owner` for it (if
        new)."""
        h, kv = got.header, got.kv
        cid = h.conversation_id or (new_id("session-") if h.adopt else None)
        if cid is not None:
            self._check_idle(cid)
        cid = await asyncio.to_thread(self.engine.import_kv, cid, kv.token_ids, kv.k, kv.v,
                                      kv.layout, kv.first_page, kv.salt or None)
        if h.adopt:
            self.service.adopt(cid, kv.salt or None, owner=owner)
        self.stats["imports"] += 1
        self.stats["received_bytes"] += got.nbytes
        return cid

    def _stub(self, target: str) -> pb_grpc.MemPoolStub:
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = aio_channel(
                target, GRPC_OPTIONS, self.peer_credentials,
                self.secret.metadata() if self.secret is not None else ())
        return pb_grpc.MemPoolStub(channel)

    async def Transfer(self, request: pb.TransferRequest, context) -> pb.TransferResponse:
        start = time.perf_counter()
        if request.target not in self.peers:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"transfer target {clip(request.target)} is not a configured "
                                "peer (pensieve serve --peer HOST:PORT)")
        owner = _owner(context)
        try:
            cid = request.conversation_id
            conv = await asyncio.to_thread(self.engine.computed_tokens, cid)
            if not conv:
                raise ConversationNotFound(f"no conversation {clip(cid)}")
            tokens, salt = conv
            limit = request.limit_tokens if request.HasField("limit_tokens") else None
            if limit is not None:
                tokens = tokens[:limit]
            stub = self._stub(request.target)
            timeout = context.time_remaining()
            there = await stub.Match(pb.MatchRequest(
                conversation_id=request.target_conversation_id, token_ids=tokens,
                cache_salt=salt), timeout=timeout)
            new_there = request.adopt and not request.target_conversation_id
            held = 0 if new_there else there.conversation_tokens
            kv = await self._export(cid, held, limit)
            reply = await stub.Import(to_chunks(kv, request.target_conversation_id,
                                                request.adopt, request.chunk_bytes),
                                      timeout=timeout,
                                      metadata=((OWNER_METADATA, owner),) if owner else None)
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), f"transfer to {clip(request.target)}: {e.details()}")
        except Exception as e:
            await self._fail(context, e)
        self.stats["transfers"] += 1
        sent = kv.num_tokens - kv.first_page * kv.layout.page_size
        return pb.TransferResponse(target_conversation_id=reply.conversation_id,
                                   num_tokens=reply.num_tokens, sent_tokens=max(sent, 0),
                                   bytes=kv.nbytes, seconds=time.perf_counter() - start)

    @property
    def tracker(self) -> CacheTracker:
        """The engine's CacheTracker (made on first use)."""
        if self._tracker is None:
            self._tracker = CacheTracker(self.engine)
        return self._tracker

    async def CacheReport(self, request: pb.CacheReportRequest, context) -> pb.CacheReportResponse:
        try:
            r = await asyncio.to_thread(self.tracker.report, request.epoch, request.since_version)
        except Exception as e:
            await self._fail(context, e)
        self.stats["cache_reports"] += 1
        return cache_report_to_proto(r)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
