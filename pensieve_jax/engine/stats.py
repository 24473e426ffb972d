"""What `Engine.stats()` reports: counters, pages by tier, hits by tier, sharing and swaps, the
program set, and where the loop's time goes. Built from the parts that report them."""

from __future__ import annotations

from typing import Any

from pensieve_jax.engine.config import EngineConfig
from pensieve_jax.engine.loop import StepLoop
from pensieve_jax.engine.parts import Parts
from pensieve_jax.runner.compile_watch import CompileWatch


def _pages(allocator) -> dict[str, int]:
    if allocator is None:
        return {"used": 0, "free": 0, "total": 0}
    return {"used": allocator.num_pages - allocator.num_free, "free": allocator.num_free,
            "total": allocator.num_pages}


def _programs(parts: Parts, watch: CompileWatch, warm_up_s: float | None) -> dict[str, Any]:
    """The step program set, compile time and padding; compiles of anything after ready."""
    out = parts.runner.stats()
    # every compile on the engine thread after ready (step programs included)
    out.update(warm=parts.runner.ready, warm_up_s=warm_up_s,
               step_programs_after_ready=out.pop("compilations_after_ready"),
               compilations_after_ready=watch.count, compiled_after_ready=watch.names,
               padding_ratio=round(out["padded_tokens"] / max(1, out["real_tokens"]), 4))
    return out


def engine_stats(parts: Parts, config: EngineConfig, counts: dict[str, int], loop: StepLoop,
                 watch: CompileWatch, warm_up_s: float | None) -> dict[str, Any]:
    """Called on the engine thread."""
    store, scheduler = parts.store, parts.scheduler
    programs = _programs(parts, watch, warm_up_s)
    disk = parts.swapper.disk_stats()
    # tokens loaded back from page files (counted among cached_tokens, not as host tokens)
    from_disk = disk.get("served_tokens", 0)
    return dict(
        counts, compilations=programs["compiled"], programs=programs,
        running=len(scheduler.running), waiting=len(scheduler.waiting),
        conversations=len(store.conversations), preemptions=scheduler.num_preemptions,
        **store.counts, cached_tokens_resident=store.cached_tokens(),
        resident_tokens=store.resident_tokens(),
        hit_tokens=counts["cached_tokens"],
        hit_tokens_by_tier={"device": max(0, counts["cached_tokens"] -
                                          counts["cached_host_tokens"] - from_disk),
                            "host": counts["cached_host_tokens"], "disk": from_disk},
        miss_tokens=counts["prefilled_tokens"] + counts["recomputed_tokens"],
        pages={"device": _pages(parts.allocator), "host": _pages(store.host)},
        # the disk tier: served_tokens, used_bytes, load_s, files by state, bad/refused files
        disk=disk,
        sharing=dict(store.sharing_stats(), enabled=store.index is not None,
                     shared_hit_tokens=counts["cached_shared_tokens"],
                     hit_ratio=counts["cached_tokens"] / max(1, counts["prompt_tokens"])),
        swap=parts.swapper.stats(), eviction_policy=store.policy.name,
        cache_policy=config.cache_policy, page_size=config.page_size,
        # the attention in use, and how it was chosen (its GPU self-check, a fallback to xla)
        attention=parts.attention.attention, attention_check=parts.attention.as_dict(),
        max_model_len=parts.max_model_len,
        # the engine loop: overlapped or not, and where its time went (StepLoop.times)
        loop=dict(loop.times, overlap=config.overlap))
