"""Model runner: pads a step to one of a fixed set of programs, runs it, returns sampled tokens.

The host plans, the device computes: a step arrives as small NumPy arrays (a ragged token
batch) and is padded to one program of a set fixed by the engine's configuration before any
request comes (`ProgramSet`, below): the only shape that varies is the token count, rounded up
a short ladder of buckets; sequences and pages per sequence are fixed per bucket, and the
attention's cost follows the keys each sequence really has, not these bounds. `precompile` compiles the whole set; a compile after that is a bug, warned about
and counted. The KV pools are donated into every step, so they are updated in place. One
device-to-host copy per step: the sampled token ids. Page copies between tiers run in fixed
chunks of PAGE_CHUNK pages, one small program each.

With tensor_parallel > 1 the params and pools live on a mesh (pensieve_jax.model.parallel): the step
is jitted with NamedSharding in/out shardings, step inputs are replicated, and page gathers /
scatters for the host tier keep every device's KV heads on that device.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import time
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.kv_pages import copy_pages
from pensieve_jax.model import parallel
from pensieve_jax.runner import program_store
from pensieve_jax.model.attention import AttentionBatch, Incoming, KVCache, init_kv_cache
from pensieve_jax.model.llama import Llama, unstack_kernels
from pensieve_jax.runner.sampler import sample
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


class StepHandle(NamedTuple):
    """A dispatched step (ModelRunner.dispatch): its sampled tokens, still on the device."""

    tokens: jax.Array        # int32 [slots] (max_num_seqs), the first num_seqs real
    num_seqs: int


PAGE_CHUNK = 32   # pages per call of the page gather / scatter / copy programs
INCOMING_PAGES = 64   # pages a "layered" step loads inside it (more: the rest just before it)


def token_buckets(max_tokens: int, minimum: int = 8, single: bool = False) -> tuple[int, ...]:
    """The token ladder: powers of two from `minimum`, with midpoints 1.5x between 32 and 128
    (where decode batches with a short turn beside them land, and a chat turn's own prefill),
    capped by and ending at max_tokens. 512 -> 8 16 32 48 64 96 128 256 512 (9 programs; each
    more costs about 4 s of cold start for SmolLM2 on a 2-core CPU). single: 1 first too, for
    one sequence's decode alone (the engine's choice on CPU, `single_decode_program`: there
    its matmuls become matrix-vector products, a third faster than the row padded to 8)."""
    ladder, size = [1] if single else [], max(1, minimum)
    while size < max_tokens:
        ladder.append(size)
        if 32 <= size < 128 and size * 3 // 2 < max_tokens:
            ladder.append(size * 3 // 2)
        size *= 2
    ladder.append(max_tokens)
    return tuple(sorted(set(ladder)))


def single_decode_program(platform: str) -> bool:
    """Whether the ladder starts with a 1-token program on `platform`: on CPU a batch-1 decode
    step ran in 30 ms instead of 47 ms padded to 8 rows (SmolLM2 f32, context 512, 2 cores, same
    process); a GPU's step is not bound by that."""
    return platform == "cpu"


@dataclasses.dataclass(frozen=True)
class StepShape:
    """One compiled step program."""

    tokens: int              # T: token rows (real ones first, then padding)
    seqs: int                # S: page-table rows, min(T, max_num_seqs)
    pages_per_seq: int       # P: page-table width, pages of max_model_len
    incoming_pages: int = 0  # pages loaded layer by layer during the step (0: none)
    slots: int = 0           # the sampled tokens' width, max_num_seqs for every program of a
                             # set (0: seqs), so one step's output feeds the next (last_tokens)


