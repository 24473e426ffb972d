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
    """The engine's options. `pensieve serve --help` shows each field's docstring as its help
    text (one line each: tyro would keep a wrapped docstring's line breaks)."""

    page_size: int = 16
    """Tokens per KV page (a power of two)."""
    num_pages: int | None = None
    """Device KV pages; None: from kv_cache_bytes / kv_cache_fraction."""
    kv_cache_bytes: int | None = None
    """KV cache bytes per device; None: kv_cache_fraction of free memory."""
    kv_cache_fraction: float = 0.6
    """Share of free device memory for the KV cache (on CPU: 512 MiB, capped at what the seqs can use)."""
    max_model_len: int | None = None
    """Longest conversation in tokens; None: min(model context, 4096)."""
    max_batched_tokens: int = 512
    """Tokens one engine step runs at most."""
    max_num_seqs: int = 64
    """Sequences one engine step runs at most."""
    attention: str | None = None      # None: self_check.resolve_attention decides
    """"xla", "pallas", or None: "pallas" on a GPU if it passes a self-check against "xla" at start, else "xla"."""
    cache_policy: str = "stateful"
    """"stateful", or "stateless": drop each turn's KV, share nothing (the baseline)."""
    max_queued_requests: int | None = None
    """Queued turns beyond which submit raises EngineOverloaded; None: no limit."""
    host_cache_bytes: int = 0
    """Bytes of the host-memory tier for idle conversations (0: none)."""
    disk_cache_bytes: int = 0
    """Bytes of page files on disk for chunks leaving the host tier (0: none; needs host_cache_bytes > 0)."""
    disk_cache_dir: str | None = None
    """Directory of the disk tier's page files (kept across restarts); None: a temporary one, removed at exit."""
    eviction_policy: str = "pensieve"
    """"pensieve" or "lru": which idle chunk leaves a tier first."""
    chunk_tokens: int = 32
    """Eviction granularity in tokens (rounded to whole pages)."""
    swap_out_threshold: float = 0.25
    """Copy idle chunks to host when fewer than this share of the pages are free."""
    reserve_fraction: float = 0.10
    """Share of the pages new turns leave free for running ones."""
    conversation_ttl_s: float | None = None
    """Seconds after which an idle conversation is forgotten (one an open Session holds loses
    only its KV: its token ids stay until the Session closes); None: never."""
    restore_policy: str = "auto"
    """Host pages: "load", "recompute", or "auto" (the cheaper by measured bandwidth and prefill speed)."""
    prefix_sharing: bool = True
    """Conversations share cached pages of common prefixes."""
    fairness_steps: int = 16
    """Steps a waiting turn may at most be passed over for better-cached ones."""
    tensor_parallel: int = 1
    """Devices the weights and KV heads are split over."""
    swap_in: str = "next_step"
    """"next_step": load host pages while a step runs, for the next; "layered": in the turn's step, layer by layer."""
    precompile: bool | None = None
    """Compile every step program at start (None: yes, unless env PENSIEVE_JAX_PRECOMPILE=0); off: on first use."""
    token_buckets: tuple[int, ...] | None = None
    """Step programs' token ladder; None: runner.token_buckets(max_batched_tokens), on CPU with 1 first."""
    overlap: bool = True      # engine.py
    """Plan and dispatch step N+1 while the device runs step N, then postprocess N; off: one after another."""

    @classmethod
    def from_options(cls, options: dict) -> "EngineConfig":
        """EngineConfig(**options); TypeError naming the options that are no field."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - fields
        if unknown:
            raise TypeError(f"unknown engine options {sorted(unknown)} (known: {sorted(fields)})")
        return cls(**options)

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
        self._check_disk_tier()
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")


    def _check_disk_tier(self) -> None:
        b = self.disk_cache_bytes
        if isinstance(b, bool) or not isinstance(b, int) or b < 0:
            raise ValueError(f"disk_cache_bytes must be an integer >= 0, got {b!r}")
        if b > 0 and self.host_cache_bytes <= 0:
            raise ValueError("disk_cache_bytes > 0 needs a host tier (host_cache_bytes > 0): "
                             "chunks reach the disk tier when they leave host memory")
        d = self.disk_cache_dir
        if isinstance(d, os.PathLike):
            d = os.fspath(d)
            object.__setattr__(self, "disk_cache_dir", d)
        if d is not None and (not isinstance(d, str) or not d.strip()):
            raise ValueError(f"disk_cache_dir must be a non-empty path or None, "
                             f"got {str(d)[:100]!r}")
        if d is not None and b == 0:
            raise ValueError("disk_cache_dir is set but disk_cache_bytes is 0 (the disk tier "
                             "is off): give disk_cache_bytes too")


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
