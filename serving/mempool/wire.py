"""MemPool's wire format: KV layouts, KVChunk streams and cache reports as pensieve.v1 messages.

An export goes out as a header KVChunk (conversation, token ids, first page, page count, layout)
followed by runs of about chunk_bytes of pages each (raw k/v bytes and their shape); the header
carries the first run when there are pages."""

from __future__ import annotations

from typing import AsyncIterator, Iterator, NamedTuple

import numpy as np

from pensieve_jax.kvcache.transfer import ExportedKV, KVLayout, numpy_dtype
from serving.pensieve.v1 import pensieve_pb2 as pb

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
    """A reassembled KVChunk stream: its header message, the KV it carried, and its bytes."""
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
            dtype = numpy_dtype(layout.dtype)
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
