"""Measured speeds behind the load-or-recompute choice for pages in host memory and on disk.

Loading a page from host costs page_bytes / host->device bandwidth (calibrated once with a
staged copy); from disk, also its page file's bytes / disk read bandwidth (calibrated once with
a cold read of a page file, then a moving average over the disk tier's reads); recomputing its
tokens costs tokens x prefill seconds per token (moving average over the engine's prefill
steps). Until the speeds are known, pages are loaded.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from pensieve_jax.kvcache import page_file
from pensieve_jax.kvcache.page_file import PageLayout

RESTORE_POLICIES = ("auto", "load", "recompute")


class TransferCosts:
    def __init__(self, page_bytes: int, policy: str = "auto", smoothing: float = 0.1):
        if policy not in RESTORE_POLICIES:
            raise ValueError(f"restore_policy must be one of {RESTORE_POLICIES}, got {policy!r}")
        self.page_bytes = page_bytes
        self.policy = policy
        self.smoothing = smoothing
        self.h2d_bytes_per_s: float | None = None
        self.prefill_s_per_token: float | None = None
        self.disk_read_bytes_per_s: float | None = None
        self.disk_file_page_bytes = page_bytes    # a page file's bytes per page (header shared)

    def calibrate(self, runner, page_shape: tuple[int, ...], dtype, pages: int = 8) -> None:
        """Time a staged host -> device copy of `pages` pages (the second of two runs)."""
        k = np.zeros((page_shape[0], pages, *page_shape[1:]), dtype)
        for _ in range(2):
            start = time.perf_counter()
            jax.block_until_ready(runner.stage_pages(k, k))
            seconds = time.perf_counter() - start
        self.h2d_bytes_per_s = pages * self.page_bytes / max(seconds, 1e-9)

    def calibrate_disk(self, directory: str, layout: PageLayout, pages: int = 8) -> None:
        """Time reading (and verifying) a page file of `pages` pages written to directory, its
        pages dropped from the OS cache first where the platform allows it."""
        path = os.path.join(directory, f"calibrate-{os.getpid()}{page_file.SUFFIX}.tmp")
        shape = (layout.num_layers, pages, *layout.page_shape[1:])
        k = np.zeros(shape, layout.np_dtype)
        header = page_file.encode_header(layout, "calibrate", "", list(range(pages)),
                                         [[]] * pages)
        try:
            nbytes = page_file.write_atomic(path, header, k, k)
            if hasattr(os, "posix_fadvise"):
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            start = time.perf_counter()
            page_file.read_page_file(path, layout)
            seconds = time.perf_counter() - start
        finally:
            if os.path.exists(path):
                os.remove(path)
        self.disk_read_bytes_per_s = nbytes / max(seconds, 1e-9)
        self.disk_file_page_bytes = nbytes / pages

    def disk_read(self, nbytes: int, seconds: float) -> None:
        """A page file read by the disk tier (DiskCache.on_load)."""
        rate = nbytes / max(seconds, 1e-9)
        old = self.disk_read_bytes_per_s
        self.disk_read_bytes_per_s = rate if old is None else old + self.smoothing * (rate - old)

    def disk_recompute_cheaper(self, first_token: int, num_tokens: int) -> bool:
        """As recompute_cheaper, for a page in a page file on disk."""
        if self.policy != "auto":
            return self.policy == "recompute"
        if self.disk_read_bytes_per_s is None or self.prefill_s_per_token is None:
            return False
        load_s = self.disk_file_page_bytes / self.disk_read_bytes_per_s
        if self.h2d_bytes_per_s is not None:
            load_s += self.page_bytes / self.h2d_bytes_per_s
        return num_tokens * self.prefill_s_per_token < load_s

    def prefill(self, seconds: float, tokens: int) -> None:
        rate = seconds / tokens
        old = self.prefill_s_per_token
        self.prefill_s_per_token = rate if old is None else old + self.smoothing * (rate - old)

    def recompute_cheaper(self, first_token: int, num_tokens: int) -> bool:
        if self.policy != "auto":
            return self.policy == "recompute"
        if self.h2d_bytes_per_s is None or self.prefill_s_per_token is None:
            return False
        return num_tokens * self.prefill_s_per_token < self.page_bytes / self.h2d_bytes_per_s

    def stats(self) -> dict:
        return {"restore_policy": self.policy, "h2d_bytes_per_s": self.h2d_bytes_per_s,
                "prefill_s_per_token": self.prefill_s_per_token,
                "disk_read_bytes_per_s": self.disk_read_bytes_per_s}
