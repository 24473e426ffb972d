"""Pallas GPU kernels, each with a pure-jnp reference beside it (interpret mode on CPU)."""

from pallas_kernels.attention_reference import ragged_paged_attention_reference
from pallas_kernels.kv_pages import (copy_pages, copy_pages_reference, write_kv_rows,
                                     write_kv_rows_reference)
from pallas_kernels.ragged_paged_attention import (ragged_paged_attention,
                                                   ragged_paged_attention_stacked)

__all__ = ["copy_pages", "copy_pages_reference", "ragged_paged_attention",
           "ragged_paged_attention_reference", "ragged_paged_attention_stacked", "write_kv_rows",
           "write_kv_rows_reference"]
