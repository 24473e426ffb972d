"""KV between engines, through one engine's thread: kvcache/transfer.py's export, import and
match over the engine's KVParts, each run on the engine thread between steps and retried while
the conversation is still flushing its last turn. Engine.export_kv / import_kv / match_kv /
kv_layout delegate here."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from pensieve_jax.kvcache import transfer as kv_transfer


class KVExchange:
    """One engine's side of a KV transfer. call runs a function on the engine thread and
    returns its result or raises its exception (Engine.call)."""

    def __init__(self, call: Callable[[Callable[[], Any]], Any], parts: kv_transfer.KVParts):
        self.call, self.parts = call, parts

    def export_kv(self, conversation_id: str, start: int = 0,
                  limit: int | None = None) -> kv_transfer.ExportedKV:
        """An idle conversation's held KV prefix as ExportedKV (token ids, k/v pages from the
        page holding token `start`, at most `limit` tokens). Raises NoSuchConversation or
        ConversationBusy."""
        return kv_transfer.call_settled(self.call, lambda: kv_transfer.export_kv(
            self.parts, conversation_id, start, limit))

    def import_kv(self, conversation_id: str | None, token_ids, k, v, layout,
                  first_page: int = 0, cache_salt: str | None = None) -> str:
        """Make an idle conversation hold token_ids with KV pages k, v (from first_page on);
        None: the anonymous conversation sharing the longest prefix (or a new one). Returns
        its id. Raises KVMismatch, ConversationBusy or OutOfPages."""
        return kv_transfer.call_settled(self.call, lambda: kv_transfer.import_kv(
            self.parts, conversation_id, token_ids, k, v, layout, first_page, cache_salt or ""))

    def match_kv(self, conversation_id: str | None, token_ids: Sequence[int],
                 cache_salt: str = "") -> tuple[int, int]:
        """(tokens of token_ids the conversation holds in a tier, tokens shared prompt pages
        can serve): what a move of the conversation here would not need to send."""
        return kv_transfer.call_settled(self.call, lambda: kv_transfer.match(
            self.parts.store, conversation_id, token_ids, cache_salt))

    def kv_layout(self) -> kv_transfer.KVLayout:
        """The layout of this engine's KV pages (what an import must match)."""
        return kv_transfer.layout_of(self.parts)