@dataclasses.dataclass(frozen=True)
class ProgramSet:
    """Every step program an engine configuration can run, known before the first request.

    How it is derived (a comment table; T runs over `token_buckets(max_batched_tokens)`):

      dimension      value                                  why it is enough
      tokens T       the ladder                             a step pads up to the next bucket
      sequences S    min(T, max_num_seqs)                   every row holds >= 1 token
      pages P        ceil(max_model_len / page_size)        no sequence is longer
      incoming       0, and INCOMING_PAGES with swap_in     more pages load before the step
                     "layered" and a host tier

    So a configuration has len(ladder) programs (twice that with layered loads). Page copies
    add three programs (gather, scatter, copy) of PAGE_CHUNK pages.
    """

    token_buckets: tuple[int, ...]
    max_num_seqs: int
    pages_per_seq: int
    incoming_pages: int = 0

    def shape_for(self, num_tokens: int, incoming: bool = False) -> StepShape:
        """The program a step of num_tokens token rows runs."""
        for t in self.token_buckets:
            if t >= num_tokens:
                return self._shape(t, incoming)
        raise ValueError(f"a step of {num_tokens} tokens exceeds the largest program "
                         f"({self.token_buckets[-1]} tokens, max_batched_tokens)")

    def _shape(self, t: int, incoming: bool) -> StepShape:
        return StepShape(t, min(t, self.max_num_seqs), self.pages_per_seq,
                         self.incoming_pages if incoming else 0, self.max_num_seqs)

    @property
    def shapes(self) -> list[StepShape]:
        loads = (False, True) if self.incoming_pages else (False,)
        return [self._shape(t, m) for m in loads for t in self.token_buckets]


def bucket(n: int, minimum: int) -> int:
    """The power of two >= n (at least minimum)."""
    size = max(minimum, 1)
    while size < n:
        size *= 2
    return size


def _pad(a: np.ndarray, shape: tuple[int, ...], fill=0) -> np.ndarray:
    out = np.full(shape, fill, dtype=a.dtype)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


def _chunks(n: int) -> list[slice]:
    return [slice(i, min(i + PAGE_CHUNK, n)) for i in range(0, n, PAGE_CHUNK)]


def _gather_pages(kv: KVCache, ids: jax.Array) -> KVCache:
    return KVCache(jnp.take(kv.k, ids, axis=1), jnp.take(kv.v, ids, axis=1))


