"""What a state directory needs of an engine (issue 22): the engine options that put its disk
tier in DIR/kv, the fingerprint its records and page files are checked against, durable copies
of the idle conversations' KV, and conversations of an earlier process reopened on the page
files it left.

    with_state_dir(config, state_dir)            -> EngineConfig (disk tier in DIR/kv)
    fingerprint(layout)                          -> {"page_layout": {...}}   (StateStore.open)
    flush_to_disk(engine, ids, deadline)         # at shutdown: device and host pages to disk
    reopen(engine, conversation_id, token_ids, salt) -> tokens whose KV the page files hold
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Sequence

from pensieve_jax.engine.config import EngineConfig
from pensieve_jax.kvcache.page_file import PageLayout

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine

KV_DIR = "kv"                       # DIR/kv: the disk tier's page files
DEFAULT_HOST_BYTES = 256 << 20      # a state directory's tiers unless the options set them
DEFAULT_DISK_BYTES = 4 << 30


def with_state_dir(config: EngineConfig, state_dir: str | os.PathLike) -> EngineConfig:
    """config with its disk tier in state_dir/kv (and a host tier, which the disk tier needs):
    256 MiB host and 4 GiB disk where config leaves them 0. A disk_cache_dir elsewhere is
    refused (ValueError): the page files belong with the records."""
    if not isinstance(state_dir, (str, os.PathLike)) or not os.fspath(state_dir).strip():
        raise ValueError(f"state_dir must be a non-empty path, got {str(state_dir)[:100]!r}")
    kv = os.path.join(os.fspath(state_dir), KV_DIR)
    if config.disk_cache_dir is not None and \
            os.path.abspath(config.disk_cache_dir) != os.path.abspath(kv):
        raise ValueError(f"disk_cache_dir {config.disk_cache_dir[:100]!r} differs from the "
                         f"state directory's {kv[:100]!r}: leave disk_cache_dir unset")
    return dataclasses.replace(config, disk_cache_dir=kv,
                               host_cache_bytes=config.host_cache_bytes or DEFAULT_HOST_BYTES,
                               disk_cache_bytes=config.disk_cache_bytes or DEFAULT_DISK_BYTES)


def fingerprint(layout: PageLayout) -> dict:
    """The model and KV page layout (dtype, page size, layers, KV heads, head dim, model) of
    an engine (parts.page_layout; engine.parts.disk.layout once built)."""
    return {"page_layout": dataclasses.asdict(layout)}


def flush_to_disk(engine: "Engine", conversation_ids: list[str] | None = None,
                  deadline: float | None = None) -> int:
    """Write durable copies of the device and host pages of idle conversations (or the ones
    named, in that order: the most valuable first) to page files a later process can reopen;
    returns the pages written (0 without a disk tier). Blocks until they are on disk; with a
    deadline (time.monotonic()), starts no page file after it (what is left is recomputed
    after a restart; see DiskWrites.flush_to_disk)."""
    def run() -> int:
        engine.steps.settle_copies()
        return engine.swapper.flush_to_disk(conversation_ids, deadline)
    return engine.call(run)


def reopen(engine: "Engine", conversation_id: str, token_ids: Sequence[int],
           cache_salt: str = "") -> int:
    """An idle conversation with this exact token history, holding the KV the page files on
    disk keep for it (the rest is recomputed on its next turn); returns those tokens. A
    conversation the engine still has (this process's) is left as it is: its own tokens."""
    def run() -> int:
        conv = engine.store.conversations.get(conversation_id)
        if conv is not None:
            return conv.num_computed
        conv = engine.store.reopen(conversation_id, list(token_ids), cache_salt)
        ps = engine.config.page_size
        return sum(min(ps, conv.num_computed - i * ps) for i in conv.disk_pages)
    return engine.call(run)
