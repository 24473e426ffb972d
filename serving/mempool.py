"""MemPool (MemServe): the pensieve.v1.MemPool service a replica serves next to Pensieve, and the
cost model a router uses to move a conversation by KV transfer or by recomputation.

    Match     how many leading tokens of a sequence a replica holds (for a conversation, or
              shared by prefix)
    Export    a conversation's KV pages as a stream of KVChunks (many pages per message: raw
              k/v bytes, shape and dtype in the header's layout)
    Import    a KVChunk stream -> an idle conversation (created, or extended from page
              first_page on); `adopt` also opens a Chat conversation on the server for it, so
              a router can continue it with ChatRequest.conversation_id (+ history_token_ids)
    Transfer  replica -> replica push: Match on the target, then Import there only the pages
              it lacks
    CacheReport  what the cache holds: per conversation, the leading token ids whose KV is on
              device or host, versioned so a router polling it gets only the changes (a
              router's global prefix tree learns evictions and imports from it;
              pensieve_jax/kvcache/report.py)

The engine side (pensieve_jax/kvcache/transfer.py) does one page gather per export and one scatter
per import; the wire carries chunk_bytes of pages per message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import AsyncIterator, Iterator, NamedTuple

import grpc
import numpy as np

from pensieve_jax.kvcache.pages import OutOfPages
from pensieve_jax.kvcache.transfer import ExportedKV, KVLayout, NoSuchConversation, _np_dtype
from serving.errors import ConversationNotFound, TurnInProgress, status_for
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MEMPOOL_SERVICE = pb.DESCRIPTOR.services_by_name["MemPool"].full_name   # "pensieve.v1.MemPool"
CHUNK_BYTES = 4 << 20
MAX_MESSAGE_BYTES = 256 << 20
GRPC_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def layout_to_proto(layout: KVLayout) -> pb.KVLayout:
    return pb.KVLayout(**layout._asdict())


def layout_from_proto(msg: pb.KVLayout) -> KVLayout:
    return KVLayout(msg.model, msg.num_layers, msg.page_size, msg.num_kv_heads, msg.head_dim,
                    msg.dtype)


def to_chunks(kv: ExportedKV, conversation_id: str = "", adopt: bool = False,
              chunk_bytes: int = 0) -> Iterator[pb.KVChunk]:
    """KVChunks of an export: a header, then runs of pages of about chunk_bytes each."""
    num_pages = kv.k.shape[1]
    per = max(1, (chunk_bytes or CHUNK_BYTES) // max(1, kv.layout.page_bytes))
    header = pb.KVChunk(conversation_id=conversation_id, token_ids=kv.token_ids,
                        first_page=kv.first_page, num_pages=num_pages,
                        layout=layout_to_proto(kv.layout), cache_salt=kv.salt, adopt=adopt)
    if num_pages == 0:
        yield header
        return
    for offset in range(0, num_pages, per):
        k, v = kv.k[:, offset:offset + per], kv.v[:, offset:offset + per]
        chunk = header if offset == 0 else pb.KVChunk()
        chunk.page_offset, chunk.k, chunk.v = offset, k.tobytes(), v.tobytes()
        chunk.shape[:] = k.shape
        yield chunk


class Received(NamedTuple):
    header: pb.KVChunk
    kv: ExportedKV
    nbytes: int


async def from_chunks(chunks: AsyncIterator[pb.KVChunk]) -> Received:
    """Reassemble a KVChunk stream (checking that the pages add up)."""
    header, k, v, got, nbytes = None, None, None, 0, 0
    async for chunk in chunks:
        if header is None:
            header = chunk
            layout = layout_from_proto(chunk.layout)
            dtype = _np_dtype(layout.dtype)
            shape = (layout.num_layers, chunk.num_pages) + layout.page_shape[1:]
            k, v = np.empty(shape, dtype), np.empty(shape, dtype)
        if not chunk.k and not chunk.v:
            continue
        shape = tuple(chunk.shape)
        lo = chunk.page_offset
        if len(shape) != 5 or shape[2:] != k.shape[2:] or shape[0] != k.shape[0] or \
                lo < 0 or lo + shape[1] > k.shape[1]:
            raise ValueError(f"KV chunk of shape {shape} at page {lo} does not fit the stream's "
                             f"{k.shape}")
        want = int(np.prod(shape)) * k.dtype.itemsize
        if len(chunk.k) != want or len(chunk.v) != want:
            raise ValueError(f"KV chunk has {len(chunk.k)}/{len(chunk.v)} bytes, expected {want}")
        k[:, lo:lo + shape[1]] = np.frombuffer(chunk.k, k.dtype).reshape(shape)
        v[:, lo:lo + shape[1]] = np.frombuffer(chunk.v, v.dtype).reshape(shape)
        got += shape[1]
        nbytes += want * 2
    if header is None:
        raise ValueError("empty KV stream: the first message must carry the header")
    if got != header.num_pages:
        raise ValueError(f"KV stream carried {got} pages of the {header.num_pages} announced")
    kv = ExportedKV(tuple(header.token_ids), header.first_page, k, v,
                    layout_from_proto(header.layout), header.cache_salt)
    return Received(header, kv, nbytes)


def cache_report_to_proto(r) -> pb.CacheReportResponse:
    """A pensieve_jax.kvcache.report.CacheReport as its message."""
    return pb.CacheReportResponse(
        epoch=r.epoch, version=r.version, full=r.full, removed=r.removed,
        num_conversations=r.num_conversations, page_size=r.page_size,
        conversations=[pb.CachedConversation(conversation_id=h.conversation_id,
                                             cache_salt=h.salt, token_ids=h.token_ids)
                       for h in r.conversations])


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, NoSuchConversation):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, OutOfPages):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    return status_for(exc)


class MemPoolService(pb_grpc.MemPoolServicer):
    """MemPool over the engine of a PensieveService (whose Chat conversations it may adopt)."""

    def __init__(self, service):
        self.service = service
        self.engine = service.engine
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.stats = dict.fromkeys(("exports", "imports", "transfers", "sent_bytes",
                                    "received_bytes", "cache_reports"), 0)
        self._tracker = None

    async def _fail(self, context, exc: BaseException):
        code, message = _status(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("MemPool call failed", exc_info=exc)
        await context.abort(code, message)

    async def Match(self, request: pb.MatchRequest, context) -> pb.MatchResponse:
        from pensieve_jax.kvcache import transfer as kv_transfer
        try:
            own, shared = await asyncio.to_thread(kv_transfer.call_settled, self.engine,
                                                  lambda: kv_transfer.match(
                self.engine, request.conversation_id or None, list(request.token_ids),
                request.cache_salt))
            layout = kv_transfer.layout_of(self.engine)
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
        conv = self.service.conversations.get(cid)
        if conv is not None and conv.turn is not None:
            raise TurnInProgress(f"conversation {cid!r} has a turn in progress")

    async def Export(self, request: pb.ExportRequest, context):
        try:
            limit = request.limit_tokens if request.HasField("limit_tokens") else None
            kv = await self._export(request.conversation_id, request.start_token, limit)
        except Exception as e:
            await self._fail(context, e)
            return
        for chunk in to_chunks(kv, request.conversation_id, chunk_bytes=request.chunk_bytes):
            yield chunk

    async def Import(self, request_iterator, context) -> pb.ImportResponse:
        start = time.perf_counter()
        try:
            got = await from_chunks(request_iterator)
            cid = await self.import_received(got)
        except Exception as e:
            await self._fail(context, e)
        return pb.ImportResponse(conversation_id=cid, num_tokens=got.kv.num_tokens,
                                 bytes=got.nbytes, seconds=time.perf_counter() - start)

    async def import_received(self, got: Received) -> str:
        """Import into the engine; with adopt, open a Chat conversation for it (if new)."""
        h, kv = got.header, got.kv
        cid = h.conversation_id or (f"session-{uuid.uuid4().hex[:12]}" if h.adopt else None)
        if cid is not None:
            self._check_idle(cid)
        cid = await asyncio.to_thread(self.engine.import_kv, cid, kv.token_ids, kv.k, kv.v,
                                      kv.layout, kv.first_page, kv.salt or None)
        if h.adopt and cid not in self.service.conversations:
            self.service.adopt(cid, kv.salt or None)
        self.stats["imports"] += 1
        self.stats["received_bytes"] += got.nbytes
        return cid

    def _stub(self, target: str) -> pb_grpc.MemPoolStub:
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = grpc.aio.insecure_channel(target, GRPC_OPTIONS)
        return pb_grpc.MemPoolStub(channel)

    async def Transfer(self, request: pb.TransferRequest, context) -> pb.TransferResponse:
        start = time.perf_counter()
        try:
            cid = request.conversation_id
            conv = await asyncio.to_thread(self.engine.call, lambda: (
                lambda c: c and (list(c.token_ids[:c.num_computed]), c.salt))(
                    self.engine.store.conversations.get(cid)))
            if not conv:
                raise ConversationNotFound(f"no conversation {cid!r}")
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
                                      timeout=timeout)
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), f"transfer to {request.target}: {e.details()}")
        except Exception as e:
            await self._fail(context, e)
        self.stats["transfers"] += 1
        sent = kv.num_tokens - kv.first_page * kv.layout.page_size
        return pb.TransferResponse(target_conversation_id=reply.conversation_id,
                                   num_tokens=reply.num_tokens, sent_tokens=max(sent, 0),
                                   bytes=kv.nbytes, seconds=time.perf_counter() - start)

    @property
    def tracker(self):
        """The engine's CacheTracker (made on first use)."""
        if self._tracker is None:
            from pensieve_jax.kvcache.report import CacheTracker
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


