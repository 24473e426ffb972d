"""Measured speeds behind the load-or-recompute choice for pages in host memory.

Loading a page costs page_bytes / host->device bandwidth (calibrated once with a staged copy);
recomputing its tokens costs tokens x prefill seconds per token (moving average over the
engine's prefill steps). Until both are known, pages are loaded.
"""

from __future__ import annotations

import time

import jax
import numpy as np

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

    def calibrate(self, runner, page_shape: tuple[int, ...], dtype, pages: int = 8) -> None:
        """Time a staged host -> device copy of `pages` pages (the second of two runs)."""
        k = np.zeros((page_shape[0], pages, *page_shape[1:]), dtype)
        for _ in range(2):
            start = time.perf_counter()
            jax.block_until_ready(runner.stage_pages(k, k))
            seconds = time.perf_counter() - start
        self.h2d_bytes_per_s = pages * self.page_bytes / max(seconds, 1e-9)

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
                "prefill_s_per_token": self.prefill_s_per_token}
