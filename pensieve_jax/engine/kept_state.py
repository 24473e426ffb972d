"""What a state directory needs of an engine (issue 22): the fingerprint its records and page
files are checked against, durable copies of the idle conversations' KV, and conversations of an
earlier process reopened on the page files it left.

    fingerprint(engine)                          -> {"page_layout": {...}}   (StateStore.open)
    flush_to_disk(engine)                        # at shutdown: device and host pages to disk
    reopen(engine, conversation_id, token_ids, salt) -> tokens whose KV the page files hold
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine


def fingerprint(engine: "Engine") -> dict:
    """The model and KV page layout (dtype, page size, layers, KV heads, head dim, model)."""
    return {"page_layout": dataclasses.asdict(engine.parts.disk.layout)}


def flush_to_disk(engine: "Engine", conversation_ids: list[str] | None = None) -> int:
    """Write durable copies of the device and host pages of idle conversations (or the ones
    named) to page files a later process can reopen; returns the pages written (0 without a
    disk tier). Blocks until they are on disk."""
    def run() -> int:
        engine.steps.settle_copies()
        return engine.swapper.flush_to_disk(conversation_ids)
    return engine.call(run)


def reopen(engine: "Engine", conversation_id: str, token_ids: Sequence[int],
           cache_salt: str = "") -> int:
    """An idle conversation with this exact token history, holding the KV the page files on
    disk keep for it (the rest is recomputed on its next turn); returns those tokens."""
    def run() -> int:
        conv = engine.store.reopen(conversation_id, list(token_ids), cache_salt)
        return sum(1 for _ in conv.disk_pages) * engine.config.page_size
    return engine.call(run)
