"""Model runner: pads a step to shape buckets, runs the compiled step, returns sampled tokens.

The host plans, the device computes: a step arrives as small NumPy arrays, is padded to
power-of-two buckets (tokens, sequences, pages per sequence, the XLA attention's query tiles;
the longest query run is 1 for a decode-only step, else the token bucket), and each bucket is
compiled once (ahead of time, on first use). The KV pools are donated into every step, so
they are updated in place. One device-to-host copy per step: the sampled token ids.

With tensor_parallel > 1 the params and pools live on a mesh (pensieve_jax.parallel): the step
is jitted with NamedSharding in/out shardings, step inputs are replicated, and page gathers /
scatters for the host tier keep every device's KV heads on that device.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.kv_pages import copy_pages
from pensieve_jax import parallel
from pensieve_jax.attention import (AttentionBatch, Incoming, KVCache, init_kv_cache,
                                    q_blocks_needed)
from pensieve_jax.model import Llama
from pensieve_jax.sampling import sample
from pensieve_jax.weights import LoadedModel


class StepInput(NamedTuple):
    """One step, unpadded. T = total new tokens, S = sequences, P = pages of the longest one."""

    token_ids: np.ndarray    # int32 [T]
    positions: np.ndarray    # int32 [T]
    page_table: np.ndarray   # int32 [S, P] (P: pages up to the longest kv_len)
    kv_lens: np.ndarray      # int32 [S]
    cu_q_lens: np.ndarray    # int32 [S + 1]
    temperature: np.ndarray  # float32 [S]
    top_k: np.ndarray        # int32 [S]
    top_p: np.ndarray        # float32 [S]
    seeds: np.ndarray        # uint32 [S]
    counters: np.ndarray     # int32 [S], index of the token each row samples


class HostPages(NamedTuple):
    """Pages in host memory bound for device pages."""

    k: np.ndarray            # [layers, n, page_size, kv_heads, head_dim]
    v: np.ndarray            # [layers, n, page_size, kv_heads, head_dim]
    page_ids: list[int]      # [n] device pages


@dataclasses.dataclass(frozen=True)
class Buckets:
    min_tokens: int = 8
    min_seqs: int = 1
    min_pages: int = 4


def bucket(n: int, minimum: int) -> int:
    size = max(minimum, 1)
    while size < n:
        size *= 2
    return size


def _pad(a: np.ndarray, shape: tuple[int, ...], fill=0) -> np.ndarray:
    out = np.full(shape, fill, dtype=a.dtype)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


_EXECUTABLES: dict[tuple, Any] = {}


class ModelRunner:
    def __init__(self, model: LoadedModel, num_pages: int, page_size: int, attention: str = "xla",
                 dtype=jnp.float32, buckets: Buckets = Buckets(), tensor_parallel: int = 1):
        c = model.config
        parallel.check_tensor_parallel(c, tensor_parallel)
        self.config = c
        self.page_size = page_size
        self.buckets = buckets
        self.dtype = jnp.dtype(dtype)
        self.num_pages = num_pages
        self.tensor_parallel = tensor_parallel
        self.mesh = parallel.make_mesh(tensor_parallel) if tensor_parallel > 1 else None
        pages_kw: dict[str, Any] = {}
        # where swap-ins wait for a step that loads them layer by layer: pinned host memory
        # (the device copies it asynchronously) where the backend has it, else device memory
        kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
        host_kind = "pinned_host" if "pinned_host" in kinds else None
        if self.mesh is None:
            self.params = model.params
            self._incoming_sharding = jax.sharding.SingleDeviceSharding(
                jax.devices()[0], memory_kind=host_kind)
        else:
            rep, kv_sh = parallel.replicated(self.mesh), parallel.kv_sharding(self.mesh)
            param_sh = parallel.param_shardings(model.params, self.mesh)
            self.params = parallel.put(model.params, param_sh)
            kv2 = KVCache(kv_sh, kv_sh)
            pages_kw = dict(out_shardings=kv2)
            self._kv_sharding = kv_sh
            self._incoming_sharding = kv_sh.with_memory_kind(host_kind) if host_kind else kv_sh
            in_sh = (param_sh, kv2) + (rep,) * 9
            host_sh = Incoming(self._incoming_sharding, self._incoming_sharding, rep)
        self.in_step_load_error: str | None = None   # why `step` cannot load pages inside
        self.reset_kv()
        self._model = Llama(c, self.dtype, attention, self.mesh)
        self._compiled: dict[tuple[int, ...], Any] = {}
        # two programs: plain steps, and steps that also load swapped-in pages layer by layer
        self._step, self._step_loading = (
            jax.jit(self._step_impl, static_argnums=(11, 12), donate_argnums=(1,),
                    **({} if self.mesh is None else
                       dict(in_shardings=in_sh + extra, out_shardings=(rep, kv2))))
            for extra in ((), (host_sh,) if self.mesh else ()))
        self._gather = jax.jit(lambda kv, ids: KVCache(jnp.take(kv.k, ids, axis=1),
                                                       jnp.take(kv.v, ids, axis=1)), **pages_kw)
        self._copy = jax.jit(lambda kv, src, dst: KVCache(
            copy_pages(kv.k, kv.k, src, dst), copy_pages(kv.v, kv.v, src, dst)),
            donate_argnums=(0,), **pages_kw)
        self._scatter = jax.jit(lambda kv, k, v, ids: KVCache(
            copy_pages(kv.k, k, jnp.arange(ids.shape[0]), ids),
            copy_pages(kv.v, v, jnp.arange(ids.shape[0]), ids)), donate_argnums=(0,), **pages_kw)

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        """Device page -> device page copies (src, dst); all sources are read before any write."""
        n = bucket(len(pairs), 8)
        src = np.zeros(n, np.int32)
        dst = np.full(n, self.num_pages, np.int32)          # padding rows are dropped
        src[:len(pairs)], dst[:len(pairs)] = zip(*pairs)
        self.kv = self._copy(self.kv, *self._replicate((src, dst)))

    def gather_pages(self, page_ids: list[int]) -> tuple[jax.Array, jax.Array]:
        """Copies of device pages [layers, n_bucket, page_size, kv_heads, head_dim] (the first
        len(page_ids) are the pages asked for; the rest is padding)."""
        ids = np.zeros(bucket(len(page_ids), 8), np.int32)
        ids[:len(page_ids)] = page_ids
        return tuple(self._gather(self.kv, self._replicate(ids)))

    def scatter_pages(self, k: np.ndarray, v: np.ndarray, page_ids: list[int]) -> None:
        """Write pages k, v [layers, n, ...] (host arrays) into device pages page_ids."""
        self.scatter_staged(self.stage_pages(k, v), page_ids)

    def stage_pages(self, k: np.ndarray, v: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """Start copying host pages k, v [layers, n, ...] to the device (asynchronous; padded
        to a bucket of pages). The copy overlaps whatever runs until `scatter_staged`."""
        # with a mesh each device gets its heads' slice
        return self._put_pages(k, v, None if self.mesh is None else self._kv_sharding)

    def _put_pages(self, k: np.ndarray, v: np.ndarray, sharding) -> tuple[jax.Array, jax.Array]:
        """Host pages k, v [layers, n, ...] padded to a bucket of pages, put on sharding (None:
        the default device)."""
        pad = ((0, 0), (0, bucket(k.shape[1], 8) - k.shape[1])) + ((0, 0),) * (k.ndim - 2)
        return parallel.put(np.pad(k, pad), sharding), parallel.put(np.pad(v, pad), sharding)

    def scatter_staged(self, staged: tuple[jax.Array, jax.Array], page_ids: list[int]) -> None:
        """Write staged pages into device pages page_ids (-1: skip that page)."""
        ids = np.full(staged[0].shape[1], self.num_pages, np.int32)   # padding rows are dropped
        ids[:len(page_ids)] = [p if p >= 0 else self.num_pages for p in page_ids]
        self.kv = self._scatter(self.kv, *staged, self._replicate(ids))

    def reset_kv(self) -> None:
        c = self.config
        shape = (c.num_layers, self.num_pages, self.page_size, c.num_kv_heads, c.head_dim)
        if self.mesh is None:
            self.kv = init_kv_cache(*shape, self.dtype)
        else:   # allocated in place, each device only its own heads
            self.kv = jax.jit(lambda: init_kv_cache(*shape, self.dtype),
                              out_shardings=KVCache(self._kv_sharding, self._kv_sharding))()

    def _replicate(self, tree):
        return tree if self.mesh is None else parallel.put(tree, parallel.replicated(self.mesh))

    @property
    def num_compilations(self) -> int:
        return len(self._compiled)

    def _step_impl(self, params, kv, token_ids, positions, batch, logits_indices, temperature, top_k,
                   top_p, seeds, counters, max_q_len, num_q_blocks, incoming=None):
        logits, kv = self._model.apply(params, token_ids, positions, kv, batch, logits_indices,
                                       max_q_len, num_q_blocks, incoming)
        logits = parallel.constrain(logits, self.mesh, parallel.P())   # vocab-sharded -> whole
        return sample(logits, temperature, top_k, top_p, seeds, counters), kv

    def step(self, s: StepInput, incoming: HostPages | None = None) -> np.ndarray:
        """Run one step; returns the sampled token of each sequence, int32 [S]. incoming: host
        pages to write into device pages during the step, layer by layer, each before that
        layer reads the pools (the step's rows may read them). Where the backend cannot
        compile that (in_step_load_error says why), they are written before the step."""
        num_seqs = len(s.kv_lens)
        q_lens = np.diff(s.cu_q_lens)
        t = bucket(len(s.token_ids), self.buckets.min_tokens)
        n = bucket(num_seqs, self.buckets.min_seqs)
        p = bucket(s.page_table.shape[1], self.buckets.min_pages)
        q = 1 if q_lens.max(initial=1) <= 1 else t   # decode-only, or room for any prefill
        # the XLA attention's query tiles for prefill rows (the Pallas kernel needs no bound)
        blocks = q_blocks_needed(q_lens) if self._model.attention == "xla" else 0
        b = bucket(blocks, 1) if blocks else 0
        cu = np.concatenate([s.cu_q_lens, np.full(n - num_seqs, s.cu_q_lens[-1])]).astype(np.int32)
        args = (
            _pad(s.token_ids.astype(np.int32), (t,)),
            _pad(s.positions.astype(np.int32), (t,)),
            AttentionBatch(_pad(s.page_table.astype(np.int32), (n, p)),
                           _pad(s.kv_lens.astype(np.int32), (n,)), cu),
            np.maximum(cu[1:] - 1, 0).astype(np.int32),
            _pad(s.temperature.astype(np.float32), (n,)),
            _pad(s.top_k.astype(np.int32), (n,)),
            _pad(s.top_p.astype(np.float32), (n,), 1.0),
            _pad(s.seeds.astype(np.uint32), (n,)),
            _pad(s.counters.astype(np.int32), (n,)),
        )
        if incoming is not None and self.in_step_load_error is None:
            staged = args + (self._stage_incoming(incoming),)
            try:
                self._executable(staged, t, n, p, q, b)
                args, incoming = staged, None
            except Exception as e:  # noqa: BLE001 - a backend that cannot compile the load
                self.in_step_load_error = f"{type(e).__name__}: {e}"[:500]
                warnings.warn("pages cannot be loaded inside a step on this backend; they are "
                              f"loaded before it instead ({self.in_step_load_error})")
        if incoming is not None:
            self.scatter_pages(*incoming)
        executable = self._executable(args, t, n, p, q, b)
        tokens, self.kv = executable(self.params, self.kv, *self._replicate(args[:9]), *args[9:])
        return parallel.to_host(tokens)[:num_seqs]

    def _stage_incoming(self, incoming: HostPages) -> Incoming:
        """Host pages, padded to a bucket of pages, in the step's host memory; ids replicated."""
        k, v = self._put_pages(incoming.k, incoming.v, self._incoming_sharding)
        ids = np.full(k.shape[1], self.num_pages, np.int32)   # padding pages are dropped
        ids[:len(incoming.page_ids)] = incoming.page_ids
        return Incoming(k, v, self._replicate(ids))

    def compile_step(self, t: int, n: int, p: int, q: int, b: int, m: int = 0) -> None:
        """Compile the step of one bucket (tokens t, sequences n, pages p, longest query q,
        query tiles b: 0 for decode-only steps and the Pallas path; m incoming pages, a bucket
        of 8 or more, or 0) before it is needed."""
        i32 = lambda *shape: np.zeros(shape, np.int32)     # noqa: E731
        args = (i32(t), i32(t), AttentionBatch(i32(n, p), i32(n), i32(n + 1)), i32(n),
                np.zeros(n, np.float32), i32(n), np.ones(n, np.float32), np.zeros(n, np.uint32),
                i32(n))
        if m:
            pages = jax.ShapeDtypeStruct((self.config.num_layers, m) + self.kv.k.shape[2:],
                                         self.dtype, sharding=self._incoming_sharding)
            args += (Incoming(pages, pages, self._replicate(i32(m))),)
        self._executable(args, t, n, p, q, b if self._model.attention == "xla" else 0)

    def _executable(self, args, t: int, n: int, p: int, q: int, b: int):
        mesh = None if self.mesh is None else tuple(d.id for d in self.mesh.devices.flat)
        m = args[9].page_ids.shape[0] if len(args) > 9 else 0
        key = (self.config, self.dtype.name, self._model.attention, self.num_pages,
               self.page_size, t, n, p, q, b, m, mesh)
        executable = _EXECUTABLES.get(key)
        if executable is None:          # shared by every runner of the same shapes in-process
            step = self._step_loading if m else self._step
            with jax.default_matmul_precision("highest" if self.dtype == jnp.float32 else "default"):
                executable = step.lower(self.params, self.kv, *args[:9], q, b,
                                        *args[9:]).compile()
            _EXECUTABLES[key] = executable
            self._compiled[key] = executable
        return executable


def step_input(rows, page_size: int) -> StepInput:
    """Dense step arrays for scheduled rows (scheduler.Row: request, start, end)."""
    # Each row's table holds the pages up to its kv_len only (pages a conversation keeps past
    # it are neither read nor written), so the width, and every sequence's attention context,
    # follows the longest kv_len of the step.
    needed = [-(-r.end // page_size) for r in rows]
    table = np.zeros((len(rows), max(needed)), np.int32)
    for i, (r, n) in enumerate(zip(rows, needed)):
        pages = r.request.conversation.pages
        if n > len(pages) or min(pages[:n], default=0) < 0:
            raise RuntimeError(f"scheduler bug: row {r.start}:{r.end} of conversation "
                               f"{r.request.conversation.id} lacks device pages ({pages})")
        table[i, :n] = pages[:n]
    reqs = [r.request for r in rows]
    p = [r.params for r in reqs]
    return StepInput(
        token_ids=np.concatenate([r.request.token_ids[r.start:r.end] for r in rows]).astype(
            np.int32),
        positions=np.concatenate([np.arange(r.start, r.end) for r in rows]).astype(np.int32),
        page_table=table, kv_lens=np.asarray([r.end for r in rows], np.int32),
        cu_q_lens=np.cumsum([0] + [r.end - r.start for r in rows]).astype(np.int32),
        temperature=np.asarray([x.temperature for x in p], np.float32),
        top_k=np.asarray([x.top_k for x in p], np.int32),
        top_p=np.asarray([x.top_p for x in p], np.float32),
        seeds=np.asarray([r.seed for r in reqs], np.uint32),
        counters=np.asarray([len(r.output) for r in reqs], np.int32))
