"""A step dispatched and not yet fetched (the overlapped loop, engine/loop.py), and what the
step planned after it reads from it: the tokens it samples, on the device."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pensieve_jax.engine.batching import Row
from pensieve_jax.runner.step_program import StepHandle


class InFlight(NamedTuple):
    """A step dispatched and not yet fetched (the overlapped loop)."""
    rows: list[Row]
    handle: StepHandle
    dispatched: float        # perf_counter() when dispatched
    num_tokens: int


def token_sources(rows: list[Row]) -> np.ndarray:
    """token_src of a step planned while the one before is in flight: for each token row,
    -1 (its id is known), or the row of the step in flight that samples it."""
    src = np.full(sum(r.end - r.start for r in rows), -1, np.int32)
    at = 0
    for row in rows:
        req = row.request
        if req.pending and not row.front:
            assert req.pending == 1, "more than one step in flight"
            first = len(req.token_ids) - 1            # the placeholder's position
            if row.start <= first < row.end:
                src[at + first - row.start] = req.pending_row
        at += row.end - row.start
    return src
