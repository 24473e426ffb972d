"""The ragged paged attention kernel's plain-jnp reference (what its tests compare against)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ragged_paged_attention_reference(q, k_pages, v_pages, page_table, kv_lens, cu_q_lens, *,
                                     sm_scale: float | None = None, interpret=None,
                                     sliding_window: int | None = None):
    """Plain jnp: each token gathers its sequence's whole context and attends causally (with a
    sliding window W, to the positions > its own - W only)."""
    del interpret
    num_tokens, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    num_seqs, pages_per_seq = page_table.shape
    sm_scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    t = jnp.arange(num_tokens)
    seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], t, side="right"), num_seqs - 1)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (t - cu_q_lens[seq])
    ctx = pages_per_seq * page_size
    k = k_pages[page_table].reshape(num_seqs, ctx, num_kv_heads, head_dim)[seq]
    v = v_pages[page_table].reshape(num_seqs, ctx, num_kv_heads, head_dim)[seq]
    group = num_heads // num_kv_heads
    k = jnp.repeat(k, group, axis=2).astype(jnp.float32)
    v = jnp.repeat(v, group, axis=2).astype(jnp.float32)
    s = jnp.einsum("thd,tchd->thc", q.astype(jnp.float32), k) * sm_scale
    k_pos = jnp.arange(ctx)
    mask = (k_pos[None, :] <= pos[:, None]) & (k_pos[None, :] < kv_lens[seq][:, None])
    if sliding_window is not None:
        mask &= k_pos[None, :] > pos[:, None] - sliding_window
    s = jnp.where(mask[:, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask[:, None, :], p, 0.0)
    out = jnp.einsum("thc,tchd->thd", p, v)
    valid = (t < cu_q_lens[-1])[:, None, None]
    return jnp.where(valid & jnp.isfinite(out), out, 0.0).astype(q.dtype)
