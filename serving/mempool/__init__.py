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

    wire.py     the messages: layouts, KVChunk streams, cache reports; gRPC message limits
    service.py  MemPoolService, the servicer
    cost.py     CostModel: transfer or recompute
"""

from serving.mempool.cost import CostModel, MoveChoice
from serving.mempool.service import ChatConversations, MemPoolService
from serving.mempool.wire import CHUNK_BYTES, GRPC_OPTIONS, MAX_MESSAGE_BYTES, MEMPOOL_SERVICE, \
    Received, cache_report_to_proto, from_chunks, layout_from_proto, layout_to_proto, to_chunks

__all__ = ["CHUNK_BYTES", "ChatConversations", "CostModel", "GRPC_OPTIONS", "MAX_MESSAGE_BYTES",
           "MEMPOOL_SERVICE", "MemPoolService", "MoveChoice", "Received",
           "cache_report_to_proto", "from_chunks", "layout_from_proto", "layout_to_proto",
           "to_chunks"]