def _copy_pages(kv: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    return KVCache(copy_pages(kv.k, kv.k, src, dst), copy_pages(kv.v, kv.v, src, dst))


def _scatter_pages(kv: KVCache, k: jax.Array, v: jax.Array, ids: jax.Array) -> KVCache:
    rows = jnp.arange(ids.shape[0])
    return KVCache(copy_pages(kv.k, k, rows, ids), copy_pages(kv.v, v, rows, ids))


# -- the programs, as functions of abstract arguments (ModelRunner and ahead-of-time compiles) --

def kernel_interpret(devices) -> bool:
    """Whether kernels run their interpreter (Pallas interpret mode) on these devices: anywhere
    but a GPU. Decided from the devices a program is compiled for, never from the default
    backend: a program compiled ahead of time for a GPU is built on a CPU host."""
    return any(d.platform != "gpu" for d in devices)


def host_memory_kind(device) -> str | None:
    """"pinned_host" where the device has that memory kind (layered loads wait there), else
    None (device memory). Compile-only devices report no memory kinds: None."""
    kinds = {m.kind for m in device.addressable_memories()}
    return "pinned_host" if "pinned_host" in kinds else None


def runtime_params(params: Any, platform: str) -> Any:
    """Loaded params as the step programs on `platform` take them. On CPU each layer's matmul
    kernels become arrays of their own (`model.unstack_kernels`, under "layer_kernels"): XLA
    CPU copies a layer's slice of a stacked kernel before its dot, a second pass over the
    weights that cost decode about a sixth of its time. Elsewhere as loaded (stacked): a GPU's
    matmuls read the slice in place. The kernels are copies: the loaded tree is untouched."""
    if platform != "cpu" or "layer_kernels" in params:     # or in that layout already
        return params
    stripped, kernels = unstack_kernels(params)
    return {**stripped, "layer_kernels": kernels}


def run_step(model: Llama, params, kv, token_ids, positions, batch, logits_indices, temperature,
             top_k, top_p, seeds, counters, last_tokens, token_src, incoming=None):
    """One step: the model over the step's token rows (loading `incoming` pages layer by layer
    when given), then one sampled token per sequence. Returns (tokens [slots], kv): the
    sampled tokens padded to last_tokens' width (max_num_seqs), so that they can feed the next
    step whatever its program. token_src [T]: -1 takes token_ids[t], i >= 0 takes
    last_tokens[i] (the previous step's sample i, still on the device: the overlapped engine
    loop dispatches a decode before it knows its input token). Every step program jits this
    (`jit_step`)."""
    fed = last_tokens[jnp.clip(token_src, 0, last_tokens.shape[0] - 1)]
    token_ids = jnp.where(token_src >= 0, fed, token_ids)
    q_lens = batch.cu_q_lens[1:] - batch.cu_q_lens[:-1]
    real = jnp.max(jnp.where(q_lens > 0, jnp.arange(1, q_lens.shape[0] + 1), 0))
    kernels = params.get("layer_kernels")     # the per-layer layout (`runtime_params`)
    logits, kv = model.apply({"params": params["params"]}, token_ids, positions, kv, batch,
                             logits_indices, incoming, num_logits=real, layer_kernels=kernels)
    logits = parallel.constrain(logits, model.mesh, parallel.P())   # vocab-sharded -> whole
    tokens = sample(logits, temperature, top_k, top_p, seeds, counters)
    return jnp.pad(tokens, (0, last_tokens.shape[0] - tokens.shape[0])), kv


def jit_step(model: Llama, param_shardings: Any = None, incoming_sharding: Any = None):
    """The jitted step program of `model`, pools donated. Under the model's mesh: in/out
    shardings (params by param_shardings, pools by KV head, step inputs replicated), and with
    incoming_sharding the variant that also takes host pages (`Incoming`) to load."""
    fn = functools.partial(run_step, model)
    if model.mesh is None:
        return jax.jit(fn, donate_argnums=(1,))
    rep, kv_sh = parallel.replicated(model.mesh), parallel.kv_sharding(model.mesh)
    kv2 = KVCache(kv_sh, kv_sh)
    in_sh = (param_shardings, kv2) + (rep,) * 11
    if incoming_sharding is not None:
        in_sh += (Incoming(incoming_sharding, incoming_sharding, rep),)
    return jax.jit(fn, donate_argnums=(1,), in_shardings=in_sh, out_shardings=(rep, kv2))


def lower_step(step, params, kv: KVCache, shape: StepShape, incoming_sharding: Any = None):
    """Lower the step program `step` (from jit_step) for `shape`. params and kv may be abstract
    (ShapeDtypeStructs with shardings, e.g. on a compile-only topology's devices: ahead-of-time
    compilation); the step's inputs are abstract, the incoming pages on incoming_sharding."""
    with _precision(kv):
        return step.lower(params, kv, *step_args(kv, shape, incoming_sharding))


def export_step(step, params, kv: KVCache, shape: StepShape) -> jax.export.Exported:
    """The step program `step` for `shape`, traced and exported (program_store keeps it)."""
    with _precision(kv):
        return jax.export.export(step)(params, kv, *step_args(kv, shape))


def lower_exported(program: jax.export.Exported, params, kv: KVCache, shape: StepShape):
    """Lower a call of an exported step program (pools donated, as jit_step's)."""
    return jax.jit(program.call, donate_argnums=(1,)).lower(params, kv, *step_args(kv, shape))


def _precision(kv: KVCache):
    return jax.default_matmul_precision("highest" if kv.k.dtype == jnp.float32 else "default")


def step_args(kv: KVCache, shape: StepShape, incoming_sharding: Any = None) -> tuple:
    """A step program's abstract arguments after params and pools, for `shape`."""
    t, n, p, m = shape.tokens, shape.seqs, shape.pages_per_seq, shape.incoming_pages
    i32 = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.int32)     # noqa: E731
    f32 = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32)   # noqa: E731
    args = (i32(t), i32(t), AttentionBatch(i32(n, p), i32(n), i32(n + 1)), i32(n),
            f32(n), i32(n), f32(n), jax.ShapeDtypeStruct((n,), jnp.uint32), i32(n),
            i32(shape.slots or n), i32(t))      # last_tokens, token_src
    if m:
        pages = jax.ShapeDtypeStruct((kv.k.shape[0], m) + kv.k.shape[2:], kv.k.dtype,
                                     sharding=incoming_sharding)
        args += (Incoming(pages, pages, i32(m)),)
    return args


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


