"""The device pool and host tier of a cache benchmark (bench_tiers, bench_disk_tier), sized as
fractions of the workload's working set so that caching decisions matter: the pool holds only
some of the conversations, the host tier some more.

    pools = tier_pools(model, "float32", 16, working_pages, 0.25, 1.0, min_device_pages=64)
    EngineConfig(page_size=16, num_pages=pools.device_pages,
                 host_cache_bytes=pools.host_bytes, ...)
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TierPools:
    device_pages: int         # the engine's num_pages
    host_pages: int           # pages the host tier holds
    page_bytes: int           # K and V of one page, all layers

    @property
    def host_bytes(self) -> int:
        """The engine's host_cache_bytes."""
        return self.host_pages * self.page_bytes


def tier_pools(model, dtype: str, page_size: int, working_pages: int, device_fraction: float,
               host_fraction: float, *, min_device_pages: int, min_host_pages: int = 0
               ) -> TierPools:
    """device_fraction and host_fraction of working_pages (the pages the whole workload would
    need), at least min_device_pages and min_host_pages; page_bytes as the engine counts them."""
    from pensieve_jax.engine.config import page_bytes
    from pensieve_jax.engine.engine import EngineConfig
    for name, value in (("device_fraction", device_fraction), ("host_fraction", host_fraction)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    return TierPools(max(int(device_fraction * working_pages), min_device_pages),
                     max(int(host_fraction * working_pages), min_host_pages),
                     page_bytes(model, EngineConfig(page_size=page_size), dtype))
