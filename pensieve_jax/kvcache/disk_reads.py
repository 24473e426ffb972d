"""Reading page files back for restores (the disk tier's read side, `DiskCache.reads`).

A restore plan asks `readable` for each page it would load from disk: the file is read and
every checksum verified once (or, while it is still being written, its pages are taken from
memory), and its header must name the pages and token ids the cache expects. The restore then
`take`s each slot, which lets it go. Files read for plans that were not carried out are
forgotten at the next step (`forget_all`), so memory holds what one step loads.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from pensieve_jax.kvcache import page_file
from pensieve_jax.kvcache.page_file import LayoutMismatch, PageFileError

if TYPE_CHECKING:
    from pensieve_jax.kvcache.disk_cache import DiskCache, DiskFile

log = logging.getLogger(__name__)

__all__ = ["DiskReads"]


class DiskReads:
    def __init__(self, disk: "DiskCache"):
        self.disk = disk
        self.on_load: Callable[[int, float], None] | None = None   # (bytes, seconds) per read
        self._loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def readable(self, name: str, slot: int, tokens: list[int]) -> bool:
        """Whether slot `slot` of file name can be loaded and holds KV for `tokens` (a prefix of
        what it was written for)."""
        self.disk.poll()
        f = self.disk.files.get(name)
        if f is None or not self._load(f):
            return False
        written = f.tokens[slot]
        return len(tokens) <= len(written) and tuple(tokens) == written[:len(tokens)]

    def take(self, name: str, slot: int, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """k, v [layers, page_size, ...] of a slot `readable` said yes to; the slot is let go.
        num_tokens: tokens it serves (statistics)."""
        f = self.disk.files.get(name)
        if f is None or not self._load(f):
            raise RuntimeError(f"disk tier: page file {name} vanished between plan and restore")
        k, v = self._loaded[name]
        out = k[:, slot].copy(), v[:, slot].copy()
        self.disk.stats["served_tokens"] += num_tokens
        self.disk.stats["loaded_pages"] += 1
        self.disk.release(name, slot)
        return out

    def forget(self, name: str) -> None:
        """A file that went: its pages are not kept."""
        self._loaded.pop(name, None)

    def forget_all(self) -> None:
        """Drop the files read for restore plans whose restore did not follow (a turn sent
        back to wait reads them again)."""
        self._loaded.clear()

    def _load(self, f: "DiskFile") -> bool:
        disk, stats = self.disk, self.disk.stats
        if f.name in self._loaded:
            return True
        if f.state == "writing" and disk.writes.arrays(f.name) is not None:
            self._loaded[f.name] = disk.writes.arrays(f.name)
            stats["loaded_unwritten_files"] += 1          # served before it was written
            return True
        if f.state != "written":
            return False
        start = time.perf_counter()
        try:
            header, k, v = page_file.read_page_file(disk.path(f.name), disk.layout)
            if (header.conversation_id, header.pages, header.tokens) != (
                    f.conversation_id, f.pages, f.tokens):
                raise PageFileError(f"{f.name}: holds other pages than the cache expects")
        except (OSError, PageFileError) as e:
            log.warning("disk tier: %s; its pages will be recomputed", e)
            stats["refused_files" if isinstance(e, LayoutMismatch) else "bad_files"] += 1
            f.state = "bad"
            return False
        seconds = time.perf_counter() - start
        self._loaded[f.name] = (k, v)
        stats["load_s"] += seconds
        stats["loaded_files"] += 1
        stats["loaded_bytes"] += f.nbytes
        if self.on_load is not None:
            self.on_load(f.nbytes, seconds)
        return True
