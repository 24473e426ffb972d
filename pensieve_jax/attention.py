"""Attention over a paged KV cache: the step's batch layout, KV writes and the XLA attention path.

A step packs the new tokens of every sequence back to back (ragged rows):

    tokens      t = 0 .......................... num_tokens (bucket padding after cu_q_lens[-1])
    sequence s  rows cu_q_lens[s] : cu_q_lens[s+1]   (q_len[s] may be 0)
    row j of s  position kv_lens[s] - q_len[s] + j, attends causally to positions <= its own

The pools are stacked over layers, [num_layers, num_pages, page_size, num_kv_heads, head_dim],
and every attention backend takes the whole stack plus a layer index, so a kernel can read one
layer's pages in place without slicing a copy out of the stack.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

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


class AttentionFn(Protocol):
    def __call__(self, q: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch, *,
                 sm_scale: float, max_q_len: int, mesh: Any = None) -> jax.Array: ...


def xla_paged_attention(q: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch, *,
                        sm_scale: float, max_q_len: int, mesh: Any = None) -> jax.Array:
    """Gather each sequence's pages and run masked attention: the fast path on CPU.

    q [T, num_q_heads, head_dim] -> [T, num_q_heads, head_dim]. Every sequence's q_len must be
    <= max_q_len (a static bucket the caller guarantees); queries are laid out [S, max_q_len] so a
    decode-only batch costs S rows, not S * T. Under a mesh (heads sharded) XLA partitions it
    by head from the operands' shardings; nothing here needs to know.
    """
    del mesh
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, pages_per_seq = batch.page_table.shape
    _, _, page_size, num_kv_heads, _ = kv.k.shape
    group = num_heads // num_kv_heads
    ctx = pages_per_seq * page_size

    q_lens = batch.cu_q_lens[1:] - batch.cu_q_lens[:-1]                       # [S]
    j = jnp.arange(max_q_len, dtype=jnp.int32)
    rows = jnp.clip(batch.cu_q_lens[:-1, None] + j[None, :], 0, num_tokens - 1)  # [S, Qm]
    qs = q[rows].reshape(num_seqs, max_q_len, num_kv_heads, group, head_dim)

    k = kv.k[layer][batch.page_table].reshape(num_seqs, ctx, num_kv_heads, head_dim)
    v = kv.v[layer][batch.page_table].reshape(num_seqs, ctx, num_kv_heads, head_dim)

    scores = jnp.einsum("sqkgd,sckd->skgqc", qs, k, preferred_element_type=jnp.float32)
    scores = scores * sm_scale
    q_pos = (batch.kv_lens - q_lens)[:, None] + j[None, :]                     # [S, Qm]
    k_pos = jnp.arange(ctx, dtype=jnp.int32)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (
        k_pos[None, None, :] < batch.kv_lens[:, None, None])                  # [S, Qm, C]
    mask = mask[:, None, None]                                                # [S, 1, 1, Qm, C]
    scores = jnp.where(mask, scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask, probs, 0.0)
    out = jnp.einsum("skgqc,sckd->sqkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    out = out.reshape(num_seqs, max_q_len, num_heads, head_dim)

    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(batch.cu_q_lens[1:], t, side="right"), num_seqs - 1)
    row_in_seq = jnp.clip(t - batch.cu_q_lens[seq], 0, max_q_len - 1)
    out_t = out[seq, row_in_seq]
    valid = (t < batch.cu_q_lens[-1])[:, None, None]
    return jnp.where(valid, out_t, 0.0).astype(q.dtype)


def pallas_paged_attention(q: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch, *,
                           sm_scale: float, max_q_len: int, mesh: Any = None) -> jax.Array:
    """The Pallas kernel (compiled on GPU, interpreted elsewhere); max_q_len is not needed.
    Under a mesh the kernel runs once per shard (shard_map) on that shard's heads and pages."""
    from pallas_kernels import ragged_paged_attention_stacked
    from pensieve_jax.parallel import shard_heads
    del max_q_len

    def kernel(q, k_pool, v_pool, layer, page_table, kv_lens, cu_q_lens):
        return ragged_paged_attention_stacked(q, k_pool, v_pool, layer, page_table, kv_lens,
                                              cu_q_lens, sm_scale=sm_scale)
    return shard_heads(kernel, mesh, 4)(q, kv.k, kv.v, layer, *batch)


ATTENTION_BACKENDS: dict[str, AttentionFn] = {"xla": xla_paged_attention,
                                              "pallas": pallas_paged_attention}


def get_attention(name: str) -> AttentionFn:
    try:
        return ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r} "
                         f"(available: {sorted(ATTENTION_BACKENDS)})") from None
