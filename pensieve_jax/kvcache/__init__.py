"""The KV cache layer: the page ledger, prefix index, eviction, the host tier, swaps,
restores and KV transfer between engines."""
