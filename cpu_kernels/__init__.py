"""CPU kernels: C++ XLA FFI custom calls for what XLA's CPU backend runs slowly, each with a
jitted wrapper that validates shapes and a pure-jnp reference beside it (the CPU counterpart
of pallas_kernels/). `native` builds and registers them; without a compiler they are off and
callers use plain XLA."""

from cpu_kernels.decode_attention import (DECODE_ATTENTION, paged_decode_attention,
                                          paged_decode_attention_reference)
from cpu_kernels.native import load, status

__all__ = ["DECODE_ATTENTION", "load", "paged_decode_attention",
           "paged_decode_attention_reference", "status"]
