"""What `Engine.stats()` reports: counters, pages by tier, hits by tier, sharing and swaps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine

USAGE_COUNTERS = ("prompt_tokens", "cached_tokens", "cached_host_tokens", "cached_shared_tokens",
                  "prefilled_tokens", "recomputed_tokens", "completion_tokens")   # sums of Usage
COUNTERS = ("steps", "requests", "finished", *USAGE_COUNTERS, "step_tokens", "failed_steps")


def _pages(allocator) -> dict[str, int]:
    if allocator is None:
        return {"used": 0, "free": 0, "total": 0}
    return {"used": allocator.num_pages - allocator.num_free, "free": allocator.num_free,
            "total": allocator.num_pages}


def _programs(engine: "Engine") -> dict[str, Any]:
    """The step program set, compile time and padding; compiles of anything after ready."""
    out = engine.runner.stats()
    watch = engine._compiles
    # every compile on the engine thread after ready (step programs included)
    out.update(warm=engine.ready, warm_up_s=engine.warm_up_s,
               step_programs_after_ready=out.pop("compilations_after_ready"),
               compilations_after_ready=watch.count, compiled_after_ready=watch.names,
               padding_ratio=round(out["padded_tokens"] / max(1, out["real_tokens"]), 4))
    return out


def engine_stats(engine: "Engine") -> dict[str, Any]:
    """Called on the engine thread."""
    counts, store, scheduler = engine.counts, engine.store, engine.scheduler
    return dict(
        counts, compilations=engine.runner.num_compilations, programs=_programs(engine),
        running=len(scheduler.running), waiting=len(scheduler.waiting),
        conversations=len(store.conversations), preemptions=scheduler.num_preemptions,
        **store.counts, cached_tokens_resident=store.cached_tokens(),
        resident_tokens=store.resident_tokens(),
        hit_tokens=counts["cached_tokens"],
        hit_tokens_by_tier={"device": counts["cached_tokens"] - counts["cached_host_tokens"],
                            "host": counts["cached_host_tokens"]},
        miss_tokens=counts["prefilled_tokens"] + counts["recomputed_tokens"],
        pages={"device": _pages(engine.allocator), "host": _pages(store.host)},
        sharing=dict(store.sharing_stats(), enabled=store.index is not None,
                     shared_hit_tokens=counts["cached_shared_tokens"],
                     hit_ratio=counts["cached_tokens"] / max(1, counts["prompt_tokens"])),
        swap=engine.swapper.stats(), eviction_policy=store.policy.name,
        cache_policy=engine.config.cache_policy, page_size=engine.config.page_size,
        # the attention in use, and how it was chosen (its GPU self-check, a fallback to xla)
        attention=engine.attention_choice.attention,
        attention_check=engine.attention_choice.as_dict(),
        max_model_len=engine.max_model_len,
        # the engine loop: overlapped or not, and where its time went (Engine.loop)
        loop=dict(engine.loop, overlap=engine.config.overlap))
