"""What `Engine.stats()` reports: counters, pages by tier, hits by tier, sharing and swaps, the
program set, and where the loop's time goes. Every part reports its own entries (a Reporter,
model/reporting.py, lists who reports what); the engine adds its own configuration and the few
entries derived from the others (`derived`)."""

from __future__ import annotations

from typing import Any

from pensieve_jax.engine.config import EngineConfig
from pensieve_jax.engine.loop import StepLoop
from pensieve_jax.engine.parts import Parts
from pensieve_jax.model.reporting import Reporter, merge_reports


def reporters(parts: Parts, loop: StepLoop) -> tuple[Reporter, ...]:
    """Every part of an engine that reports entries of its stats."""
    return (loop.turns, parts.runner, parts.scheduler, parts.store, parts.allocator, parts.host,
            parts.swapper, parts.attention, loop, parts.warm_up, parts.warm_up.watch)


def derived(stats: dict[str, Any]) -> dict[str, Any]:
    """The entries computed from the parts' ones: hit_tokens (cached_tokens) by tier (disk:
    tokens loaded from page files, counted among cached_tokens, not as host tokens; device: the
    rest), miss_tokens, the sharing hit ratio, compilations (step programs compiled), warm
    (the runner is ready) and the padding ratio of the step programs."""
    hits, host = stats["cached_tokens"], stats["cached_host_tokens"]
    disk, programs = stats["disk"].get("served_tokens", 0), stats["programs"]
    return {"hit_tokens": hits,
            "hit_tokens_by_tier": {"device": max(0, hits - host - disk), "host": host,
                                   "disk": disk},
            "miss_tokens": stats["prefilled_tokens"] + stats["recomputed_tokens"],
            "sharing": {"shared_hit_tokens": stats["cached_shared_tokens"],
                        "hit_ratio": hits / max(1, stats["prompt_tokens"])},
            "compilations": programs["compiled"],
            "programs": {"warm": programs["ready"], "padding_ratio": round(
                programs["padded_tokens"] / max(1, programs["real_tokens"]), 4)}}


def engine_stats(parts: Parts, config: EngineConfig, loop: StepLoop) -> dict[str, Any]:
    """Called on the engine thread. Raises ValueError if two parts report the same entry."""
    own = {"cache_policy": config.cache_policy, "page_size": config.page_size,
           "max_model_len": parts.max_model_len}
    stats = merge_reports([*(r.report_stats() for r in reporters(parts, loop)), own])
    return merge_reports([stats, derived(stats)])
