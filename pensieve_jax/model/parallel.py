"""Tensor parallelism over local (or, with jax.distributed, global) devices with jax.sharding.

One mesh axis, "tp". Weights are sharded Megatron-style, the KV pools by KV head; everything a
step takes from the host (token ids, page tables, sampling rows) is replicated. The step is one
jit with NamedSharding in/out shardings: XLA inserts the collectives (an all-reduce after o_proj
and after down_proj, an all-gather of the vocab-sharded logits before sampling).

    q/k/v_proj, gate/up_proj  [layers, in, out]        columns (heads / intermediate) sharded
    o_proj, down_proj         [layers, in, out]        rows sharded
    lm_head                   [hidden, vocab]          vocab sharded (when tp divides vocab)
    q/k/v_proj biases         [layers, out]            sharded as their columns
    o_proj bias, embed_tokens, norms (q/k_norm too)    replicated
    KV pools                  [layers, pages, page_size, kv_heads, head_dim]   kv_heads sharded

Query head h uses KV head h // (num_heads // num_kv_heads), so contiguous blocks of query heads
and of KV heads land on the same device and attention needs no communication.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pensieve_jax.model.config import ModelConfig

AXIS = "tp"

_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW = ("o_proj", "down_proj")

KV_SPEC = P(None, None, None, AXIS, None)      # [layers, pages, page_size, kv_heads, head_dim]
HEADS_SPEC = P(None, AXIS, None)               # [tokens, heads, head_dim]
VOCAB_SPEC = P(None, AXIS)                     # logits [rows, vocab]


def check_tensor_parallel(config: ModelConfig, tp: int, num_devices: int | None = None) -> None:
    """ValueError unless `tp` devices can split the model's heads and exist."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tensor_parallel must be an integer >= 1, got {tp!r}")
    num_devices = len(jax.devices()) if num_devices is None else num_devices
    if tp > num_devices:
        raise ValueError(f"tensor_parallel={tp} exceeds the {num_devices} available "
                         f"{jax.default_backend()} device(s)")
    for name in ("num_heads", "num_kv_heads"):
        if getattr(config, name) % tp:
            raise ValueError(f"tensor_parallel={tp} must divide {name} "
                             f"({getattr(config, name)}) of {config.name}")


def make_mesh(tp: int, devices=None) -> Mesh:
    """A 1-D mesh ("tp",) over the first `tp` devices (jax.devices(): global in multi-host)."""
    devices = list(jax.devices() if devices is None else devices)[:tp]
    if len(devices) < tp:
        raise ValueError(f"tensor_parallel={tp} exceeds the {len(devices)} available device(s)")
    return Mesh(np.asarray(devices), (AXIS,))


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], tp: int) -> P:
    """PartitionSpec of one parameter leaf, by its path in the tree (names as in model.py)."""
    names = [n for n in path if n != "params"]
    module = names[-2] if len(names) >= 2 else ""
    spec: list[Any] = [None] * len(shape)
    if module in _COLUMN:
        spec[-1] = AXIS              # kernel columns, and a bias along them
    elif module in _ROW and names[-1] == "kernel":
        spec[-2] = AXIS              # (a row-parallel bias is added once: replicated)
    elif module == "lm_head":
        spec[-1] = AXIS
    if any(s == AXIS and shape[i] % tp for i, s in enumerate(spec)):
        spec = [None] * len(shape)              # an axis tp does not divide stays replicated
    return P(*spec)


def path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """NamedSharding for every leaf of a parameter tree (arrays or ShapeDtypeStructs)."""
    tp = mesh.shape[AXIS]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(path_names(path), x.shape, tp)), params)


def kv_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, KV_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(x: Any, sharding: Any) -> Any:
    """Place a tree on shardings. Single process: device_put. Multi-process: every process holds
    the same full host value and hands each of its devices its slice."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.tree_util.tree_map(
        lambda a, s: jax.make_array_from_callback(np.shape(a), s, lambda idx: np.asarray(a[idx])),
        x, sharding)


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated (or single-device) array as NumPy, from this process's first shard."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(x.addressable_shards[0].data)


def constrain(x: jax.Array, mesh: Mesh | None, spec: P) -> jax.Array:
    """with_sharding_constraint on the mesh; the identity without one (tensor_parallel 1) or
    when the mesh does not divide a dimension the spec shards."""
    if mesh is None or any(s == AXIS and x.shape[i] % mesh.shape[AXIS]
                           for i, s in enumerate(spec)):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shard_heads(fn, mesh: Mesh | None, num_replicated: int):
    """Run fn(q, k_pool, v_pool, *replicated_args) per shard: q [T, heads, D] and the pools
    split by head over the mesh, the other args replicated; the output is split like q. Without
    a mesh, fn itself."""
    if mesh is None:
        return fn
    return jax.shard_map(fn, mesh=mesh,
                         in_specs=(HEADS_SPEC, KV_SPEC, KV_SPEC) + (P(),) * num_replicated,
                         out_specs=HEADS_SPEC, check_vma=False)
