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


MASK_VALUE = -1e30
# The XLA path's work items (whole pages; at least one page of keys). Chosen on the 2-core CPU
# for SmolLM2 shapes: short prefills (a turn's 72 tokens over 700 cached) cost about 30% less
# than with tiles of 64 rows and blocks of 512 keys, 512-token prefills about the same.
LAST_ROWS_KEYS = 128  # keys per item of the last rows (decodes), 8 items per loop iteration
TILE_ROWS = 16        # prefill rows per tile
TILE_KEYS = 128       # keys per item of a tile
TILE_ITEMS = 12       # items per loop iteration of the tiles (a 72-token turn over 728
                      # cached: 35 items, 3 iterations; 16 a time cost it 10% more)

class AttentionFn(Protocol):
    """interpret: for kernels with an interpreter (Pallas), run it instead of compiling the
    kernel; the caller decides from the platform it compiles for (backends without one ignore
    it)."""

    def __call__(self, q: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch, *,
                 sm_scale: float, mesh: Any = None, interpret: bool = False) -> jax.Array: ...


def _attend(qg: jax.Array, row_pos: jax.Array, row_seq: jax.Array, pair_unit: jax.Array,
            pair_seq: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch,
            sm_scale: float, items_per_iter: int, block_keys: int) -> jax.Array:
    """Attention of U query units of R rows each over their sequences' pages, costing about
    the keys each row really needs.

    qg [U, R, kv_heads, group, D]; row_pos [U, R] each row's position and row_seq [U, R] its
    sequence (-1: no query here; such rows come out 0). A unit's rows may belong to several
    sequences: pair_unit, pair_seq [NP] list the (unit, sequence) pairs to compute, sorted by
    unit (pair_seq -1: none). Returns float32 [U, R, kv_heads, group, D].

    Each pair needs its sequence's keys up to the last position of its rows, cut into blocks of
    block_keys keys (whole pages); the (pair, block) items are numbered pair by pair, and a loop with a
    dynamic trip count takes items_per_iter of them at a time: per item scores, a masked
    softmax, then an online merge into the unit's running max, sum and output (flash attention
    over a work list). Nothing is computed for padding, or for keys no row needs.
    """
    num_units, rows, num_kv_heads, group, head_dim = qg.shape
    page_size = kv.k.shape[2]
    pages_per_block = max(1, block_keys // page_size)
    block_keys = pages_per_block * page_size
    width = batch.page_table.shape[1]

    match = (row_seq[pair_unit] == pair_seq[:, None]) & (pair_seq[:, None] >= 0)   # [NP, R]
    last_pos = jnp.max(jnp.where(match, row_pos[pair_unit], -1), axis=1)           # [NP]
    blocks = jnp.where(last_pos >= 0, last_pos // block_keys + 1, 0)
    cu = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(blocks, dtype=jnp.int32)])
    total = cu[-1]
    w = jnp.arange(items_per_iter, dtype=jnp.int32)

    def body(it, carry):
        m, l, o = carry                  # [U, K, G, R], [U, K, G, R], [U, K, G, R, D]
        item = it * items_per_iter + w
        valid = item < total
        pair = jnp.clip(jnp.searchsorted(cu[1:], item, side="right"), 0,
                        pair_unit.shape[0] - 1).astype(jnp.int32)
        blk = item - cu[pair]
        u, seq = pair_unit[pair], jnp.maximum(pair_seq[pair], 0)
        cols = jnp.clip(blk[:, None] * pages_per_block + jnp.arange(pages_per_block), 0,
                        width - 1)
        pages = batch.page_table[seq[:, None], cols]                         # [W, pages]
        shape = (items_per_iter, block_keys, num_kv_heads, head_dim)
        k = kv.k[layer, pages].reshape(shape)       # read from the stacked pools in place
        v = kv.v[layer, pages].reshape(shape)
        k_pos = blk[:, None] * block_keys + jnp.arange(block_keys, dtype=jnp.int32)  # [W, C]
        q_pos = jnp.where((row_seq[u] == seq[:, None]) & valid[:, None], row_pos[u], -1)
        mask = ((k_pos[:, None, :] <= q_pos[:, :, None]) &
                (k_pos < batch.kv_lens[seq][:, None])[:, None, :])           # [W, R, C]
        s = jnp.einsum("wrkgd,wckd->wkgrc", qg[u], k,
                       preferred_element_type=jnp.float32) * sm_scale
        mask = mask[:, None, None]
        s = jnp.where(mask, s, MASK_VALUE)
        m_item = jnp.max(s, axis=-1)                                          # [W, K, G, R]
        p = jnp.where(mask, jnp.exp(s - m_item[..., None]), 0.0)
        l_item = jnp.sum(p, axis=-1)
        o_item = jnp.einsum("wkgrc,wckd->wkgrd", p.astype(v.dtype), v,
                            preferred_element_type=jnp.float32)
        # merge: the items of one unit are consecutive; the first of them in this batch
        # rescales the unit's running sums once
        m_new = m.at[u].max(m_item)
        m_unit = m_new[u]
        first = jnp.concatenate([jnp.ones(1, bool), u[1:] != u[:-1]])
        alpha = jnp.where(first[:, None, None, None], jnp.exp(m[u] - m_unit), 1.0)
        scale = jnp.exp(m_item - m_unit)
        l = l.at[u].multiply(alpha).at[u].add(l_item * scale)
        o = o.at[u].multiply(alpha[..., None]).at[u].add(o_item * scale[..., None])
        return m_new, l, o

    init = (jnp.full((num_units, num_kv_heads, group, rows), MASK_VALUE, jnp.float32),
            jnp.zeros((num_units, num_kv_heads, group, rows), jnp.float32),
            jnp.zeros((num_units, num_kv_heads, group, rows, head_dim), jnp.float32))
    _, l, o = jax.lax.fori_loop(0, -(-total // items_per_iter), body, init)
    out = o / jnp.where(l > 0, l, 1.0)[..., None]
    return jnp.moveaxis(out, 3, 1)                                  # [U, R, K, G, D]


def xla_paged_attention(q: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch, *,
                        sm_scale: float, mesh: Any = None, interpret: bool = False) -> jax.Array:
    """Paged attention in plain XLA over a work list of (query rows, key block) items: the
    fast path on CPU, and the fallback anywhere.

    q [T, num_q_heads, head_dim] -> [T, num_q_heads, head_dim]. Rows are computed in two parts:

      last rows   every sequence's last new row (a decode's only one): S units of 1 row.
      tiles       the other rows (prefill), in the token order: T / TILE_ROWS units of
                  TILE_ROWS consecutive rows, each computed once per sequence it holds rows of
                  (at most T / TILE_ROWS + S pairs); skipped at run time when the step has none.

    Only static shapes are T, S and the page-table width; the work is a dynamic number of
    items, each a block of keys (LAST_ROWS_KEYS, TILE_KEYS) that some row needs, so a step costs about its
    real rows times their real contexts, whatever its mix, padding or table width. Numerics:
    each query row's scores, mask and softmax are those of a dense per-sequence attention
    (float32 scores, online softmax over key blocks). Under a mesh (heads sharded) XLA
    partitions it by head from the operands' shardings. interpret is ignored (plain XLA).
    """
    del mesh, interpret
    batch = AttentionBatch(*(jnp.asarray(a, jnp.int32) for a in batch))
    kv = KVCache(jnp.asarray(kv.k), jnp.asarray(kv.v))
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = batch.page_table.shape[0]
    num_kv_heads = kv.k.shape[3]
    group = num_heads // num_kv_heads
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)

    cu = batch.cu_q_lens
    q_lens = cu[1:] - cu[:-1]                                                  # [S]
    seqs = jnp.arange(num_seqs, dtype=jnp.int32)
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cu[1:], t, side="right"), num_seqs - 1).astype(jnp.int32)
    pos = batch.kv_lens[seq] - q_lens[seq] + (t - cu[seq])                    # [T]
    real = t < cu[-1]
    is_last = real & (t == cu[seq + 1] - 1)

    last_q = qg[jnp.clip(cu[1:] - 1, 0, num_tokens - 1)][:, None]              # [S, 1, ...]
    has_rows = (q_lens > 0)[:, None]
    out = _attend(last_q, jnp.where(has_rows, batch.kv_lens[:, None] - 1, -1),
                  jnp.where(has_rows, seqs[:, None], -1), seqs, seqs, kv, layer, batch,
                  sm_scale, 8, LAST_ROWS_KEYS)[:, 0][seq]

    if num_tokens > 1:
        units = -(-num_tokens // TILE_ROWS)
        pad = units * TILE_ROWS - num_tokens
        tile_q = jnp.pad(qg, ((0, pad), (0, 0), (0, 0), (0, 0))).reshape(
            units, TILE_ROWS, num_kv_heads, group, head_dim)
        prefill = real & ~is_last
        row_seq = jnp.pad(jnp.where(prefill, seq, -1), (0, pad), constant_values=-1)
        row_pos = jnp.pad(pos, (0, pad)).reshape(units, TILE_ROWS)
        row_seq = row_seq.reshape(units, TILE_ROWS)
        # (tile, sequence) pairs: the sequences each tile's rows belong to
        first_seq = jnp.min(jnp.where(row_seq >= 0, row_seq, num_seqs), axis=1)     # [U]
        last_seq = jnp.max(row_seq, axis=1)
        counts = jnp.maximum(last_seq - first_seq + 1, 0)
        cu_pairs = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])
        j = jnp.arange(units + num_seqs, dtype=jnp.int32)
        pair_unit = jnp.minimum(jnp.searchsorted(cu_pairs[1:], j, side="right"),
                                units - 1).astype(jnp.int32)
        pair_seq = jnp.where(j < cu_pairs[-1], first_seq[pair_unit] + j - cu_pairs[pair_unit],
                             -1)

        def tile_rows(out):
            tiles = _attend(tile_q, row_pos, row_seq, pair_unit, pair_seq, kv, layer, batch,
                            sm_scale, TILE_ITEMS, TILE_KEYS)
            tiles = tiles.reshape(units * TILE_ROWS, num_kv_heads, group, head_dim)[:num_tokens]
            return jnp.where(is_last[:, None, None, None], out, tiles)
        out = jax.lax.cond(jnp.any(prefill), tile_rows, lambda out: out, out)

    out = out.reshape(num_tokens, num_heads, head_dim)
    return jnp.where(real[:, None, None], out, 0.0).astype(q.dtype)


def pallas_paged_attention(q: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch, *,
                           sm_scale: float, mesh: Any = None, interpret: bool = False) -> jax.Array:
    """The Pallas kernel: compiled (Triton, GPU only) when interpret is False, interpreted
    when True; the caller says which (model.Llama's interpret, set by the runner from the
    platform of its devices), nothing is inferred from the default backend.
    Under a mesh the kernel runs once per shard (shard_map) on that shard's heads and pages."""
    from pallas_kernels import ragged_paged_attention_stacked
    from pensieve_jax.model.parallel import shard_heads

    def kernel(q, k_pool, v_pool, layer, page_table, kv_lens, cu_q_lens):
        return ragged_paged_attention_stacked(q, k_pool, v_pool, layer, page_table, kv_lens,
                                              cu_q_lens, sm_scale=sm_scale, interpret=interpret)
    return shard_heads(kernel, mesh, 4)(q, kv.k, kv.v, layer, *batch)


ATTENTION_BACKENDS: dict[str, AttentionFn] = {"xla": xla_paged_attention,
                                              "pallas": pallas_paged_attention}


def get_attention(name: str) -> AttentionFn:
    try:
        return ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r} "
                         f"(available: {sorted(ATTENTION_BACKENDS)})") from None
