"""The device buffers an engine owns, freed when it closes (Engine.close)."""

from __future__ import annotations

import jax

__all__ = ["free_buffers"]


def free_buffers(runner, params, owns_weights: bool) -> None:
    """(after the engine thread ended) Free the KV pools and the weights an engine owns: copies
    its runner made (tensor parallel), and the loaded ones if owns_weights (from_pretrained
    loaded them and no open engine shares them)."""
    shared = {id(a) for a in jax.tree_util.tree_leaves(params)}
    owned = jax.tree_util.tree_leaves(runner.kv) + [
        a for a in jax.tree_util.tree_leaves(runner.params) if id(a) not in shared]
    if owns_weights:
        owned += jax.tree_util.tree_leaves(params)
    runner.kv = runner.params = None
    for a in owned:
        if isinstance(a, jax.Array) and not a.is_deleted():
            a.delete()
