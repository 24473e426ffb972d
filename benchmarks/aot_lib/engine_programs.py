"""The engine's programs for a target, compiled ahead of time: every step program of the default
EngineConfig's program set (layered-load variants included) and the page programs, on
abstract parameters and a KV pool sized as the engine would size it on the card, for one
tensor-parallel degree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from benchmarks.aot_lib.compile import compile_program
from benchmarks.aot_lib.memory_plan import CLIENT_MEM_FRACTION, check_plan, memory_plan
from benchmarks.aot_lib.targets import Target
from benchmarks.program_set import program_set
from pensieve_jax.engine.config import EngineConfig
from pensieve_jax.model import parallel
from pensieve_jax.model.attention import KVCache
from pensieve_jax.model.config import PRESETS, ModelConfig
from pensieve_jax.model.llama import Llama, param_shapes
from pensieve_jax.runner.page_programs import PAGE_CHUNK, jit_page_programs, page_program_args
from pensieve_jax.runner.step_program import (host_memory_kind, jit_step, kernel_interpret,
                                              lower_step, runtime_params)
from pensieve_jax.weights import LoadedModel

MODEL = "random:llama3-8b"      # the default; --model another random: preset
DTYPE = "bfloat16"


def abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


@dataclasses.dataclass(frozen=True)
class Setup:
    """The engine's programs for one target and tensor-parallel degree, abstract."""

    model: Any                # the Llama module (attention "pallas", interpret from devices)
    params: Any               # ShapeDtypeStructs on the devices
    kv: KVCache               # ShapeDtypeStructs on the devices
    param_shardings: Any
    incoming_sharding: Any
    devices: tuple


def setup(config: ModelConfig, loaded: LoadedModel, dtype, devices: list, num_pages: int,
          page_size: int) -> Setup:
    tp = len(devices)
    params = runtime_params(loaded.params, devices[0].platform)   # the layout the runner uses
    shape = (config.num_layers, num_pages, page_size, config.num_kv_heads, config.head_dim)
    interpret = kernel_interpret(devices)
    host_kind = host_memory_kind(devices[0])
    if tp == 1:
        mesh, sharding = None, SingleDeviceSharding(devices[0])
        param_sh = jax.tree.map(lambda _: sharding, params)
        kv_sh = sharding
        incoming = SingleDeviceSharding(devices[0], memory_kind=host_kind)
    else:
        mesh = parallel.make_mesh(tp, devices)
        param_sh = parallel.param_shardings(params, mesh)
        kv_sh = parallel.kv_sharding(mesh)
        incoming = kv_sh.with_memory_kind(host_kind) if host_kind else kv_sh
    pool = jax.ShapeDtypeStruct(shape, dtype, sharding=kv_sh)
    model = Llama(config, dtype, "pallas", mesh, interpret=interpret)
    return Setup(model, abstract(params, param_sh), KVCache(pool, pool),
                 None if mesh is None else param_sh, incoming, tuple(devices))


def engine_programs(target: Target, tp: int, ptxas: str | None, log,
                    model: str = MODEL) -> tuple[list, dict]:
    """Every step and page program of the default engine configuration (layered loads on) for
    a random: preset of a real shape (its sliding window, biases, q/k norm included)."""
    config, dtype = PRESETS[model.removeprefix("random:")], jnp.dtype(DTYPE)
    loaded = LoadedModel(config, param_shapes(config, dtype), None, model)
    engine = EngineConfig(attention="pallas", swap_in="layered", host_cache_bytes=1,
                          tensor_parallel=tp)
    programs = program_set(config, engine)
    max_model_len = programs.pages_per_seq * engine.page_size
    plan = memory_plan(target, loaded, engine, dtype, max_model_len, tp)
    devices = target.devices(tp)
    s = setup(config, loaded, dtype, devices, plan.kv_pages, engine.page_size)
    suffix = "" if tp == 1 else f"_tp{tp}"
    rows = []
    steps = {False: jit_step(s.model, s.param_shardings),
             True: jit_step(s.model, s.param_shardings,
                            None if tp == 1 else s.incoming_sharding)}
    for shape in programs.shapes:
        name = (f"step{suffix} T={shape.tokens} S={shape.seqs} P={shape.pages_per_seq}"
                + (f" incoming={shape.incoming_pages}" if shape.incoming_pages else ""))
        step = steps[bool(shape.incoming_pages)]
        row = compile_program(
            name, f"step{suffix}", target,
            lambda step=step, shape=shape: lower_step(step, s.params, s.kv, shape,
                                                      s.incoming_sharding),
            needs_triton=True, ptxas=ptxas, shape=dataclasses.asdict(shape), tp=tp,
            interpret=s.model.interpret)
        check_plan(row, plan)
        rows.append(log(row))
    pages = jit_page_programs(s.model.mesh)
    for name, fn in pages.items():
        args = page_program_args(name, s.kv)
        row = compile_program(f"page{suffix} {name} x{PAGE_CHUNK}", f"page{suffix}", target,
                              lambda fn=fn, args=args: fn.lower(s.kv, *args),
                              needs_triton=False, ptxas=ptxas, tp=tp)
        check_plan(row, plan)
        rows.append(log(row))
    host_kind = host_memory_kind(devices[0])
    meta = {"tp": tp, "model": model, "dtype": DTYPE, "attention": "pallas",
            "interpret": s.model.interpret, "devices": [str(d) for d in devices],
            "program_set": {"token_buckets": list(programs.token_buckets),
                            "max_num_seqs": programs.max_num_seqs,
                            "pages_per_seq": programs.pages_per_seq,
                            "incoming_pages": programs.incoming_pages,
                            "page_size": engine.page_size},
            "plan": {**dataclasses.asdict(plan), "headroom_bytes": plan.headroom_bytes,
                     "client_mem_fraction": CLIENT_MEM_FRACTION,
                     "kv_cache_fraction": engine.kv_cache_fraction},
            "layered_incoming_memory_kind": host_kind,
            "layered_note": None if host_kind else (
                "the compile-only device reports no memory kinds, so the layered-load "
                "programs stage their incoming pages in device memory (the runner's "
                "pinned_host sharding is dropped): on a GPU they compile with pinned_host")}
    return rows, meta
