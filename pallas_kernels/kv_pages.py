"""Moving KV rows and pages: writes of a step's new rows, and whole-page copies for swapping.

Both are XLA scatters/gathers, in place when the destination is donated: a page-granular copy
is a handful of large contiguous moves, which XLA already does at memory speed, so a Pallas
kernel would add nothing. Each has a plain reference used by the tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, donate_argnums=(0,))
def write_kv_rows(pages, rows, page_ids, offsets):
    """pages [num_pages, page_size, kv_heads, head_dim] (donated); rows [T, kv_heads, head_dim]
    go to (page_ids[T], offsets[T]); a page id >= num_pages drops the row (bucket padding)."""
    return pages.at[page_ids, offsets].set(rows.astype(pages.dtype), mode="drop")


def write_kv_rows_reference(pages, rows, page_ids, offsets):
    out = jnp.array(pages)
    for t in range(rows.shape[0]):
        if int(page_ids[t]) < pages.shape[0]:
            out = out.at[int(page_ids[t]), int(offsets[t])].set(rows[t].astype(pages.dtype))
    return out


@functools.partial(jax.jit, donate_argnums=(0,))
def copy_pages(dst, src, src_ids, dst_ids):
    """dst[..., dst_ids[i], ...] = src[..., src_ids[i], ...] along the page axis (axis -4), for
    pools [num_pages, ...] or stacked [layers, num_pages, ...]; dst is donated. Ids >= the
    destination's page count are dropped (padding)."""
    axis = dst.ndim - 4
    moved = jnp.take(src, src_ids, axis=axis, mode="clip")
    index = (slice(None),) * axis + (dst_ids,)
    return dst.at[index].set(moved.astype(dst.dtype), mode="drop")


def copy_pages_reference(dst, src, src_ids, dst_ids):
    out = jnp.array(dst)
    axis = dst.ndim - 4
    for s, d in zip(src_ids.tolist(), dst_ids.tolist()):
        if d < dst.shape[axis]:
            index = (slice(None),) * axis + (d,)
            out = out.at[index].set(src[(slice(None),) * axis + (s,)].astype(dst.dtype))
    return out
