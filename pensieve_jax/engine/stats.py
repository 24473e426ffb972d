"""What `Engine.stats()` reports: counters, pages by tier, hits by tier, sharing and swaps, the
program set, and where the loop's time goes. Every part reports its own entries (a Reporter,
model/reporting.py, lists who reports what); the engine adds its own (configuration, warm-up,
compiles watched after ready) and the few entries derived from the others (`derived`)."""

from __future__ import annotations

from typing import Any, NamedTuple

from pensieve_jax.engine.config import EngineConfig
from pensieve_jax.engine.loop import StepLoop
from pensieve_jax.engine.parts import Parts
from pensieve_jax.engine.scheduler import Scheduler
from pensieve_jax.model.reporting import Reporter, merge_reports
from pensieve_jax.runner.compile_watch import CompileWatch


class SchedulerReport(NamedTuple):
    """The scheduler's entries: running, waiting (turns), preemptions (so far). Here until
    Scheduler has room for its own report_stats (its class is at the size limit)."""
    scheduler: Scheduler

    def report_stats(self) -> dict[str, int]:
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting),
                "preemptions": s.num_preemptions}


class LoopReport(NamedTuple):
    """The step loop's entries: loop, where its time goes (StepLoop.times) and whether it
    overlaps. Here until loop.py has room for StepLoop.report_stats (at the module limit)."""
    loop: StepLoop

    def report_stats(self) -> dict[str, dict[str, Any]]:
        return {"loop": dict(self.loop.times, overlap=self.loop.config.overlap)}


def reporters(parts: Parts, loop: StepLoop) -> tuple[Reporter, ...]:
    """Every part of an engine that reports entries of its stats."""
    return (loop.turns, parts.runner, SchedulerReport(parts.scheduler), parts.store,
            parts.allocator, parts.host, parts.swapper, parts.attention, LoopReport(loop))


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


def engine_stats(parts: Parts, config: EngineConfig, loop: StepLoop, watch: CompileWatch,
                 warm_up_s: float | None) -> dict[str, Any]:
    """Called on the engine thread (the turns' counters come from loop.turns' report). Raises
    ValueError if two parts report the same entry."""
    own = {"programs": {"warm_up_s": warm_up_s,
                        # every compile on the engine thread after ready (step programs too)
                        "compilations_after_ready": watch.count,
                        "compiled_after_ready": watch.names},
           "cache_policy": config.cache_policy, "page_size": config.page_size,
           "max_model_len": parts.max_model_len}
    stats = merge_reports([*(r.report_stats() for r in reporters(parts, loop)), own])
    return merge_reports([stats, derived(stats)])