# -- the router's choice: load the KV, or recompute it -----------------------------------------

class MoveChoice(NamedTuple):
    transfer: bool
    tokens: int              # tokens the target lacks
    bytes: int               # their KV
    transfer_s: float        # estimated: bytes / bandwidth + per-call overhead
    recompute_s: float       # estimated: tokens / prefill speed


@dataclasses.dataclass
class CostModel:
    """Transfer vs recompute, from measured speeds: moving bytes costs bytes / bandwidth (plus a
    per-transfer overhead), recomputing costs tokens / prefill speed. Estimates are running
    averages (EWMA) of what transfers and turns measured; the start values are guesses."""
    bandwidth_bps: float = 1e9       # bytes/s of KV moved replica to replica
    overhead_s: float = 0.005        # fixed cost of one transfer (calls, gather, scatter)
    prefill_tps: float = 5000.0      # prompt tokens/s a replica computes
    alpha: float = 0.3               # weight of a new measurement
    samples: dict = dataclasses.field(default_factory=lambda: {"transfers": 0, "prefills": 0})

    def choose(self, tokens: int, nbytes: int) -> MoveChoice:
        t = self.overhead_s + nbytes / self.bandwidth_bps
        r = tokens / self.prefill_tps
        return MoveChoice(tokens > 0 and t < r, tokens, nbytes, t, r)

    def observe_transfer(self, nbytes: int, seconds: float) -> None:
        """One transfer's bytes and wall time: small ones teach the overhead, large ones the
        bandwidth (over the time left after the overhead)."""
        if seconds <= 0:
            return
        self.samples["transfers"] += 1
        a = self.alpha
        if nbytes < 256 << 10:
            self.overhead_s = (1 - a) * self.overhead_s + a * seconds
        else:
            bw = nbytes / max(seconds - self.overhead_s, seconds / 2)
            self.bandwidth_bps = (1 - a) * self.bandwidth_bps + a * bw

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A turn's computed prompt tokens and its time to first token."""
        if tokens >= 16 and seconds > 0:
            self.samples["prefills"] += 1
            self.prefill_tps = (1 - self.alpha) * self.prefill_tps + self.alpha * tokens / seconds

    def as_dict(self) -> dict:
        return {"bandwidth_bps": self.bandwidth_bps, "overhead_s": self.overhead_s,
                "prefill_tps": self.prefill_tps, "samples": dict(self.samples)}


__all__ = ["CostModel", "GRPC_OPTIONS", "MEMPOOL_SERVICE", "MemPoolService", "MoveChoice",
           "Received", "cache_report_to_proto", "from_chunks", "layout_from_proto",
           "layout_to_proto", "to_chunks"]
