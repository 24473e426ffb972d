"""Paged attention of each sequence's last row on the CPU (decode_attention.cc), in the order
of pallas_kernels/: the wrapper validating shapes, then the reference.

    paged_decode_attention(q [S, H, D], k_pool, v_pool [L, P, PS, K, D], layer [],
                           page_table [S, W], kv_lens [S], *, sm_scale, sliding_window)
        -> [S, H, D] float32

Row s is at position kv_lens[s] - 1 and attends to its sequence's keys [0, kv_lens[s]) (with a
sliding window W, only those > its position - W), read page by page through page_table. A
sequence with no keys gets 0. The kernel splits long contexts into blocks of 128 keys (flash
decoding) spread over XLA's CPU thread pool, so its cost follows the keys each row needs.
Float32 only: callers with other dtypes use plain XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DECODE_ATTENTION = "pensieve_decode_attention"   # the FFI target (cpu_kernels.native)
MASK_VALUE = -1e30


def paged_decode_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                           layer: jax.Array, page_table: jax.Array, kv_lens: jax.Array, *,
                           sm_scale: float, sliding_window: int | None = None) -> jax.Array:
    """The kernel (call cpu_kernels.load() first; CPU only). Shapes in the module doc."""
    if q.ndim != 3 or k_pool.ndim != 5 or page_table.ndim != 2 or kv_lens.ndim != 1:
        raise ValueError(f"q [S, H, D], pools [L, P, PS, K, D], page_table [S, W], kv_lens "
                         f"[S] expected; got {q.shape}, {k_pool.shape}, {page_table.shape}, "
                         f"{kv_lens.shape}")
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[3]
    if (k_pool.shape != v_pool.shape or k_pool.shape[4] != head_dim
            or num_heads % num_kv_heads or num_heads > 64
            or page_table.shape[0] != num_seqs or kv_lens.shape[0] != num_seqs):
        raise ValueError(f"shapes do not agree: q {q.shape}, k_pool {k_pool.shape}, v_pool "
                         f"{v_pool.shape}, page_table {page_table.shape}, kv_lens "
                         f"{kv_lens.shape} (at most 64 query heads)")
    if not all(a.dtype == jnp.float32 for a in (q, k_pool, v_pool)):
        raise ValueError(f"float32 q and pools expected, got {q.dtype}, {k_pool.dtype}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(DECODE_ATTENTION, out)(
        q, k_pool, v_pool, jnp.asarray(layer, jnp.int32), page_table.astype(jnp.int32),
        kv_lens.astype(jnp.int32), sm_scale=np.float32(sm_scale),
        window=np.int64(sliding_window or 0))


def paged_decode_attention_reference(q, k_pool, v_pool, layer, page_table, kv_lens, *,
                                     sm_scale: float, sliding_window: int | None = None):
    """Dense jnp: every page of the table gathered, keys past kv_len (or outside the window)
    masked. Page ids outside the pool contribute no keys, as in the kernel."""
    num_seqs, num_heads, head_dim = q.shape
    _, num_pages, page_size, num_kv_heads, _ = k_pool.shape
    group = num_heads // num_kv_heads
    width = page_table.shape[1]
    valid_page = (page_table >= 0) & (page_table < num_pages)                     # [S, W]
    pages = jnp.clip(page_table, 0, num_pages - 1)
    k = k_pool[layer][pages].reshape(num_seqs, width * page_size, num_kv_heads, head_dim)
    v = v_pool[layer][pages].reshape(num_seqs, width * page_size, num_kv_heads, head_dim)
    pos = jnp.arange(width * page_size)
    n = jnp.clip(kv_lens, 0, width * page_size)[:, None]
    mask = (pos < n) & jnp.repeat(valid_page, page_size, axis=1)                  # [S, C]
    if sliding_window is not None:
        mask &= pos > n - 1 - sliding_window
    qg = q.reshape(num_seqs, num_kv_heads, group, head_dim).astype(jnp.float32)
    s = jnp.einsum("skgd,sckd->skgc", qg, k.astype(jnp.float32),
                   precision="highest") * sm_scale
    s = jnp.where(mask[:, None, None], s, MASK_VALUE)
    p = jnp.where(mask[:, None, None], jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
    l = p.sum(-1, keepdims=True)
    o = jnp.einsum("skgc,sckd->skgd", p, v.astype(jnp.float32), precision="highest")
    return (o / jnp.where(l > 0, l, 1.0)).reshape(num_seqs, num_heads, head_dim)
