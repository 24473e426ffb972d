"""Paged attention in plain XLA: the fast path on CPU and the fallback anywhere (see
`xla_paged_attention`); the batch layout is pensieve_jax.model.kv_layout's."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pensieve_jax.model.cpu_attention import cpu_decode_rows
from pensieve_jax.model.kv_layout import AttentionBatch, KVCache

MASK_VALUE = -1e30
# The XLA path's work items (whole pages; at least one page of keys). Chosen on the 2-core CPU
# for SmolLM2 shapes: short prefills (a turn's 72 tokens over 700 cached) cost about 30% less
# than with tiles of 64 rows and blocks of 512 keys, 512-token prefills about the same.
LAST_ROWS_KEYS = 128  # keys per item of the last rows (decodes), 8 items per loop iteration
TILE_ROWS = 16        # prefill rows per tile
TILE_KEYS = 128       # keys per item of a tile
TILE_ITEMS = 12       # items per loop iteration of the tiles (a 72-token turn over 728
                      # cached: 35 items, 3 iterations; 16 a time cost it 10% more)
# A step whose prefill rows are one sequence's: chunks of ONE_ROWS rows over blocks of ONE_KEYS
# keys, the rest in blocks of ONE_TAIL_KEYS. SmolLM2's 30 layers on the 2-core CPU, a 73-token
# turn over 728 cached (512 + 3 x 128 keys): 67 ms, against 109 ms in tiles (whole step: 188
# against 228 ms); blocks of 256 keys cost 10% more, a 512-key last block 5%.
ONE_ROWS, ONE_KEYS, ONE_TAIL_KEYS = 128, 512, 128


def _attend(qg: jax.Array, row_pos: jax.Array, row_seq: jax.Array, pair_unit: jax.Array,
            pair_seq: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch,
            sm_scale: float, items_per_iter: int, block_keys: int,
            sliding_window: int | None = None) -> jax.Array:
    """Attention of U query units of R rows each over their sequences' pages, costing about
    the keys each row really needs.

    qg [U, R, kv_heads, group, D]; row_pos [U, R] each row's position and row_seq [U, R] its
    sequence (-1: no query here; such rows come out 0). A unit's rows may belong to several
    sequences: pair_unit, pair_seq [NP] list the (unit, sequence) pairs to compute, sorted by
    unit (pair_seq -1: none). Returns float32 [U, R, kv_heads, group, D].

    Each pair needs its sequence's keys up to the last position of its rows (with a sliding
    window W, from the first row's position - W + 1 on), cut into blocks of
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
    if sliding_window is None:
        first_blk = jnp.zeros_like(last_pos)
    else:                          # blocks wholly before the first row's window are skipped
        first_pos = jnp.min(jnp.where(match, row_pos[pair_unit], jnp.iinfo(jnp.int32).max),
                            axis=1)
        first_blk = jnp.maximum(first_pos - sliding_window + 1, 0) // block_keys
    blocks = jnp.where(last_pos >= 0, last_pos // block_keys + 1 - first_blk, 0)
    cu = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(blocks, dtype=jnp.int32)])
    total = cu[-1]
    w = jnp.arange(items_per_iter, dtype=jnp.int32)

    def body(it, carry):
        m, l, o = carry                  # [U, K, G, R], [U, K, G, R], [U, K, G, R, D]
        item = it * items_per_iter + w
        valid = item < total
        pair = jnp.clip(jnp.searchsorted(cu[1:], item, side="right"), 0,
                        pair_unit.shape[0] - 1).astype(jnp.int32)
        blk = first_blk[pair] + item - cu[pair]
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
        if sliding_window is not None:
            mask &= k_pos[:, None, :] > q_pos[:, :, None] - sliding_window
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


