"""The KV pools and the page programs over them: copies between device pages, and between the
device and host memory (the host tier, swaps, KV export and import), in fixed chunks of
PAGE_CHUNK pages, one small program each (gather, copy, scatter), compiled ahead of time.

The pools are donated into every program that writes them (steps, copies, scatters) and read
by the others (gathers): each takes the pools the one before returned, so the device runs them
in the order they are dispatched. `Pools` holds the current ones for the runner and the page
copies alike.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.kv_pages import copy_pages
from pensieve_jax.model import parallel
from pensieve_jax.model.attention import KVCache, init_kv_cache
from pensieve_jax.model.config import ModelConfig

PAGE_CHUNK = 32   # pages per call of the page gather / scatter / copy programs


def _chunks(n: int) -> list[slice]:
    return [slice(i, min(i + PAGE_CHUNK, n)) for i in range(0, n, PAGE_CHUNK)]


def _gather_pages(kv: KVCache, ids: jax.Array) -> KVCache:
    return KVCache(jnp.take(kv.k, ids, axis=1), jnp.take(kv.v, ids, axis=1))


def _copy_pages(kv: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    return KVCache(copy_pages(kv.k, kv.k, src, dst), copy_pages(kv.v, kv.v, src, dst))


def _scatter_pages(kv: KVCache, k: jax.Array, v: jax.Array, ids: jax.Array) -> KVCache:
    rows = jnp.arange(ids.shape[0])
    return KVCache(copy_pages(kv.k, k, rows, ids), copy_pages(kv.v, v, rows, ids))


def jit_page_programs(mesh=None) -> dict[str, Any]:
    """The jitted page programs: "gather", "copy", "scatter" of PAGE_CHUNK pages (pools
    donated to copy and scatter; under a mesh the pools keep their KV-head sharding)."""
    kw: dict[str, Any] = {}
    if mesh is not None:
        kv_sh = parallel.kv_sharding(mesh)
        kw = dict(out_shardings=KVCache(kv_sh, kv_sh))
    return {"gather": jax.jit(_gather_pages, **kw),
            "copy": jax.jit(_copy_pages, donate_argnums=(0,), **kw),
            "scatter": jax.jit(_scatter_pages, donate_argnums=(0,), **kw)}


def page_program_args(name: str, kv: KVCache) -> tuple:
    """Abstract arguments after the pools of page program `name` (chunks sharded like kv)."""
    ids = jax.ShapeDtypeStruct((PAGE_CHUNK,), jnp.int32)
    chunk = jax.ShapeDtypeStruct((kv.k.shape[0], PAGE_CHUNK) + kv.k.shape[2:], kv.k.dtype,
                                 sharding=kv.k.sharding)
    return {"gather": (ids,), "copy": (ids, ids), "scatter": (chunk, chunk, ids)}[name]


def pages_to_host(chunks: list[tuple[jax.Array, jax.Array]], n: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Gathered page chunks (gather_pages; at least one) as host arrays k, v [layers, n, ...]."""
    k = np.concatenate([np.asarray(c[0]) for c in chunks], axis=1)[:, :n]
    v = np.concatenate([np.asarray(c[1]) for c in chunks], axis=1)[:, :n]
    return k, v


class Pools:
    """The KV pools of every layer, k and v [layers, num_pages, page_size, kv_heads, head_dim]
    (`kv`: replaced by each program that writes them), on one device or sharded by KV head
    over a mesh."""

    def __init__(self, config: ModelConfig, num_pages: int, page_size: int, dtype, mesh=None):
        self.config, self.num_pages, self.page_size = config, num_pages, page_size
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh
        self.kv_sharding = None if mesh is None else parallel.kv_sharding(mesh)
        shape = (config.num_layers, num_pages, page_size, config.num_kv_heads, config.head_dim)
        sharding = {} if mesh is None else dict(
            out_shardings=KVCache(self.kv_sharding, self.kv_sharding))
        # one program, compiled before the engine is ready
        self._init = jax.jit(lambda: init_kv_cache(*shape, self.dtype), **sharding)
        self.kv: KVCache | None = None
        self.reset()

    def reset(self) -> None:
        """Fresh zeroed pools (after a failed step donated the old ones)."""
        self.kv = self._init()

    def replicate(self, tree):
        """Host arrays as a program's replicated inputs (as they are without a mesh)."""
        return tree if self.mesh is None else parallel.put(tree, parallel.replicated(self.mesh))

    @property
    def page_shape(self) -> tuple[int, ...]:
        """One page of one layer: (page_size, kv_heads, head_dim)."""
        return self.kv.k.shape[2:]


