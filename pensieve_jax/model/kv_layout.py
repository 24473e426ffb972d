"""The paged KV cache's layout: pools, a step's batch, where each new token's K/V goes.

A step packs the new tokens of every sequence back to back (ragged rows):

    tokens      t = 0 .......................... num_tokens (bucket padding after cu_q_lens[-1])
    sequence s  rows cu_q_lens[s] : cu_q_lens[s+1]   (q_len[s] may be 0)
    row j of s  position kv_lens[s] - q_len[s] + j, attends causally to positions <= its own
                (and, with a sliding window W, to positions > its own - W)

The pools are stacked over layers, [num_layers, num_pages, page_size, num_kv_heads, head_dim],
and every attention backend takes the whole stack plus a layer index, so a kernel can read one
layer's pages in place without slicing a copy out of the stack.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
    k: jax.Array  # [num_layers, num_pages, page_size, num_kv_heads, head_dim]
    v: jax.Array  # [num_layers, num_pages, page_size, num_kv_heads, head_dim]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]


class Incoming(NamedTuple):
    """Pages arriving from host memory during a step, loaded into the pools layer by layer."""

    k: jax.Array         # [num_layers, n, page_size, num_kv_heads, head_dim] (host memory)
    v: jax.Array         # [num_layers, n, page_size, num_kv_heads, head_dim] (host memory)
    page_ids: jax.Array  # int32 [n], the device pages they go to (>= num_pages: padding)


class AttentionBatch(NamedTuple):
    page_table: jax.Array  # int32 [num_seqs, max_pages_per_seq]
    kv_lens: jax.Array     # int32 [num_seqs], context length including this step's new tokens
    cu_q_lens: jax.Array   # int32 [num_seqs + 1], row offsets of each sequence's new tokens


def init_kv_cache(num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                  head_dim: int, dtype=jnp.float32) -> KVCache:
    shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def token_slots(positions: jax.Array, batch: AttentionBatch, num_pages: int,
                page_size: int) -> tuple[jax.Array, jax.Array]:
    """Page and in-page offset each token's K/V goes to: ([T], [T]) int32.

    Padding rows (t >= cu_q_lens[-1]) get page `num_pages`, out of range, so writes drop them.
    """
    num_tokens = positions.shape[0]
    num_seqs = batch.page_table.shape[0]
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(batch.cu_q_lens[1:], rows, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, num_seqs - 1)
    page_idx = jnp.clip(positions // page_size, 0, batch.page_table.shape[1] - 1)
    page = batch.page_table[seq, page_idx]
    page = jnp.where(rows < batch.cu_q_lens[-1], page, num_pages)
    return page.astype(jnp.int32), (positions % page_size).astype(jnp.int32)


def write_kv(kv: KVCache, layer: jax.Array, k: jax.Array, v: jax.Array,
             slots: tuple[jax.Array, jax.Array]) -> KVCache:
    """Scatter new rows k, v [T, num_kv_heads, head_dim] into `layer` of the pools (in place)."""
    page, offset = slots
    layer_idx = jnp.full_like(page, layer)
    return KVCache(
        kv.k.at[layer_idx, page, offset].set(k.astype(kv.k.dtype), mode="drop"),
        kv.v.at[layer_idx, page, offset].set(v.astype(kv.v.dtype), mode="drop"),
    )


def load_pages(kv: KVCache, layer: jax.Array, k: jax.Array, v: jax.Array,
               page_ids: jax.Array) -> KVCache:
    """Write whole pages k, v [n, page_size, num_kv_heads, head_dim] into `layer` of the pools at
    page_ids [n] (in place; ids >= num_pages are padding and dropped)."""
    layer_idx = jnp.full_like(page_ids, layer)
    return KVCache(
        kv.k.at[layer_idx, page_ids].set(k.astype(kv.k.dtype), mode="drop"),
        kv.v.at[layer_idx, page_ids].set(v.astype(kv.v.dtype), mode="drop"),
    )
