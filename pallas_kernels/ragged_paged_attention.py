"""Ragged multi-query paged attention: prefill chunks and decodes over scattered pages, one launch.

Work mapping (host-free: the plan is computed in jnp inside the jitted wrapper):
  * queries of each sequence are cut into blocks of `block_q` tokens; a block is one grid
    program per KV head, with the `group` query heads sharing that KV head packed into the rows
    of one matrix multiply (rows = block_q * group, padded to a power of two);
  * the context of each block is walked page block by page block (`pages_per_block` pages, at
    least 16 keys, gathered through the page table) with an online softmax;
  * for decode-heavy steps the context is split into `num_splits` ranges run by separate
    programs and combined afterwards (flash-decoding), so a few long sequences fill the GPU.

Two query ranges over one context (Pensieve's recomputed front + new prompt) are two rows of
the batch sharing one page-table row; nothing is copied.

Sliding window W (static): a row attends to the positions > its own - W only; a block walks
its context from the page block holding its first row's window start, so pages wholly before
every row's window are never read (and the context splits cover only the window's span).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

MASK_VALUE = -1e30


# -- block sizes ------------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def block_sizes(num_tokens: int, num_seqs: int, group: int, page_size: int, pages_per_seq: int,
                num_splits: int | None = None,
                sliding_window: int | None = None) -> tuple[int, int, int]:
    """(block_q, pages_per_block, num_splits) for a step's static shapes."""
    group_pad = _next_pow2(group)
    decode_heavy = num_tokens <= 2 * num_seqs
    rows = 16 if decode_heavy else 64
    block_q = max(1, rows // group_pad)
    pages_per_block = max(1, 64 // page_size)
    span = span_pages(pages_per_seq, page_size, pages_per_block, block_q, sliding_window)
    if num_splits is None:
        num_splits = min(8, max(1, span // (4 * pages_per_block))) if decode_heavy else 1
    return block_q, pages_per_block, num_splits


def span_pages(pages_per_seq: int, page_size: int, pages_per_block: int, block_q: int,
               sliding_window: int | None) -> int:
    """Most pages one block of block_q rows reads, from its first page block on: the whole
    table, or with a window W the pages of W + block_q - 1 keys plus one page block of
    alignment."""
    if sliding_window is None:
        return pages_per_seq
    return min(pages_per_seq, pl.cdiv(sliding_window + block_q - 1, page_size) + pages_per_block)


# -- kernel -----------------------------------------------------------------------------------

def _kernel(layer_ref,        # int32 [1]
            block_seq_ref,    # int32 [num_blocks]: the block's sequence, -1 for an empty block
            block_start_ref,  # int32 [num_blocks]: its first query row within the sequence
            page_table_ref,   # int32 [num_seqs, padded_pages_per_seq]
            kv_lens_ref,      # int32 [num_seqs]
            cu_q_lens_ref,    # int32 [num_seqs + 1]
            q_ref,            # [rows, head_dim], rows = block_q * group_pad (token-major)
            k_ref,            # [layers, num_pages, page_size, num_kv_heads, head_dim]
            v_ref,            # [layers, num_pages, page_size, num_kv_heads, head_dim]
            o_ref,            # float32 [rows, head_dim], unnormalized
            m_ref,            # float32 [rows], running max
            l_ref,            # float32 [rows], running sum
            *, sm_scale: float, group_pad: int, block_q: int, pages_per_block: int,
            pages_per_split: int, sliding_window: int | None):
    head, blk, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, head_dim = q_ref.shape
    page_size = k_ref.shape[2]
    block_k = pages_per_block * page_size

    seq_raw = block_seq_ref[blk]
    seq = jnp.maximum(seq_raw, 0)
    q_start = block_start_ref[blk]
    q_len = cu_q_lens_ref[seq + 1] - cu_q_lens_ref[seq]
    kv_len = kv_lens_ref[seq]
    first_pos = kv_len - q_len + q_start                     # position of the block's first row
    last_pos = kv_len - q_len + jnp.minimum(q_start + block_q, q_len) - 1
    needed_pages = jnp.where(seq_raw >= 0, pl.cdiv(last_pos + 1, page_size), 0)
    if sliding_window is None:
        first_page = 0
    else:   # the page block holding the first row's window start (aligned: whole blocks)
        first_key = jnp.maximum(first_pos - sliding_window + 1, 0)
        first_page = first_key // page_size // pages_per_block * pages_per_block
    page_lo = first_page + split * pages_per_split
    page_hi = jnp.minimum(page_lo + pages_per_split, needed_pages)
    num_iters = pl.cdiv(jnp.maximum(page_hi - page_lo, 0), pages_per_block)

    q = q_ref[...]
    q_pos = first_pos + lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group_pad
    layer = layer_ref[0]

    def body(i, carry):
        acc, m_prev, l_prev = carry
        page0 = page_lo + i * pages_per_block
        pages = page_table_ref[seq, pl.ds(page0, pages_per_block)]
        k = k_ref[layer, pages, :, head, :].reshape(block_k, head_dim)
        v = v_ref[layer, pages, :, head, :].reshape(block_k, head_dim)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * sm_scale
        k_pos = page0 * page_size + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        mask = (k_pos <= q_pos) & (k_pos < kv_len) & (k_pos < page_hi * page_size)
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
        l_next = l_prev * correction + p.sum(axis=-1)
        acc = acc * correction[:, None] + jnp.dot(p.astype(v.dtype), v,
                                                  preferred_element_type=jnp.float32)
        return acc, m_next, l_next

    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(0, num_iters, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


# -- jitted wrapper ---------------------------------------------------------------------------

def _check(q, k_pages, v_pages, page_table, kv_lens, cu_q_lens):
    if q.ndim != 3:
        raise ValueError(f"q must be [num_tokens, num_q_heads, head_dim], got shape {q.shape}")
    if k_pages.ndim != 5 or k_pages.shape != v_pages.shape:
        raise ValueError("k_pages and v_pages must both be [layers, num_pages, page_size, "
                         f"num_kv_heads, head_dim]; got {k_pages.shape} and {v_pages.shape}")
    _, _, page_size, num_kv_heads, head_dim = k_pages.shape
    if q.shape[2] != head_dim:
        raise ValueError(f"q head_dim {q.shape[2]} != k_pages head_dim {head_dim}")
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"num_q_heads {q.shape[1]} is not a multiple of num_kv_heads "
                         f"{num_kv_heads}")
    if page_table.ndim != 2 or kv_lens.shape != (page_table.shape[0],) or \
            cu_q_lens.shape != (page_table.shape[0] + 1,):
        raise ValueError(f"page_table [S, P], kv_lens [S], cu_q_lens [S + 1] disagree: "
                         f"{page_table.shape}, {kv_lens.shape}, {cu_q_lens.shape}")
    for name, a in (("page_table", page_table), ("kv_lens", kv_lens), ("cu_q_lens", cu_q_lens)):
        if a.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {a.dtype}")
    if page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")


def _check_window(sliding_window) -> None:
    if sliding_window is not None and (isinstance(sliding_window, bool) or
                                       not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or an integer >= 1, got {sliding_window!r}")


def _check_interpret(interpret) -> None:
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret must be True or False (explicit, never inferred from the "
                        f"default backend), got {interpret!r}")


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "num_splits",
                                             "sliding_window"))
def ragged_paged_attention_stacked(q, k_pool, v_pool, layer, page_table, kv_lens, cu_q_lens, *,
                                   interpret: bool, sm_scale: float | None = None,
                                   num_splits: int | None = None,
                                   sliding_window: int | None = None):
    """Like `ragged_paged_attention`, reading layer `layer` of pools stacked over layers
    [layers, num_pages, page_size, num_kv_heads, head_dim] in place."""
    _check_interpret(interpret)
    _check_window(sliding_window)
    _check(q, k_pool, v_pool, page_table, kv_lens, cu_q_lens)
    num_tokens, num_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = k_pool.shape
    num_seqs, pages_per_seq = page_table.shape
    if not interpret and head_dim & (head_dim - 1):
        raise ValueError(f"the compiled kernel needs a power-of-two head_dim, got {head_dim}")
    group = num_heads // num_kv_heads
    group_pad = _next_pow2(group)
    sm_scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    block_q, pages_per_block, splits = block_sizes(num_tokens, num_seqs, group, page_size,
                                                   pages_per_seq, num_splits, sliding_window)
    span = span_pages(pages_per_seq, page_size, pages_per_block, block_q, sliding_window)
    pages_per_split = pl.cdiv(pl.cdiv(span, splits), pages_per_block) * pages_per_block
    num_blocks = pl.cdiv(num_tokens, block_q) + num_seqs        # bound on sum(ceil(q_len/bq))

    # the plan: which sequence and query rows each block covers
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    blocks_per_seq = (q_lens + block_q - 1) // block_q
    block_end = jnp.cumsum(blocks_per_seq)
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    block_seq = jnp.minimum(jnp.searchsorted(block_end, b, side="right"), num_seqs - 1)
    block_start = (b - (block_end - blocks_per_seq)[block_seq]) * block_q
    block_seq = jnp.where(b < block_end[-1], block_seq, -1).astype(jnp.int32)
    block_start = block_start.astype(jnp.int32)

    # q -> [kv_heads, blocks, block_q * group_pad, head_dim]
    rows_tok = jnp.clip(cu_q_lens[jnp.maximum(block_seq, 0)][:, None] + block_start[:, None] +
                        jnp.arange(block_q, dtype=jnp.int32)[None, :], 0, num_tokens - 1)
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, group_pad - group), (0, 0)))
    qb = qg[rows_tok].transpose(2, 0, 1, 3, 4).reshape(num_kv_heads, num_blocks,
                                                       block_q * group_pad, head_dim)
    # every page block a program reads lies in the table: blocks start at multiples of
    # pages_per_block below pages_per_seq (and past it only with no window: the splits)
    padded_pages = max(splits * pages_per_split,
                       pl.cdiv(pages_per_seq, pages_per_block) * pages_per_block)
    table = jnp.pad(page_table, ((0, 0), (0, padded_pages - pages_per_seq)))

    rows = block_q * group_pad
    kernel = functools.partial(_kernel, sm_scale=sm_scale, group_pad=group_pad, block_q=block_q,
                               pages_per_block=pages_per_block, pages_per_split=pages_per_split,
                               sliding_window=sliding_window)
    full = lambda a: pl.BlockSpec(a.shape, lambda h, i, s: (0,) * a.ndim)  # noqa: E731
    scalars = [jnp.reshape(layer, (1,)).astype(jnp.int32), block_seq, block_start, table,
               kv_lens, cu_q_lens]
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        # 32-bit operands take twice the registers of 16-bit ones: with 4 warps a float32 tile
        # of 64 keys x d128 needs 255 registers per thread and spills (ptxas, sm_90a, through
        # benchmarks/aot_compile.py); with 8 warps about 220 and no spill
        compiler_params = plgpu.CompilerParams(
            num_warps=8 if jnp.dtype(q.dtype).itemsize >= 4 else 4, num_stages=2)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(num_kv_heads, num_blocks, splits),
        in_specs=[full(a) for a in scalars] + [
            pl.BlockSpec((None, None, rows, head_dim), lambda h, i, s: (h, i, 0, 0)),
            full(k_pool),    # whole pools: pages are gathered inside the kernel
            full(v_pool),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda h, i, s: (s, h, i, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda h, i, s: (s, h, i, 0)),
            pl.BlockSpec((None, None, None, rows), lambda h, i, s: (s, h, i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, num_kv_heads, num_blocks, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((splits, num_kv_heads, num_blocks, rows), jnp.float32),
            jax.ShapeDtypeStruct((splits, num_kv_heads, num_blocks, rows), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=compiler_params,
        name=(f"ragged_paged_attention_bq{block_q}_g{group_pad}_ppb{pages_per_block}_s{splits}"
              + ("" if sliding_window is None else f"_w{sliding_window}")),
    )(*scalars, qb, k_pool, v_pool)

    # combine the context splits, normalize, and scatter blocks back to token rows
    m_all = m.max(axis=0)
    w = jnp.exp(m - m_all[None])
    l_all = (w * l).sum(axis=0)
    acc = (w[..., None] * o).sum(axis=0)
    out = acc / jnp.where(l_all > 0, l_all, 1.0)[..., None]      # [KVH, NB, rows, D]
    out = out.reshape(num_kv_heads, num_blocks, block_q, group_pad, head_dim)

    t = jnp.arange(num_tokens, dtype=jnp.int32)
    tseq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], t, side="right"), num_seqs - 1)
    j = t - cu_q_lens[tseq]
    tblk = jnp.clip((block_end - blocks_per_seq)[tseq] + j // block_q, 0, num_blocks - 1)
    res = out[:, tblk, j % block_q]                                # [KVH, T, group_pad, D]
    res = res[:, :, :group].transpose(1, 0, 2, 3).reshape(num_tokens, num_heads, head_dim)
    valid = (t < cu_q_lens[-1])[:, None, None]
    return jnp.where(valid, res, 0.0).astype(q.dtype)


def ragged_paged_attention(q, k_pages, v_pages, page_table, kv_lens, cu_q_lens, *,
                           interpret: bool, sm_scale: float | None = None,
                           sliding_window: int | None = None):
    """Causal attention of ragged query rows over paged context (design.md section 5).

    q [num_tokens, num_q_heads, head_dim]; k_pages, v_pages [num_pages, page_size, num_kv_heads,
    head_dim]; page_table int32 [num_seqs, max_pages_per_seq]; kv_lens int32 [num_seqs] (context
    length including this step's tokens); cu_q_lens int32 [num_seqs + 1]. Query j of sequence s
    sits at position kv_lens[s] - q_len[s] + j. Rows past cu_q_lens[-1] come back as zeros.
    sliding_window: None, or W: a query attends to the positions > its own - W only.
    interpret (required): True runs the Pallas interpreter (any backend), False compiles the
    kernel (Triton; GPU only). Never inferred from the default backend: a program lowered for
    another platform (ahead of time, for a GPU, on a CPU host) must say which it wants, and
    being a static argument it keys JAX's trace cache, so an interpreted trace is never reused.
    """
    if k_pages.ndim != 4:
        raise ValueError("k_pages must be [num_pages, page_size, num_kv_heads, head_dim], "
                         f"got shape {k_pages.shape}")
    return ragged_paged_attention_stacked(q, k_pages[None], v_pages[None], jnp.int32(0),
                                          page_table, kv_lens, cu_q_lens, sm_scale=sm_scale,
                                          interpret=interpret, sliding_window=sliding_window)