class PageCopies:
    """Copies of pages: device -> device, device -> host, host -> device (staged first, so
    the copy overlaps a step). `programs` holds the three compiled page programs, shared by
    every runner of the same pools' shapes in the process; once `ready`, a page program that
    still has to compile is recorded in `late` (a bug: precompile compiles them)."""

    def __init__(self, pools: Pools, mesh_ids: tuple[int, ...] | None,
                 programs: dict[tuple, Any]):
        self.pools = pools
        self.ready = False
        self.late: list[str] = []
        self._mesh_ids = mesh_ids
        self._programs = programs
        self._jitted = jit_page_programs(pools.mesh)

    def compile_all(self) -> None:
        """Compile (or find) the three page programs, and run each once on padding (every id
        out of range or a no-op)."""
        k, v = self.gather([0])[0]
        self.scatter_staged([(k, v)], [-1])
        self.copy([(0, 0)])
        jax.block_until_ready(self.pools.kv)

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Device page -> device page copies (src, dst); all sources are read before any write."""
        # chunks run one after another, so a later chunk must not read a page an earlier one
        # wrote: copy through the gather (read all) and scatter (write all) programs then
        written = {d for _, d in pairs}
        if len(pairs) > PAGE_CHUNK and written & {s for s, _ in pairs}:
            k, v = self.gather_host([s for s, _ in pairs])
            self.scatter(k, v, [d for _, d in pairs])
            return
        pools = self.pools
        for part in _chunks(len(pairs)):
            src = np.zeros(PAGE_CHUNK, np.int32)
            dst = np.full(PAGE_CHUNK, pools.num_pages, np.int32)          # padding is dropped
            src[:part.stop - part.start], dst[:part.stop - part.start] = zip(*pairs[part])
            pools.kv = self._program("copy")(pools.kv, *pools.replicate((src, dst)))

    def gather(self, page_ids: list[int]) -> list[tuple[jax.Array, jax.Array]]:
        """Copies of device pages, as chunks (k, v) [layers, PAGE_CHUNK, page_size, kv_heads,
        head_dim] in order (the last one padded)."""
        out = []
        for part in _chunks(len(page_ids)):
            ids = np.zeros(PAGE_CHUNK, np.int32)
            ids[:part.stop - part.start] = page_ids[part]
            out.append(tuple(self._program("gather")(self.pools.kv, self.pools.replicate(ids))))
        return out

    def gather_host(self, page_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Device pages as host arrays k, v [layers, n, page_size, kv_heads, head_dim]."""
        if not page_ids:
            pools = self.pools
            empty = np.zeros((pools.config.num_layers, 0) + pools.page_shape, pools.dtype)
            return empty, empty.copy()
        return pages_to_host(self.gather(page_ids), len(page_ids))

    def scatter(self, k: np.ndarray, v: np.ndarray, page_ids: list[int]) -> None:
        """Write pages k, v [layers, n, ...] (host arrays) into device pages page_ids."""
        self.scatter_staged(self.stage(k, v), page_ids)

    def stage(self, k: np.ndarray, v: np.ndarray) -> list[tuple[jax.Array, jax.Array]]:
        """Start copying host pages k, v [layers, n, ...] to the device (asynchronous), in
        chunks of PAGE_CHUNK pages. The copy overlaps whatever runs until `scatter_staged`."""
        # with a mesh each device gets its heads' slice
        return [put_pages(k[:, part], v[:, part], PAGE_CHUNK, self.pools.kv_sharding)
                for part in _chunks(k.shape[1])]

    def scatter_staged(self, staged: list[tuple[jax.Array, jax.Array]],
                       page_ids: list[int]) -> None:
        """Write staged pages into device pages page_ids (-1: skip that page)."""
        pools = self.pools
        for chunk, part in zip(staged, _chunks(len(page_ids))):
            ids = np.full(PAGE_CHUNK, pools.num_pages, np.int32)   # padding rows are dropped
            ids[:part.stop - part.start] = [p if p >= 0 else pools.num_pages
                                            for p in page_ids[part]]
            pools.kv = self._program("scatter")(pools.kv, *chunk, pools.replicate(ids))

    def _program(self, name: str):
        """The compiled gather / copy / scatter of PAGE_CHUNK pages (ahead of time, as the
        steps: a jit call would compile again for pools that a step program returned)."""
        pools = self.pools
        key = (name, pools.config, pools.dtype.name, pools.num_pages, pools.page_size,
               self._mesh_ids)
        executable = self._programs.get(key)
        if executable is None:
            if self.ready:
                self.late.append(name)
            args = page_program_args(name, pools.kv)
            executable = self._jitted[name].lower(pools.kv, *args).compile()
            self._programs[key] = executable
        return executable


def put_pages(k: np.ndarray, v: np.ndarray, n: int, sharding) -> tuple[jax.Array, jax.Array]:
    """Host pages k, v [layers, <= n, ...] padded to n pages, put on sharding (None: the
    default device)."""
    pad = ((0, 0), (0, n - k.shape[1])) + ((0, 0),) * (k.ndim - 2)
    return parallel.put(np.pad(k, pad), sharding), parallel.put(np.pad(v, pad), sharding)
