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


Q_BLOCK = 64   # query rows per tile of the XLA path's prefill part (of 16, 32, 64, 128: the fastest
               # on CPU for SmolLM2 shapes, mixed, prefill-only and short-turn steps alike)


def q_blocks_needed(q_lens) -> int:
    """Query tiles the XLA path needs for sequences with these q_lens (host side, exact): every
    row but each sequence's last, cut per sequence into tiles of Q_BLOCK rows."""
    return sum(-(-max(int(n) - 1, 0) // Q_BLOCK) for n in q_lens)


def max_q_blocks(num_tokens: int, num_seqs: int, max_q_len: int) -> int:
    """A bound on `q_blocks_needed` for any step of num_tokens tokens over num_seqs sequences
    whose q_lens are all <= max_q_len."""
    if max_q_len <= 1:
        return 0
    return min(num_seqs * -(-(max_q_len - 1) // Q_BLOCK),
               -(-num_tokens // Q_BLOCK) + min(num_seqs, num_tokens // 2))


class AttentionFn(Protocol):
    def __call__(self, q: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch, *,
                 sm_scale: float, max_q_len: int, num_q_blocks: int | None = None,
                 mesh: Any = None) -> jax.Array: ...


def _masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                      kv_lens: jax.Array, sm_scale: float) -> jax.Array:
    """Causal attention of B query groups over B contexts (float32 result).

    q [B, R, kv_heads, group, D], k/v [B, C, kv_heads, D], q_pos [B, R] (position of each query
    row; -1: no query, the row comes out 0), kv_lens [B] (keys at >= kv_len are masked).
    """
    scores = jnp.einsum("brkgd,bckd->bkgrc", q, k, preferred_element_type=jnp.float32)
    scores = scores * sm_scale
    k_pos = jnp.arange(k.shape[1], dtype=jnp.int32)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (
        k_pos[None, None, :] < kv_lens[:, None, None])                      # [B, R, C]
    mask = mask[:, None, None]                                              # [B, 1, 1, R, C]
    scores = jnp.where(mask, scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask, probs, 0.0)
    return jnp.einsum("bkgrc,bckd->brkgd", probs.astype(v.dtype), v,
                      preferred_element_type=jnp.float32)


def xla_paged_attention(q: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch, *,
                        sm_scale: float, max_q_len: int, num_q_blocks: int | None = None,
                        mesh: Any = None) -> jax.Array:
    """Gather pages and run masked attention over query tiles: the fast path on CPU.

    q [T, num_q_heads, head_dim] -> [T, num_q_heads, head_dim]. Queries are computed in two parts,
    so a step costs about its real number of query rows, whatever its mix:

      last rows   every sequence's last new row (a decode's only one): [S, 1] queries.
      tiles       the other rows of each sequence with q_len > 1, cut per sequence into tiles
                  of Q_BLOCK consecutive rows: [num_q_blocks, Q_BLOCK] queries.

    Each part attends over its sequence's pages, ctx = page_table width * page_size keys, and
    each token takes its output from the part holding it. One 512-token prefill chunk with 15
    decodes costs 16 + 8 * 64 query rows.

    Static bounds (the caller guarantees them): every q_len <= max_q_len (1: decode only, no
    tiles); num_q_blocks >= `q_blocks_needed(q_lens)` (the runner passes a power-of-two bucket;
    None: a bound that holds for any batch of T tokens and S sequences). Numerics: each query
    row's scores, mask and softmax are as in a dense per-sequence attention (float32 scores).
    Under a mesh (heads sharded) XLA partitions it by head from the operands' shardings;
    nothing here needs to know.
    """
    del mesh
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, pages_per_seq = batch.page_table.shape
    _, _, page_size, num_kv_heads, _ = kv.k.shape
    group = num_heads // num_kv_heads
    ctx = pages_per_seq * page_size
    if num_q_blocks is None:
        num_q_blocks = max_q_blocks(num_tokens, num_seqs, max_q_len)

    cu = batch.cu_q_lens
    q_lens = cu[1:] - cu[:-1]                                                  # [S]
    first_pos = batch.kv_lens - q_lens                       # position of each sequence's row 0
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    k_pool, v_pool = kv.k[layer], kv.v[layer]

    def pages(table):                                        # [B, P] -> [B, ctx, kv_heads, D]
        shape = (table.shape[0], ctx, num_kv_heads, head_dim)
        return k_pool[table].reshape(shape), v_pool[table].reshape(shape)

    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cu[1:], t, side="right"), num_seqs - 1).astype(jnp.int32)
    row = t - cu[seq]                                        # token t is row `row` of `seq`

    last_q = qg[jnp.clip(cu[1:] - 1, 0, num_tokens - 1)][:, None]              # [S, 1, ...]
    last_pos = jnp.where(q_lens > 0, batch.kv_lens - 1, -1)[:, None]           # [S, 1]
    out = _masked_attention(last_q, *pages(batch.page_table), last_pos, batch.kv_lens,
                            sm_scale)[:, 0][seq]                                 # [T, ...]

    if num_q_blocks > 0:
        tiles = -(-jnp.maximum(q_lens - 1, 0) // Q_BLOCK)                       # [S]
        cu_tiles = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(tiles, dtype=jnp.int32)])
        b = jnp.arange(num_q_blocks, dtype=jnp.int32)
        b_seq = jnp.minimum(jnp.searchsorted(cu_tiles[1:], b, side="right"),
                            num_seqs - 1).astype(jnp.int32)
        b_row = ((b - cu_tiles[b_seq]) * Q_BLOCK)[:, None] + jnp.arange(Q_BLOCK, dtype=jnp.int32)
        b_valid = (b_row < q_lens[b_seq, None] - 1) & (b < cu_tiles[-1])[:, None]
        b_q = qg[jnp.clip(cu[b_seq, None] + b_row, 0, num_tokens - 1)]      # [NB, Q_BLOCK, ...]
        b_pos = jnp.where(b_valid, first_pos[b_seq, None] + b_row, -1)
        b_out = _masked_attention(b_q, *pages(batch.page_table[b_seq]), b_pos,
                                  batch.kv_lens[b_seq], sm_scale)
        tile = jnp.clip(cu_tiles[seq] + row // Q_BLOCK, 0, num_q_blocks - 1)
        is_last = (row == q_lens[seq] - 1)[:, None, None, None]
        out = jnp.where(is_last, out, b_out[tile, row % Q_BLOCK])

    out = out.reshape(num_tokens, num_heads, head_dim)
    valid = (t < cu[-1])[:, None, None]
    return jnp.where(valid, out, 0.0).astype(q.dtype)


def pallas_paged_attention(q: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch, *,
                           sm_scale: float, max_q_len: int, num_q_blocks: int | None = None,
                           mesh: Any = None) -> jax.Array:
    """The Pallas kernel (compiled on GPU, interpreted elsewhere); max_q_len and num_q_blocks
    are not needed.
    Under a mesh the kernel runs once per shard (shard_map) on that shard's heads and pages."""
    from pallas_kernels import ragged_paged_attention_stacked
    from pensieve_jax.parallel import shard_heads
    del max_q_len, num_q_blocks

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
