"""The decode rows of a step by the CPU kernel (cpu_kernels/decode_attention.cc): each
sequence's last row over the pages it holds, straight from the stacked pools. The XLA path
(`xla_paged_attention(..., cpu_kernels=True)`) uses it for those rows on a CPU; prefill rows
stay in XLA."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cpu_kernels import paged_decode_attention
from pensieve_jax.model.kv_layout import AttentionBatch, KVCache
from pensieve_jax.model.parallel import shard_heads


def cpu_decode_rows(q_last: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch,
                    kv_lens: jax.Array, *, sm_scale: float, sliding_window: int | None,
                    mesh: Any = None) -> jax.Array:
    """q_last [S, H, D] (sequence s's row at position kv_lens[s] - 1; kv_lens 0: no row, out
    0) -> float32 [S, H, D]. Under a mesh, per shard of heads."""
    def kernel(q, k_pool, v_pool, layer, page_table, lens):
        return paged_decode_attention(q.astype(jnp.float32), k_pool, v_pool, layer, page_table,
                                      lens, sm_scale=sm_scale, sliding_window=sliding_window)
    return shard_heads(kernel, mesh, 3)(q_last, kv.k, kv.v, layer, batch.page_table, kv_lens)
