"""Page files across a restart: copies written for a later process (`write_unclaimed`, what
flush_to_disk writes) and a reopened conversation claiming them (`claim`).

A file is claimed slot by slot, only by the conversation id and cache salt it was written for,
and only where its token ids equal the conversation's history at those positions; the newest
file wins where several hold the same page. Files found at start whose layout differs from the
engine's were refused when the DiskCache opened its directory.
"""

from __future__ import annotations

import numpy as np

from pensieve_jax.kvcache import page_file
from pensieve_jax.kvcache.disk_cache import DiskCache, DiskFile
from pensieve_jax.kvcache.ledger import Conversation

__all__ = ["claim", "write_unclaimed"]


def write_unclaimed(disk: DiskCache, conversation_id: str, salt: str, pages: list[int],
                    tokens: list[list[int]], k: np.ndarray, v: np.ndarray,
                    keep_since: float | None = None) -> DiskFile | None:
    """Start writing a copy of pages a conversation keeps elsewhere (k, v [layers, pages, ...]),
    held by no one until a reopened conversation claims it (durable once DiskCache.poll(wait=
    True) has seen it written). Older unclaimed files make room, those written since
    keep_since (a time.time(): this flush's own) excepted; None if there is none."""
    f = disk.plan(conversation_id, salt, pages, tokens, [])
    while disk.free_bytes < f.nbytes:
        if not disk.drop_unclaimed(before=keep_since):
            return None
    f.held.clear()
    disk.add(f, queue=False)
    disk.write(f, k, v)
    return f


def claim(disk: DiskCache, conv: Conversation) -> int:
    """Give conv (new, holding nothing, its token history set) the unclaimed slots written for
    it that match its history: its pages become disk pages, and num_computed reaches the end of
    the last one (pages before it with no file are recomputed at its next turn). Returns the
    pages claimed."""
    ps, want = disk.layout.page_size, page_file.salt_digest(conv.salt)
    found: dict[int, tuple[str, int]] = {}
    ends: dict[int, int] = {}
    for f in sorted(disk.files.values(), key=lambda f: -f.written):
        if f.conversation_id != conv.id or f.salt != want or f.state != "written":
            continue
        for slot, (i, tokens) in enumerate(zip(f.pages, f.tokens)):
            if (i not in found and slot not in f.held and tokens and
                    tuple(conv.token_ids[i * ps:i * ps + len(tokens)]) == tokens):
                found[i] = (f.name, slot)
                ends[i] = i * ps + len(tokens)
                f.held.add(slot)
    if found:
        last = max(found)
        conv.pages = [-1] * (last + 1)
        conv.disk_pages = found
        conv.num_computed = ends[last]
    disk.stats["claimed_pages"] += len(found)
    return len(found)
