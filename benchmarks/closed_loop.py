"""Closed-loop users for the engine benchmarks (bench_engine, bench_tiers, bench_disk_tier): one
thread per user, each sending its turns and waiting for every answer, and the token counts
their turns' usage adds up to.

    def user(i): ...                         # sends conversation i's turns, records usage
    wall_s = run_users(user, len(conversations))
    totals = usage_totals(usages)            # {"prompt_tokens": ..., "cached_tokens": ...}
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

# the Usage fields a replay sums over its turns
USAGE_TOTALS = ("prompt_tokens", "cached_tokens", "cached_host_tokens", "prefilled_tokens",
                "recomputed_tokens", "completion_tokens")


def run_users(user: Callable[[int], None], count: int) -> float:
    """user(0) ... user(count - 1), each on a thread of its own, all at once; returns the wall
    seconds until the last one ends."""
    start = time.perf_counter()
    threads = [threading.Thread(target=user, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def usage_totals(usages: Iterable, fields: Iterable[str] = USAGE_TOTALS) -> dict[str, int]:
    """The fields (USAGE_TOTALS unless given) summed over the turns' usage records."""
    usages = list(usages)
    return {k: sum(getattr(u, k) for u in usages) for k in fields}
