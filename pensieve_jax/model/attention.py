"""Attention over a paged KV cache: the backends a model can run, by name.

    "xla"     pensieve_jax.model.xla_attention.xla_paged_attention (CPU, and anywhere)
    "pallas"  pallas_kernels.ragged_paged_attention (compiled on a GPU, interpreted elsewhere)

The batch layout, the pools and the KV writes are pensieve_jax.model.kv_layout's (re-exported
here, as the rest of the package imports them from this module).
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

from pensieve_jax.model.kv_layout import (AttentionBatch, Incoming, KVCache, init_kv_cache,
                                          load_pages, token_slots, write_kv)
from pensieve_jax.model.xla_attention import (LAST_ROWS_KEYS, MASK_VALUE, TILE_ITEMS, TILE_KEYS,
                                              TILE_ROWS, xla_paged_attention)

__all__ = ["ATTENTION_BACKENDS", "AttentionBatch", "AttentionFn", "Incoming", "KVCache",
           "LAST_ROWS_KEYS", "MASK_VALUE", "TILE_ITEMS", "TILE_KEYS", "TILE_ROWS",
           "get_attention", "init_kv_cache", "load_pages", "pallas_paged_attention",
           "token_slots", "write_kv", "xla_paged_attention"]


class AttentionFn(Protocol):
    """q [T, num_q_heads, head_dim] -> [T, num_q_heads, head_dim] over `layer` of the pools.

    sliding_window: None (every earlier position), or W: a row attends to the positions >
    its own - W only (Mistral), and a backend need not read the pages wholly outside it.
    interpret: for kernels with an interpreter (Pallas), run it instead of compiling the
    kernel; the caller decides from the platform it compiles for (backends without one ignore
    it). cpu_kernels: use the CPU custom-call kernels (cpu_kernels/) where the backend has
    them; the caller decides (a CPU, float32, the kernels loaded)."""

    def __call__(self, q: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch, *,
                 sm_scale: float, sliding_window: int | None = None, mesh: Any = None,
                 interpret: bool = False, cpu_kernels: bool = False) -> jax.Array: ...


def pallas_paged_attention(q: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch, *,
                           sm_scale: float, sliding_window: int | None = None, mesh: Any = None,
                           interpret: bool = False, cpu_kernels: bool = False) -> jax.Array:
    """The Pallas kernel: compiled (Triton, GPU only) when interpret is False, interpreted
    when True; the caller says which (model.Llama's interpret, set by the runner from the
    platform of its devices), nothing is inferred from the default backend.
    Under a mesh the kernel runs once per shard (shard_map) on that shard's heads and pages.
    cpu_kernels is ignored (a GPU kernel)."""
    del cpu_kernels
    from pallas_kernels import ragged_paged_attention_stacked
    from pensieve_jax.model.parallel import shard_heads

    def kernel(q, k_pool, v_pool, layer, page_table, kv_lens, cu_q_lens):
        return ragged_paged_attention_stacked(q, k_pool, v_pool, layer, page_table, kv_lens,
                                              cu_q_lens, sm_scale=sm_scale, interpret=interpret,
                                              sliding_window=sliding_window)
    return shard_heads(kernel, mesh, 4)(q, kv.k, kv.v, layer, *batch)


ATTENTION_BACKENDS: dict[str, AttentionFn] = {"xla": xla_paged_attention,
                                              "pallas": pallas_paged_attention}


def get_attention(name: str) -> AttentionFn:
    try:
        return ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r} "
                         f"(available: {sorted(ATTENTION_BACKENDS)})") from None
