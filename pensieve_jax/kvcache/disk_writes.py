"""Page file writes, run by the swapper between steps, and flushing conversations to disk.

A page file planned by the evictor names where each of its pages is now: a host page (written
at once, before any later copy can reuse that page), or a device page whose copy to host was
cancelled (gathered now and copied asynchronously, like a swap-out; written at the next call,
so the copy overlaps a step). Until a file is written its pages count as missing.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from pensieve_jax.kvcache import disk_restart
from pensieve_jax.kvcache.background_writes import WORKERS
from pensieve_jax.kvcache.conversations import ConversationStore
from pensieve_jax.kvcache.disk_cache import DiskCache
from pensieve_jax.kvcache.host_cache import HostCache
from pensieve_jax.runner.model_runner import pages_to_host
from pensieve_jax.runner.seam import Runner

__all__ = ["DiskWrites"]


class DiskWrites:
    def __init__(self, runner: Runner, store: ConversationStore, host: HostCache,
                 disk: DiskCache):
        self.runner, self.store, self.host, self.disk = runner, store, host, disk
        # files waiting for their device pages, gathered in one batch per step: ([(file, k, v,
        # its slots from the device, where they start in the batch)], gathered chunks, pages)
        self._gathered: list[tuple[list, list, int]] = []

    def start(self) -> None:
        """Write the files whose pages the last call gathered from the device, then the files
        planned since (host pages now; device pages gathered for the next call). Call after
        HostCache.finish_writes and before any device page copy of this step."""
        self.disk.poll()
        self.finish()
        self.disk.reads.forget_all()
        layout = self.disk.layout
        waiting, device_pages = [], []
        for f in self.disk.take_writes():
            k = np.empty((layout.num_layers, len(f.pages), *layout.page_shape[1:]),
                         layout.np_dtype)
            v = np.empty_like(k)
            host = [(s, p) for s, (kind, p) in enumerate(f.sources) if kind == "host"]
            if host:
                ids = [p for _, p in host]
                k[:, [s for s, _ in host]], v[:, [s for s, _ in host]] = (self.host.k[:, ids],
                                                                          self.host.v[:, ids])
            device = [(s, p) for s, (kind, p) in enumerate(f.sources) if kind == "device"]
            if not device:
                self.disk.write(f, k, v)
                continue
            waiting.append((f, k, v, [s for s, _ in device], len(device_pages)))
            device_pages += [p for _, p in device]
        if device_pages:                    # one gather and copy for all of them
            chunks = self.runner.gather_pages(device_pages)
            for a in jax.tree.leaves(chunks):
                if hasattr(a, "copy_to_host_async"):
                    a.copy_to_host_async()
            self._gathered.append((waiting, chunks, len(device_pages)))

    def finish(self) -> None:
        """Write the files waiting for device pages (blocks until their copies are done)."""
        for waiting, chunks, n in self._gathered:
            dk, dv = pages_to_host(chunks, n)
            for f, k, v, slots, at in waiting:
                k[:, slots], v[:, slots] = dk[:, at:at + len(slots)], dv[:, at:at + len(slots)]
                self.disk.write(f, k, v)
        self._gathered.clear()

    def drop(self) -> None:
        """Forget gathered pages (the pools are gone after a failed step, or the engine is
        closing): those files are bad, and their pages will be recomputed. Writes under way
        finish first, so the directory is left consistent."""
        for waiting, _, _ in self._gathered:
            for f, *_ in waiting:
                self.disk.fail(f)
        self._gathered.clear()
        self.disk.poll(wait=True)

    def flush_to_disk(self, conversation_ids: list[str] | None = None,
                      deadline: float | None = None) -> int:
        """Write a copy of every page idle conversations hold on device or host to page files
        no conversation holds, for a later process to claim (ConversationStore.reopen); pages
        already on disk stay in their files. conversation_ids: these, in this order (None:
        all, the most recently used first); when the disk tier is full, the flush stops (its
        own files are not dropped for later ones). deadline (time.monotonic()): no file is
        started after it, and files are written a few at a time (WORKERS), so the flush ends
        within about one file's write of it; what is left is recomputed after a restart. Call
        through Swapper.flush_to_disk (which lands pending copies first). Blocks until every
        file started is written (those of earlier evictions too). Returns the pages written."""
        self.finish()
        files, since = [], time.time()      # this flush's files never make room for later ones
        for conv, pages in self._flush_chunks(conversation_ids):
            if deadline is not None and time.monotonic() >= deadline:
                break
            ps = self.store.page_size
            tokens = [conv.token_ids[i * ps:min((i + 1) * ps, conv.num_computed)]
                      for i in pages]
            files.append(disk_restart.write_unclaimed(self.disk, conv.id, conv.salt, pages,
                                                      tokens, *self._read(conv, pages), since))
            if files[-1] is None:
                break                           # the disk tier is full: the rest is recomputed
            if deadline is not None and len(self.disk.writes) >= WORKERS:
                self.disk.poll(wait=True)       # a few at a time: the deadline is kept
        self.disk.poll(wait=True)               # durable from here
        return sum(len(f.pages) for f in files if f is not None and f.state == "written")

    def _flush_chunks(self, conversation_ids: list[str] | None):
        """(conversation, page indices of one chunk) to flush, in flush order."""
        convs = self.store.conversations
        order = sorted(convs.values(), key=lambda c: -c.last_used) if conversation_ids is None \
            else [convs.get(cid) for cid in conversation_ids]
        ps, chunk = self.store.page_size, self.store.evictor.chunk_pages
        for conv in order:
            if conv is None or conv.busy:
                continue
            n = min(-(-conv.num_computed // ps), len(conv.pages))
            held = [i for i in range(n) if conv.pages[i] >= 0 or i in conv.host_pages]
            for at in range(0, len(held), chunk):
                yield conv, held[at:at + chunk]

    def _read(self, conv, pages: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """k, v [layers, len(pages), ...] of conv's pages, from device or host."""
        on_device = [i for i in pages if conv.pages[i] >= 0]
        k = v = None
        if on_device:
            dk, dv = self.runner.gather_pages_host([conv.pages[i] for i in on_device])
            k = np.empty((dk.shape[0], len(pages), *dk.shape[2:]), dk.dtype)
            v = np.empty_like(k)
            slots = [pages.index(i) for i in on_device]
            k[:, slots], v[:, slots] = dk, dv
        on_host = [i for i in pages if conv.pages[i] < 0]
        if on_host:
            hk, hv = self.host.k[:, [conv.host_pages[i] for i in on_host]], \
                self.host.v[:, [conv.host_pages[i] for i in on_host]]
            if k is None:
                k = np.empty((hk.shape[0], len(pages), *hk.shape[2:]), hk.dtype)
                v = np.empty_like(k)
            slots = [pages.index(i) for i in on_host]
            k[:, slots], v[:, slots] = hk, hv
        return k, v