def _one_sequence(qg: jax.Array, q_pos: jax.Array, seq: jax.Array, start: jax.Array,
                  num_rows: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch,
                  sm_scale: float, sliding_window: int | None = None) -> jax.Array:
    """Attention of one sequence's rows, [start, start + num_rows) of the step, as dense dots:
    chunks of ONE_ROWS rows, each over its keys up to its last row's position (from the page
    holding its first row's window start on) in blocks of ONE_KEYS, the rest in blocks of
    ONE_TAIL_KEYS; per block and kv head one [group * rows, head_dim] x [head_dim, keys]
    product and an online softmax.

    qg [T, kv_heads, group, D]; q_pos [T] each row's position, -1 for rows not of `seq` (they
    come out as garbage: the caller keeps only the sequence's rows). Returns float32 [T, K, G, D].
    """
    num_tokens, num_kv_heads, group, head_dim = qg.shape
    page_size = kv.k.shape[2]
    big, tail = (max(1, n // page_size) for n in (ONE_KEYS, ONE_TAIL_KEYS))   # pages a block
    width = batch.page_table.shape[1]
    chunk = min(num_tokens, ONE_ROWS)
    rows = group * chunk
    q_all = jnp.pad(qg, ((0, chunk), (0, 0), (0, 0), (0, 0)))
    pos_all = jnp.pad(q_pos, (0, chunk), constant_values=-1)
    kv_len = batch.kv_lens[seq]

    def one_chunk(c, out):
        at = start + c * chunk
        q = jax.lax.dynamic_slice_in_dim(q_all, at, chunk)                  # [R, K, G, D]
        pos = jax.lax.dynamic_slice_in_dim(pos_all, at, chunk)              # [R]
        q = jnp.transpose(q, (1, 2, 0, 3)).reshape(num_kv_heads, rows, head_dim)
        first_page = jnp.int32(0)
        if sliding_window is not None:   # pages wholly before the first row's window: unread
            first = jnp.min(jnp.where(pos >= 0, pos, jnp.iinfo(jnp.int32).max))
            first_page = jnp.maximum(first - sliding_window + 1, 0) // page_size
        pages_needed = jnp.maximum(-(-(jnp.max(pos) + 1) // page_size) - first_page, 0)

        def blocks(ppb: int, page0: jax.Array):
            def block(b, carry):
                m, l, o = carry           # [K, G*R], [K, G*R], [K, G*R, D]
                first = page0 + b * ppb
                pages = batch.page_table[seq, jnp.clip(first + jnp.arange(ppb), 0, width - 1)]
                shape = (ppb * page_size, num_kv_heads, head_dim)
                k, v = kv.k[layer, pages].reshape(shape), kv.v[layer, pages].reshape(shape)
                k_pos = first * page_size + jnp.arange(ppb * page_size, dtype=jnp.int32)
                mask = (k_pos[None, :] <= pos[:, None]) & (k_pos < kv_len)[None, :]  # [R, C]
                if sliding_window is not None:
                    mask &= k_pos[None, :] > pos[:, None] - sliding_window
                s = jnp.einsum("kmd,ckd->kmc", q, k, preferred_element_type=jnp.float32)
                s = jnp.where(mask[None, None], s.reshape(num_kv_heads, group, chunk, -1)
                              * sm_scale, MASK_VALUE).reshape(s.shape)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                # a row with no key yet keeps m = MASK_VALUE: its terms are wiped (alpha = 0)
                # by the first block that has one
                p = jnp.exp(s - m_new[..., None])
                alpha = jnp.exp(m - m_new)
                o = o * alpha[..., None] + jnp.einsum("kmc,ckd->kmd", p.astype(v.dtype), v,
                                                      preferred_element_type=jnp.float32)
                return m_new, l * alpha + jnp.sum(p, axis=-1), o
            return block

        carry = (jnp.full((num_kv_heads, rows), MASK_VALUE, jnp.float32),
                 jnp.zeros((num_kv_heads, rows), jnp.float32),
                 jnp.zeros((num_kv_heads, rows, head_dim), jnp.float32))
        n_big = pages_needed // big
        carry = jax.lax.fori_loop(0, n_big, blocks(big, first_page), carry)
        carry = jax.lax.fori_loop(0, -(-(pages_needed - n_big * big) // tail),
                                  blocks(tail, first_page + n_big * big), carry)
        _, l, o = carry
        o = o / jnp.where(l > 0, l, 1.0)[..., None]
        o = jnp.transpose(o.reshape(num_kv_heads, group, chunk, head_dim), (2, 0, 1, 3))
        return jax.lax.dynamic_update_slice_in_dim(out, o, at, 0)

    out = jnp.zeros((num_tokens + chunk, num_kv_heads, group, head_dim), jnp.float32)
    if chunk == num_tokens:          # one chunk holds the step (no loop: faster to compile)
        return one_chunk(0, out)[:num_tokens]
    return jax.lax.fori_loop(0, -(-num_rows // chunk), one_chunk, out)[:num_tokens]


def _tiles(qg: jax.Array, pos: jax.Array, seq: jax.Array, prefill: jax.Array, num_seqs: int,
           kv: KVCache, layer: jax.Array, batch: AttentionBatch, sm_scale: float,
           sliding_window: int | None) -> jax.Array:
    """The prefill rows (prefill [T]) of a step, tiled: TILE_ROWS consecutive rows a unit, each
    unit computed once per sequence it holds rows of. Returns [T, K, G, D] (other rows:
    garbage)."""
    num_tokens, num_kv_heads, group, head_dim = qg.shape
    units = -(-num_tokens // TILE_ROWS)
    pad = units * TILE_ROWS - num_tokens
    tile_q = jnp.pad(qg, ((0, pad), (0, 0), (0, 0), (0, 0))).reshape(
        units, TILE_ROWS, num_kv_heads, group, head_dim)
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
    pair_seq = jnp.where(j < cu_pairs[-1], first_seq[pair_unit] + j - cu_pairs[pair_unit], -1)
    tiles = _attend(tile_q, row_pos, row_seq, pair_unit, pair_seq, kv, layer, batch,
                    sm_scale, TILE_ITEMS, TILE_KEYS, sliding_window)
    return tiles.reshape(units * TILE_ROWS, num_kv_heads, group, head_dim)[:num_tokens]


def xla_paged_attention(q: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch, *,
                        sm_scale: float, sliding_window: int | None = None, mesh: Any = None,
                        interpret: bool = False, cpu_kernels: bool = False) -> jax.Array:
    """Paged attention in plain XLA: the fast path on CPU, and the fallback anywhere.

    q [T, num_q_heads, head_dim] -> [T, num_q_heads, head_dim]. A step's rows are computed by
    one of three plans, chosen at run time by where its prefill rows (all rows but each
    sequence's last) are:

      none          decodes only: every sequence's last new row, S units of 1 row over a work
                    list of (row, key block of LAST_ROWS_KEYS) items (`_attend`).
      one sequence  (a turn's prefill, alone or beside decodes): that sequence's rows as dense
                    dots over key blocks (`_one_sequence`); the other sequences' last rows as
                    above.
      several       last rows as above; the prefill rows in tiles of TILE_ROWS consecutive
                    rows, each computed once per sequence it holds rows of (at most
                    T / TILE_ROWS + S pairs), over a work list of (tile, key block of
                    TILE_KEYS) items (`_tiles`).

    Only static shapes are T, S and the page-table width; the work follows the keys each row
    really needs (whole blocks), so a step costs about its real rows times their real
    contexts, whatever its padding or table width. Numerics: each query row's scores, mask and
    softmax are those of a dense per-sequence attention (float32 scores, online softmax over
    key blocks). sliding_window W: a row attends to the positions > its own - W only, and
    pages wholly before every row's window are not read. Under a mesh (heads sharded) XLA
    partitions it by head from the operands' shardings. interpret is ignored (plain XLA).
    cpu_kernels: the decode rows (float32) by the CPU kernel (model/cpu_attention.py; a CPU
    only, cpu_kernels.load() first), about 3x faster there than the work list (SmolLM2).
    """
    del interpret
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
    prefill = real & (t != cu[seq + 1] - 1)
    hi = jnp.max(jnp.where(prefill, seq, -1))
    one = jnp.maximum(hi, 0)
    plan = jnp.where(hi < 0, 0, jnp.where(jnp.min(jnp.where(prefill, seq, num_seqs)) == hi,
                                          1, 2))       # 0 none, 1 one sequence, 2 several

    last_q = qg[jnp.clip(cu[1:] - 1, 0, num_tokens - 1)][:, None]              # [S, 1, ...]
    has_rows = ((q_lens > 0) & ((plan != 1) | (seqs != one)))[:, None]
    if cpu_kernels and kv.k.dtype == jnp.float32:    # the decode rows by the CPU kernel
        out = cpu_decode_rows(last_q.reshape(num_seqs, num_heads, head_dim), kv, layer, batch,
                              jnp.where(has_rows[:, 0], batch.kv_lens, 0), sm_scale=sm_scale,
                              sliding_window=sliding_window, mesh=mesh)
        out = out.reshape(num_seqs, num_kv_heads, group, head_dim)[seq]
    else:
        out = _attend(last_q, jnp.where(has_rows, batch.kv_lens[:, None] - 1, -1),
                      jnp.where(has_rows, seqs[:, None], -1), seqs, seqs, kv, layer, batch,
                      sm_scale, 8, LAST_ROWS_KEYS, sliding_window)[:, 0][seq]

    if num_tokens > 1:
        def one_sequence(out):
            mine = real & (seq == one)
            rows = _one_sequence(qg, jnp.where(mine, pos, -1), one, cu[one], q_lens[one], kv,
                                 layer, batch, sm_scale, sliding_window)
            return jnp.where(mine[:, None, None, None], rows, out)

        def several(out):
            rows = _tiles(qg, pos, seq, prefill, num_seqs, kv, layer, batch, sm_scale,
                          sliding_window)
            return jnp.where(prefill[:, None, None, None], rows, out)
        out = jax.lax.switch(plan, [lambda out: out, one_sequence, several], out)

    out = out.reshape(num_tokens, num_heads, head_dim)
    return jnp.where(real[:, None, None], out, 0.0).astype(q.dtype)
