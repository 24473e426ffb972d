"""An engine's parts, built from a model and an EngineConfig: the page ledger's pools, the
host and disk tiers, the conversation store, the scheduler, the runner (the device seam), the
measured transfer costs, the swapper and the warm-up. Engine composes them; nothing here runs a
step."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from pensieve_jax.engine.config import EngineConfig, page_bytes, page_shape, pool_pages
from pensieve_jax.engine.scheduler import Scheduler, SchedulerConfig
from pensieve_jax.engine.warm_up import WarmUp
from pensieve_jax.kvcache.conversations import ConversationStore
from pensieve_jax.kvcache.disk_cache import DiskCache
from pensieve_jax.kvcache.eviction import make_policy
from pensieve_jax.kvcache.host_cache import HostCache
from pensieve_jax.kvcache.page_file import PageLayout
from pensieve_jax.kvcache.pages import PageAllocator
from pensieve_jax.kvcache.swap import Swapper
from pensieve_jax.kvcache.transfer_costs import TransferCosts
from pensieve_jax.model.self_check import AttentionChoice, select_attention
from pensieve_jax.runner import compile_cache
from pensieve_jax.runner.model_runner import ModelRunner
from pensieve_jax.runner.programs import single_decode_program, token_buckets
from pensieve_jax.runner.seam import Runner
from pensieve_jax.weights import LoadedModel

MakeRunner = Callable[[int, tuple[int, ...]], Runner]   # (num_pages, token ladder) -> runner


class Parts(NamedTuple):
    max_model_len: int
    allocator: PageAllocator          # device pages
    host: HostCache                   # host pages (maybe none)
    store: ConversationStore
    scheduler: Scheduler
    attention: AttentionChoice        # the attention in use, and how it was chosen
    runner: Runner
    rates: TransferCosts              # load or recompute, by measured speeds
    swapper: Swapper
    disk: DiskCache                   # page files on disk (maybe none)
    warm_up: WarmUp                   # compiles the runner's programs; then watches compiles


def model_fingerprint(model: LoadedModel) -> str:
    """Names the model a page file was written by: its source and configuration."""
    config = dataclasses.asdict(model.config) if dataclasses.is_dataclass(model.config) else {}
    text = json.dumps({"source": model.source, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def page_layout(model: LoadedModel, config: EngineConfig, dtype) -> PageLayout:
    """What a page file of this engine holds (a file of another layout is refused)."""
    c = model.config
    return PageLayout(jnp.dtype(dtype).name, config.page_size, c.num_layers, c.num_kv_heads,
                      c.head_dim, model_fingerprint(model))


def build(model: LoadedModel, dtype, config: EngineConfig,
          make_runner: MakeRunner | None = None) -> Parts:
    """make_runner: the runner to drive instead of a ModelRunner of `model` (tests drive one
    without a device); it is given the pool's pages and the token ladder."""
    max_model_len = config.max_model_len or min(model.config.max_position_embeddings, 4096)
    num_pages = pool_pages(model, config, dtype, max_model_len)
    if num_pages * config.page_size < max_model_len:
        raise ValueError(f"KV pool of {num_pages} pages x {config.page_size} tokens cannot hold "
                         f"one sequence of max_model_len {max_model_len}")
    c = model.config
    allocator = PageAllocator(num_pages)
    shape, nbytes = page_shape(model, config), page_bytes(model, config, dtype)
    host = HostCache(config.host_cache_bytes // nbytes, shape, jnp.dtype(dtype))
    layout = page_layout(model, config, dtype)
    disk = DiskCache(config.disk_cache_dir, config.disk_cache_bytes if host.enabled else 0,
                     layout)
    store = ConversationStore(
        allocator, config.page_size, host.allocator if host.enabled else None,
        make_policy(config.eviction_policy, c), max(1, config.chunk_tokens // config.page_size),
        sharing=config.prefix_sharing and config.cache_policy == "stateful", disk=disk)
    ladder = config.token_buckets or token_buckets(   # (with a 1-token program on CPU)
        config.max_batched_tokens, single=single_decode_program(jax.devices()[0].platform))
    scheduler = Scheduler(SchedulerConfig(
        config.max_batched_tokens, config.max_num_seqs,
        int(config.reserve_fraction * num_pages), config.fairness_steps,
        swap_in_same_step=config.swap_in == "layered", token_buckets=ladder), store)
    if make_runner is not None:
        attention = AttentionChoice(config.attention, "none", "none")
        runner = make_runner(num_pages, ladder)
    else:
        compile_cache.enable()
        # config.attention None: "pallas" on a GPU (self-checked against "xla" first, falling
        # back to it), else "xla"; stats() reports the choice (model/self_check.py)
        attention = select_attention(config.attention, c, config.page_size, dtype,
                                     config.tensor_parallel)
        runner = ModelRunner(
            model, num_pages, config.page_size, attention.attention, dtype,
            tensor_parallel=config.tensor_parallel, max_num_seqs=config.max_num_seqs,
            max_batched_tokens=config.max_batched_tokens, max_model_len=max_model_len,
            token_ladder=ladder, layered_loads=config.swap_in == "layered" and host.enabled)
    rates = TransferCosts(nbytes, config.restore_policy)
    if host.enabled:
        if config.restore_policy == "auto":
            rates.calibrate(runner, shape, host.k.dtype)
        if config.restore_policy != "load":
            store.recompute_cheaper = rates.recompute_cheaper
    if disk.enabled:
        if config.restore_policy == "auto":
            rates.calibrate_disk(disk.directory, layout)
        disk.reads.on_load = rates.disk_read
        if config.restore_policy != "load":
            store.restorer.disk_recompute_cheaper = rates.disk_recompute_cheaper
    swapper = Swapper(runner, store, host, rates, layered=config.swap_in == "layered", disk=disk)
    return Parts(max_model_len, allocator, host, store, scheduler, attention, runner, rates,
                 swapper, disk, WarmUp(runner))