_EXECUTABLES: dict[tuple, Any] = {}

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: LoadedModel, num_pages: int, page_size: int, attention: str = "xla",
                 dtype=jnp.float32, tensor_parallel: int = 1, max_num_seqs: int = 64,
                 max_batched_tokens: int = 512, max_model_len: int = 4096,
                 token_ladder: tuple[int, ...] | None = None, layered_loads: bool = False):
        c = model.config
        parallel.check_tensor_parallel(c, tensor_parallel)
        self.config = c
        self.page_size = page_size
        self.dtype = jnp.dtype(dtype)
        self.num_pages = num_pages
        self.tensor_parallel = tensor_parallel
        self.mesh = parallel.make_mesh(tensor_parallel) if tensor_parallel > 1 else None
        devices = [jax.devices()[0]] if self.mesh is None else list(self.mesh.devices.flat)
        self.interpret = kernel_interpret(devices)   # the Pallas kernel's mode, by platform
        self.programs = ProgramSet(
            tuple(token_ladder) if token_ladder else token_buckets(
                max_batched_tokens, single=single_decode_program(devices[0].platform)),
            max_num_seqs, -(-max_model_len // page_size), INCOMING_PAGES if layered_loads else 0)
        # where swap-ins wait for a step that loads them layer by layer: pinned host memory
        # (the device copies it asynchronously) where the backend has it, else device memory
        host_kind = host_memory_kind(jax.devices()[0])
        param_sh = None
        if self.mesh is None:
            self.params = runtime_params(model.params, devices[0].platform)
            self._incoming_sharding = jax.sharding.SingleDeviceSharding(
                jax.devices()[0], memory_kind=host_kind)
        else:
            kv_sh = parallel.kv_sharding(self.mesh)
            param_sh = parallel.param_shardings(model.params, self.mesh)
            self.params = parallel.put(model.params, param_sh)
            self._kv_sharding = kv_sh
            self._incoming_sharding = kv_sh.with_memory_kind(host_kind) if host_kind else kv_sh
        self.in_step_load_error: str | None = None   # why `step` cannot load pages inside
        self.ready = False            # set once the program set is compiled: later compiles warn
        self.compilations_after_ready: list[str] = []
        self.compile_s = 0.0          # seconds spent compiling step programs
        self.real_tokens = 0          # token rows run, and the rows their programs padded them to
        self.padded_tokens = 0
        self._init_kv = None
        self.reset_kv()
        self._model = Llama(c, self.dtype, attention, self.mesh, interpret=self.interpret)
        self._compiled: dict[tuple, Any] = {}
        # two programs: plain steps, and steps that also load swapped-in pages layer by layer
        self._step = jit_step(self._model, param_sh)
        self._step_loading = jit_step(self._model, param_sh,
                                      None if self.mesh is None else self._incoming_sharding)
        self._pages = jit_page_programs(self.mesh)

    # -- page copies (fixed chunks of PAGE_CHUNK pages: one program each) ---------------------

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        """Device page -> device page copies (src, dst); all sources are read before any write."""
        # chunks run one after another, so a later chunk must not read a page an earlier one
        # wrote: copy through the gather (read all) and scatter (write all) programs then
        written = {d for _, d in pairs}
        if len(pairs) > PAGE_CHUNK and written & {s for s, _ in pairs}:
            k, v = self.gather_pages_host([s for s, _ in pairs])
            self.scatter_pages(k, v, [d for _, d in pairs])
            return
        for part in _chunks(len(pairs)):
            src = np.zeros(PAGE_CHUNK, np.int32)
            dst = np.full(PAGE_CHUNK, self.num_pages, np.int32)          # padding is dropped
            src[:part.stop - part.start], dst[:part.stop - part.start] = zip(*pairs[part])
            self.kv = self._page_program("copy")(self.kv, *self._replicate((src, dst)))

    def gather_pages(self, page_ids: list[int]) -> list[tuple[jax.Array, jax.Array]]:
        """Copies of device pages, as chunks (k, v) [layers, PAGE_CHUNK, page_size, kv_heads,
        head_dim] in order (the last one padded)."""
        out = []
        for part in _chunks(len(page_ids)):
            ids = np.zeros(PAGE_CHUNK, np.int32)
            ids[:part.stop - part.start] = page_ids[part]
            out.append(tuple(self._page_program("gather")(self.kv, self._replicate(ids))))
        return out

    def gather_pages_host(self, page_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Device pages as host arrays k, v [layers, n, page_size, kv_heads, head_dim]."""
        if not page_ids:
            empty = np.zeros((self.config.num_layers, 0) + self._page_shape(), self.dtype)
            return empty, empty.copy()
        return pages_to_host(self.gather_pages(page_ids), len(page_ids))

    def scatter_pages(self, k: np.ndarray, v: np.ndarray, page_ids: list[int]) -> None:
        """Write pages k, v [layers, n, ...] (host arrays) into device pages page_ids."""
        self.scatter_staged(self.stage_pages(k, v), page_ids)

    def stage_pages(self, k: np.ndarray, v: np.ndarray) -> list[tuple[jax.Array, jax.Array]]:
        """Start copying host pages k, v [layers, n, ...] to the device (asynchronous), in
        chunks of PAGE_CHUNK pages. The copy overlaps whatever runs until `scatter_staged`."""
        # with a mesh each device gets its heads' slice
        sharding = None if self.mesh is None else self._kv_sharding
        return [self._put_pages(k[:, part], v[:, part], PAGE_CHUNK, sharding)
                for part in _chunks(k.shape[1])]

    def _put_pages(self, k: np.ndarray, v: np.ndarray, n: int, sharding
                   ) -> tuple[jax.Array, jax.Array]:
        """Host pages k, v [layers, <= n, ...] padded to n pages, put on sharding (None: the
        default device)."""
        pad = ((0, 0), (0, n - k.shape[1])) + ((0, 0),) * (k.ndim - 2)
        return parallel.put(np.pad(k, pad), sharding), parallel.put(np.pad(v, pad), sharding)

    def scatter_staged(self, staged: list[tuple[jax.Array, jax.Array]],
                       page_ids: list[int]) -> None:
        """Write staged pages into device pages page_ids (-1: skip that page)."""
        for chunk, part in zip(staged, _chunks(len(page_ids))):
            ids = np.full(PAGE_CHUNK, self.num_pages, np.int32)   # padding rows are dropped
            ids[:part.stop - part.start] = [p if p >= 0 else self.num_pages
                                            for p in page_ids[part]]
            self.kv = self._page_program("scatter")(self.kv, *chunk, self._replicate(ids))

    def _page_program(self, name: str):
        """The compiled gather / copy / scatter of PAGE_CHUNK pages (ahead of time, as the
        steps: a jit call would compile again for pools that a step program returned)."""
        key = (name, self.config, self.dtype.name, self.num_pages, self.page_size,
               self._mesh_ids)
        executable = _EXECUTABLES.get(key)
        if executable is None:
            if self.ready:
                self.compilations_after_ready.append(name)
            args = page_program_args(name, self.kv)
            executable = self._pages[name].lower(self.kv, *args).compile()
            _EXECUTABLES[key] = executable
        return executable

    def _page_shape(self) -> tuple[int, ...]:
        return self.kv.k.shape[2:]

    def reset_kv(self) -> None:
        c = self.config
        shape = (c.num_layers, self.num_pages, self.page_size, c.num_kv_heads, c.head_dim)
        if self._init_kv is None:     # one program, compiled before the engine is ready
            sharding = {} if self.mesh is None else dict(
                out_shardings=KVCache(self._kv_sharding, self._kv_sharding))
            self._init_kv = jax.jit(lambda: init_kv_cache(*shape, self.dtype), **sharding)
        self.kv = self._init_kv()

    def _replicate(self, tree):
        return tree if self.mesh is None else parallel.put(tree, parallel.replicated(self.mesh))

    # -- steps --------------------------------------------------------------------------------

    @property
    def num_compilations(self) -> int:
        return len(self._compiled)

    def step(self, s: StepInput, incoming: HostPages | None = None) -> np.ndarray:
        """Run one step; returns the sampled token of each sequence, int32 [S]. incoming: host
        pages to write into device pages during the step, layer by layer, each before that
        layer reads the pools (the step's rows may read them). Where the backend cannot
        compile that (in_step_load_error says why), they are written before the step."""
        return self.fetch(self.dispatch(s, incoming))

    def fetch(self, handle: StepHandle) -> np.ndarray:
        """The sampled token of each sequence of a dispatched step, int32 [S] (waits for it)."""
        return parallel.to_host(handle.tokens)[:handle.num_seqs]

    def dispatch(self, s: StepInput, incoming: HostPages | None = None,
                 last: StepHandle | None = None, token_src: np.ndarray | None = None
                 ) -> StepHandle:
        """Start one step and return without waiting for it (no device-to-host copy; `fetch`
        gets its tokens). last: an earlier step, still running or not, whose sampled tokens
        rows of this one read: token_src int32 [T] is -1 where token_ids holds the token, i
        where it is last's sample i. Steps run on the device in the order they are dispatched
        (every one takes the pools the one before returned)."""
        num_seqs = len(s.kv_lens)
        load = (incoming is not None and self.in_step_load_error is None
                and self.programs.incoming_pages > 0)
        shape = self.programs.shape_for(len(s.token_ids), load)
        t, n, p = shape.tokens, shape.seqs, shape.pages_per_seq
        if num_seqs > n or s.page_table.shape[1] > p:
            raise ValueError(f"a step of {num_seqs} sequences x {s.page_table.shape[1]} pages "
                             f"does not fit its program ({n} x {p}: max_num_seqs, "
                             "max_model_len)")
        self.real_tokens += len(s.token_ids)
        self.padded_tokens += t
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
        if load:
            m = shape.incoming_pages
            if len(incoming.page_ids) > m:      # the rest goes in before the step
                self.scatter_pages(incoming.k[:, m:], incoming.v[:, m:], incoming.page_ids[m:])
                incoming = HostPages(incoming.k[:, :m], incoming.v[:, :m], incoming.page_ids[:m])
            staged = args + (self._stage_incoming(incoming, m),)
            try:
                self._executable(shape)
                args, incoming = staged, None
            except Exception as e:  # noqa: BLE001 - a backend that cannot compile the load
                self.in_step_load_error = f"{type(e).__name__}: {e}"[:500]
                warnings.warn("pages cannot be loaded inside a step on this backend; they are "
                              f"loaded before it instead ({self.in_step_load_error})")
                shape = self.programs.shape_for(len(s.token_ids))
        if incoming is not None:
            self.scatter_pages(*incoming)
        executable = self._executable(shape)
        src = np.full(t, -1, np.int32)
        if token_src is not None:
            src[:len(token_src)] = token_src
        feed = (self._no_tokens() if last is None else last.tokens, self._replicate(src))
        tokens, self.kv = executable(self.params, self.kv, *self._replicate(args[:9]), *feed,
                                     *args[9:])
        return StepHandle(tokens, num_seqs)

    def _no_tokens(self) -> jax.Array:
        """last_tokens of a step that reads no earlier step's tokens: zeros, on the device."""
        if getattr(self, "_zero_tokens", None) is None:
            zeros = np.zeros(self.programs.max_num_seqs, np.int32)
            self._zero_tokens = (jax.device_put(zeros, jax.devices()[0]) if self.mesh is None
                                 else self._replicate(zeros))
        return self._zero_tokens

    def _stage_incoming(self, incoming: HostPages, m: int) -> Incoming:
        """Host pages, padded to m pages, in the step's host memory; ids replicated."""
        k, v = self._put_pages(incoming.k, incoming.v, m, self._incoming_sharding)
        ids = np.full(m, self.num_pages, np.int32)   # padding pages are dropped
        ids[:len(incoming.page_ids)] = incoming.page_ids
        return Incoming(k, v, self._replicate(ids))

    def precompile(self, progress: Callable[[StepShape, float], None] | None = None) -> None:
        """Compile every program of the set (steps, page copies); progress(shape, seconds) after
        each step program. Programs are traced (or read from the program store) one by one
        and compiled in parallel (XLA compiles outside the GIL; JAX's cache answers warm ones).
        Marks the runner ready: a compile after this is warned about."""
        start = time.perf_counter()
        workers = max(1, min(os.cpu_count() or 1, 4))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = {}
            for shape in self.programs.shapes:   # each compile starts as the next one traces
                key = self._key(shape)
                if shape.incoming_pages and self.in_step_load_error is not None:
                    continue
                if key in _EXECUTABLES:
                    self._compiled[key] = _EXECUTABLES[key]
                else:
                    try:
                        futures[pool.submit(self._lower(shape).compile)] = (shape, key)
                        continue
                    except Exception as e:  # noqa: BLE001 - a backend that cannot lower the load
                        self._no_in_step_loads(shape, e)
                if progress is not None:
                    progress(shape, time.perf_counter() - start)
            for future in concurrent.futures.as_completed(futures):
                shape, key = futures[future]
                try:
                    self._store(key, future.result())
                except Exception as e:  # noqa: BLE001 - see step(): loads go before the step
                    self._no_in_step_loads(shape, e)
                if progress is not None:
                    progress(shape, time.perf_counter() - start)
        self.compile_s += time.perf_counter() - start
        # the page programs: run once on padding (every id out of range or a no-op)
        k, v = self.gather_pages([0])[0]
        self.scatter_staged([(k, v)], [-1])
        self.copy_pages([(0, 0)])
        jax.block_until_ready(self.kv)
        self.ready = True

    def _no_in_step_loads(self, shape: StepShape, error: Exception) -> None:
        if not shape.incoming_pages:
            raise error
        self.in_step_load_error = f"{type(error).__name__}: {error}"[:500]
        warnings.warn("pages cannot be loaded inside a step on this backend; they are "
                      f"loaded before it instead ({self.in_step_load_error})")

    @property
    def _mesh_ids(self) -> tuple[int, ...] | None:
        """The devices the programs run on, for their keys (None: the default device)."""
        return None if self.mesh is None else tuple(d.id for d in self.mesh.devices.flat)

    def _key(self, shape: StepShape) -> tuple:
        return (self.config, self.dtype.name, self._model.attention, self.num_pages,
                self.page_size, shape, self._mesh_ids)

    def _store(self, key: tuple, executable) -> None:
        _EXECUTABLES[key] = executable
        self._compiled[key] = executable

    def _executable(self, shape: StepShape):
        key = self._key(shape)
        executable = _EXECUTABLES.get(key)
        if executable is None:          # shared by every runner of the same shapes in-process
            if self.ready:
                self.compilations_after_ready.append(str(shape))
                log.warning("compiling step program %s after the engine was ready (a shape "
                            "outside the program set: a bug)", shape)
            start = time.perf_counter()
            self._store(key, self._lower(shape).compile())
            self.compile_s += time.perf_counter() - start
            executable = _EXECUTABLES[key]
        self._compiled[key] = executable
        return executable

    def _lower(self, shape: StepShape):
        step = self._step_loading if shape.incoming_pages else self._step
        # traced once per machine and code version (program_store); not the variants that
        # take host pages (their memory kinds) nor those over a mesh (their shardings)
        if self.mesh is None and not shape.incoming_pages:
            program = program_store.exported(
                self._key(shape), self.params,
                lambda: export_step(step, self.params, self.kv, shape))
            if program is not None:
                return lower_exported(program, self.params, self.kv, shape)
        return lower_step(step, self.params, self.kv, shape, self._incoming_sharding)

    def stats(self) -> dict[str, Any]:
        """The program set and what compiling and padding cost."""
        return {"count": len(self.programs.shapes),
                "shapes": [dataclasses.asdict(x) for x in self.programs.shapes],
                "page_chunk": PAGE_CHUNK, "compiled": len(self._compiled),
                "compile_s": round(self.compile_s, 3), "ready": self.ready,
                "compilations_after_ready": len(self.compilations_after_ready),
                "compiled_after_ready": self.compilations_after_ready[-8:],
                "real_tokens": self.real_tokens, "padded_tokens": self.padded_tokens}


def pages_to_host(chunks: list[tuple[jax.Array, jax.Array]], n: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Gathered page chunks (gather_pages; at least one) as host arrays k, v [layers, n, ...]."""
    k = np.concatenate([np.asarray(c[0]) for c in chunks], axis=1)[:, :n]
    v = np.concatenate([np.asarray(c[1]) for c in chunks], axis=1)[:, :n]
    return k, v


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
