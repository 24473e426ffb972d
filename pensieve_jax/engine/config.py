"""The engine's options and how big its device page pool is."""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp

from pensieve_jax.model.attention import ATTENTION_BACKENDS
from pensieve_jax.kvcache.transfer_costs import RESTORE_POLICIES
from pensieve_jax.weights import LoadedModel

CACHE_POLICIES = ("stateful", "stateless")
SWAP_IN_MODES = ("next_step", "layered")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int | None = None         # None: from kv_cache_bytes / kv_cache_fraction
    kv_cache_bytes: int | None = None    # per device; None: kv_cache_fraction of free memory
    kv_cache_fraction: float = 0.6       # (on CPU: 512 MiB, capped at what the seqs can use)
    max_model_len: int | None = None     # None: min(model context, 4096)
    max_batched_tokens: int = 512
    max_num_seqs: int = 64
    attention: str | None = None         # "xla", "pallas", or None: "pallas" where the engine's
                                         # device is a GPU (self-checked against "xla" at start,
                                         # falling back to it), else "xla"
                                         # (self_check.resolve_attention decides)
    cache_policy: str = "stateful"       # "stateless": drop each turn's KV, share nothing
                                         # (the baseline)
    max_queued_requests: int | None = None     # submit raises EngineOverloaded beyond this
    host_cache_bytes: int = 0            # host-memory tier for idle conversations (0: none)
    eviction_policy: str = "pensieve"    # or "lru": which idle chunk leaves a tier first
    chunk_tokens: int = 32               # eviction granularity (rounded to whole pages)
    swap_out_threshold: float = 0.25     # copy idle chunks to host when fewer pages are free
    reserve_fraction: float = 0.10       # pages new turns leave free for running ones
    conversation_ttl_s: float | None = None    # idle conversations are forgotten after this
    restore_policy: str = "auto"         # host pages: "load", "recompute", or "auto" (the
                                         # cheaper by measured bandwidth and prefill speed)
    prefix_sharing: bool = True          # conversations share cached pages of common prefixes
    fairness_steps: int = 16             # a waiting turn is passed over for better-cached ones
                                         # for at most this many steps
    tensor_parallel: int = 1             # devices the weights and KV heads are split over
    swap_in: str = "next_step"           # host -> device page loads: "next_step" (copied while
                                         # one step runs; the turn runs from the next step) or
                                         # "layered" (loaded inside the turn's own step, layer by
                                         # layer, each copy overlapping the layer before)
    precompile: bool | None = None       # compile every step program when the engine is built
                                         # (None: yes, unless env PENSIEVE_JAX_PRECOMPILE=0);
                                         # off, programs compile on first use
    token_buckets: tuple[int, ...] | None = None   # the token ladder of the step programs
                                         # (None: runner.token_buckets(max_batched_tokens),
                                         # with a 1-token program first on CPU)
    overlap: bool = True                 # plan and dispatch step N+1 while the device runs
                                         # step N, then postprocess N (engine.py); False:
                                         # schedule, run, postprocess one after another

    @property
    def precompile_enabled(self) -> bool:
        if self.precompile is not None:
            return self.precompile
        return os.environ.get("PENSIEVE_JAX_PRECOMPILE", "1").lower() not in ("0", "false", "no")

    def __post_init__(self):
        if self.token_buckets is not None:
            ladder = tuple(int(t) for t in self.token_buckets)
            if not ladder or list(ladder) != sorted(set(ladder)) or ladder[0] < 1:
                raise ValueError(f"token_buckets must be increasing positive integers, "
                                 f"got {self.token_buckets!r}")
            if ladder[-1] < self.max_batched_tokens:
                raise ValueError(f"the largest token bucket ({ladder[-1]}) must be at least "
                                 f"max_batched_tokens ({self.max_batched_tokens})")
            object.__setattr__(self, "token_buckets", ladder)
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        for name in ("max_batched_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attention is not None and self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {sorted(ATTENTION_BACKENDS)} or None "
                             f"(by platform), got {self.attention!r}")
        if self.cache_policy not in CACHE_POLICIES:
            raise ValueError(f"cache_policy must be one of {CACHE_POLICIES}, "
                             f"got {self.cache_policy!r}")
        if not isinstance(self.tensor_parallel, int) or self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be an integer >= 1, "
                             f"got {self.tensor_parallel!r}")
        if self.restore_policy not in RESTORE_POLICIES:
            raise ValueError(f"restore_policy must be one of {RESTORE_POLICIES}, "
                             f"got {self.restore_policy!r}")
        if self.swap_in not in SWAP_IN_MODES:
            raise ValueError(f"swap_in must be one of {SWAP_IN_MODES}, got {self.swap_in!r}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")


def page_shape(model: LoadedModel, config: EngineConfig) -> tuple[int, int, int, int]:
    """K (or V) of one page: (layers, page_size, kv_heads, head_dim)."""
    c = model.config
    return (c.num_layers, config.page_size, c.num_kv_heads, c.head_dim)


def page_bytes(model: LoadedModel, config: EngineConfig, dtype) -> int:
    """K and V of one page, all layers and KV heads."""
    return 2 * math.prod(page_shape(model, config)) * jnp.dtype(dtype).itemsize


def pool_pages(model: LoadedModel, config: EngineConfig, dtype, max_model_len: int) -> int:
    """Device pages: num_pages if given, else what the per-device memory budget holds."""
    if config.num_pages is not None:
        return config.num_pages
    # per device: each holds its KV heads only
    per_device = page_bytes(model, config, dtype) // config.tensor_parallel
    budget = config.kv_cache_bytes
    stats = jax.devices()[0].memory_stats() if budget is None else None
    if budget is None and stats and "bytes_limit" in stats:
        budget = int((stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * config.kv_cache_fraction)
    if budget is None:
        usable = config.max_num_seqs * math.ceil(max_model_len / config.page_size)
        return max(1, min(usable, (512 << 20) // per_device))
    return max(1, budget // per_device)
