"""What the engine would allocate on the card (the client's memory limit, the weights, the KV
pool it would size) and whether a compiled program's buffers fit it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from benchmarks.aot_lib.targets import Target
from pensieve_jax.engine.config import EngineConfig, page_bytes, pool_pages
from pensieve_jax.weights import LoadedModel

# JAX's GPU client takes this fraction of device memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION)
CLIENT_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per device: the client's memory limit, the weights, the KV pool the engine would size
    (kv_cache_fraction of what the weights leave), and what is left for a step's temporaries."""

    limit_bytes: int
    weight_bytes: int
    kv_pages: int
    kv_bytes: int

    @property
    def headroom_bytes(self) -> int:
        return self.limit_bytes - self.weight_bytes - self.kv_bytes


def param_bytes(params) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))


def memory_plan(target: Target, model: LoadedModel, engine: EngineConfig, dtype,
                max_model_len: int, tp: int) -> MemoryPlan:
    """As Engine sizes its pool (engine_config.pool_pages) on a device with JAX's default
    memory fraction, after the weights (split over tp devices) are in."""
    limit = int(target.memory_bytes * CLIENT_MEM_FRACTION)
    weights = param_bytes(model.params) // tp
    budget = int((limit - weights) * engine.kv_cache_fraction)
    config = dataclasses.replace(engine, kv_cache_bytes=budget, tensor_parallel=tp)
    pages = pool_pages(model, config, dtype, max_model_len)
    return MemoryPlan(limit, weights, pages, pages * page_bytes(model, config, dtype) // tp)


def check_plan(row: dict[str, Any], plan: MemoryPlan) -> None:
    """within_plan: the program's buffers (arguments + outputs not aliased to an argument +
    temporaries) fit the device's limit."""
    mem = row.get("memory")
    if not mem:
        return
    peak = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    row["peak_bytes"] = peak
    row["within_plan"] = peak <= plan.limit_bytes and mem["temp"] <= plan.headroom_bytes
