"""Model runner: pads a step to shape buckets, runs the compiled step, returns sampled tokens.

The host plans, the device computes: a step arrives as small NumPy arrays, is padded to
power-of-two buckets (tokens, sequences, pages per sequence; the longest query run is 1 for a
decode-only step, else the token bucket), and each bucket is compiled once (ahead of time, on first use). The KV pools are donated into every step, so
they are updated in place. One device-to-host copy per step: the sampled token ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.kv_pages import copy_pages
from pensieve_jax.attention import AttentionBatch, KVCache, init_kv_cache
from pensieve_jax.model import Llama
from pensieve_jax.sampling import sample
from pensieve_jax.weights import LoadedModel


class StepInput(NamedTuple):
    """One step, unpadded. T = total new tokens, S = sequences, P = pages of the longest one."""

    token_ids: np.ndarray    # int32 [T]
    positions: np.ndarray    # int32 [T]
    page_table: np.ndarray   # int32 [S, P]
    kv_lens: np.ndarray      # int32 [S]
    cu_q_lens: np.ndarray    # int32 [S + 1]
    temperature: np.ndarray  # float32 [S]
    top_k: np.ndarray        # int32 [S]
    top_p: np.ndarray        # float32 [S]
    seeds: np.ndarray        # uint32 [S]
    counters: np.ndarray     # int32 [S], index of the token each row samples


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
                 dtype=jnp.float32, buckets: Buckets = Buckets()):
        c = model.config
        self.config = c
        self.params = model.params
        self.page_size = page_size
        self.buckets = buckets
        self.dtype = jnp.dtype(dtype)
        self.num_pages = num_pages
        self.reset_kv()
        self._model = Llama(c, self.dtype, attention)
        self._compiled: dict[tuple[int, ...], Any] = {}
        self._step = jax.jit(self._step_impl, static_argnames=("max_q_len",),
                             donate_argnames=("kv",))
        self._gather = jax.jit(lambda kv, ids: (jnp.take(kv.k, ids, axis=1),
                                                jnp.take(kv.v, ids, axis=1)))
        self._copy = jax.jit(lambda kv, src, dst: KVCache(
            kv.k.at[:, dst].set(kv.k[:, src], mode="drop"),
            kv.v.at[:, dst].set(kv.v[:, src], mode="drop")), donate_argnums=(0,))
        self._scatter = jax.jit(lambda kv, k, v, ids: KVCache(
            copy_pages(kv.k, k, jnp.arange(ids.shape[0]), ids),
            copy_pages(kv.v, v, jnp.arange(ids.shape[0]), ids)), donate_argnums=(0,))

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        """Device page -> device page copies (src, dst); all sources are read before any write."""
        n = bucket(len(pairs), 8)
        src = np.zeros(n, np.int32)
        dst = np.full(n, self.num_pages, np.int32)          # padding rows are dropped
        src[:len(pairs)], dst[:len(pairs)] = zip(*pairs)
        self.kv = self._copy(self.kv, src, dst)

    def gather_pages(self, page_ids: list[int]) -> tuple[jax.Array, jax.Array]:
        """Copies of device pages [layers, n_bucket, page_size, kv_heads, head_dim] (the first
        len(page_ids) are the pages asked for; the rest is padding)."""
        ids = np.zeros(bucket(len(page_ids), 8), np.int32)
        ids[:len(page_ids)] = page_ids
        return self._gather(self.kv, ids)

    def scatter_pages(self, k: np.ndarray, v: np.ndarray, page_ids: list[int]) -> None:
        """Write pages k, v [layers, n, ...] (host arrays) into device pages page_ids."""
        n = bucket(len(page_ids), 8)
        ids = np.full(n, self.num_pages, np.int32)          # padding rows are dropped
        ids[:len(page_ids)] = page_ids
        pad = ((0, 0), (0, n - len(page_ids))) + ((0, 0),) * (k.ndim - 2)
        self.kv = self._scatter(self.kv, jax.device_put(np.pad(k, pad)),
                                jax.device_put(np.pad(v, pad)), ids)

    def reset_kv(self) -> None:
        c = self.config
        self.kv = init_kv_cache(c.num_layers, self.num_pages, self.page_size, c.num_kv_heads,
                                c.head_dim, self.dtype)

    @property
    def num_compilations(self) -> int:
        return len(self._compiled)

    def _step_impl(self, params, kv, token_ids, positions, batch, logits_indices, temperature, top_k,
              top_p, seeds, counters, *, max_q_len):
        logits, kv = self._model.apply(params, token_ids, positions, kv, batch, logits_indices,
                                       max_q_len)
        return sample(logits, temperature, top_k, top_p, seeds, counters), kv

    def step(self, s: StepInput) -> np.ndarray:
        """Run one step; returns the sampled token of each sequence, int32 [S]."""
        num_seqs = len(s.kv_lens)
        q_lens = np.diff(s.cu_q_lens)
        t = bucket(len(s.token_ids), self.buckets.min_tokens)
        n = bucket(num_seqs, self.buckets.min_seqs)
        p = bucket(s.page_table.shape[1], self.buckets.min_pages)
        q = 1 if q_lens.max(initial=1) <= 1 else t   # decode-only, or room for any prefill
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
        key = (self.config, self.dtype.name, self._model.attention, self.num_pages,
               self.page_size, t, n, p, q)
        executable = _EXECUTABLES.get(key)
        if executable is None:          # shared by every runner of the same shapes in-process
            with jax.default_matmul_precision("highest" if self.dtype == jnp.float32 else "default"):
                executable = self._step.lower(self.params, self.kv, *args, max_q_len=q).compile()
            _EXECUTABLES[key] = executable
            self._compiled[key] = executable
        tokens, self.kv = executable(self.params, self.kv, *args)
        return np.asarray(tokens)[:num_seqs]


def step_input(rows, page_size: int) -> StepInput:
    """Dense step arrays for scheduled rows (scheduler.Row: request, start, end)."""
    width = max(len(r.request.conversation.pages) for r in rows)
    table = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        pages = r.request.conversation.pages
        if -(-r.end // page_size) > len(pages) or min(pages[:-(-r.end // page_size)]) < 0:
            raise RuntimeError(f"scheduler bug: row {r.start}:{r.end} of conversation "
                               f"{r.request.conversation.id} lacks device pages ({pages})")
        table[i, :len(pages)] = pages
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
