"""The host-memory tier: a page pool in host RAM and the copies to and from the device pools.

Pages move in batches: one device gather + one asynchronous device-to-host copy per swap-out
batch, one host gather + one host-to-device put + one device scatter per swap-in batch.
Swap-outs complete lazily (`finish_writes`, at the next step) so the copy overlaps compute.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from pensieve_jax.kvcache.pages import PageAllocator
from pensieve_jax.runner.model_runner import pages_to_host


class HostCache:
    def __init__(self, num_pages: int, page_shape: tuple[int, ...], dtype):
        """page_shape: (layers, page_size, kv_heads, head_dim); pools are [layers, pages, ...]."""
        self.allocator = PageAllocator(max(num_pages, 1), "host")
        self.enabled = num_pages > 0
        layers, *rest = page_shape
        shape = (layers, max(num_pages, 1), *rest)
        self.k = np.zeros(shape, np.dtype(dtype))
        self.v = np.zeros(shape, np.dtype(dtype))
        self._pending: list[tuple[list, np.ndarray]] = []   # (page chunks, host ids)
        self.page_bytes = 2 * self.k[:, 0].nbytes
        # *_hidden_pages: copies already complete when needed (fully overlapped with compute);
        # *_wait_s: time the engine waited for the rest; in_s: host-side time to start copies;
        # in_layered_pages: swap-ins loaded inside a step (how much of those copies the step's
        # compute hid is not visible from the host: benchmarks/bench_swap_overlap.py measures it)
        self.stats = {"out_pages": 0, "in_pages": 0, "out_bytes": 0, "in_bytes": 0,
                      "out_wait_s": 0.0, "out_hidden_pages": 0, "in_s": 0.0, "in_wait_s": 0.0,
                      "in_hidden_pages": 0, "in_layered_pages": 0}

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages if self.enabled else 0

    def write_async(self, chunks: list[tuple[jax.Array, jax.Array]], host_ids: list[int]) -> None:
        """Start copying gathered device pages (runner.gather_pages: chunks (k, v) [layers,
        chunk, ...] in order) into host pages host_ids."""
        for a in jax.tree.leaves(chunks):
            a.copy_to_host_async()
        self._pending.append((chunks, np.asarray(host_ids)))
        self.stats["out_pages"] += len(host_ids)
        self.stats["out_bytes"] += len(host_ids) * self.page_bytes

    def finish_writes(self) -> None:
        start = time.perf_counter()
        for chunks, ids in self._pending:
            if all(a.is_ready() for a in jax.tree.leaves(chunks)):
                self.stats["out_hidden_pages"] += len(ids)
            self.k[:, ids], self.v[:, ids] = pages_to_host(chunks, len(ids))
        self._pending.clear()
        self.stats["out_wait_s"] += time.perf_counter() - start

    def read(self, host_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Copies of host pages [layers, n, ...] (pending writes are finished first)."""
        if self._pending:
            self.finish_writes()
        ids = np.asarray(host_ids)
        self.stats["in_pages"] += len(host_ids)
        self.stats["in_bytes"] += len(host_ids) * self.page_bytes
        return self.k[:, ids], self.v[:, ids]

    def report_stats(self) -> dict[str, dict[str, dict[str, int]]]:
        """pages: {"host": used, free, total} (all 0 without a host tier); a Reporter
        (model/reporting.py). The copies' counters (`stats`) are the swapper's to report."""
        if not self.enabled:
            return {"pages": {"host": {"used": 0, "free": 0, "total": 0}}}
        return self.allocator.report_stats()
