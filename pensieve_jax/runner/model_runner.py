"""Model runner: pads a step to one of a fixed set of programs, runs it, returns sampled tokens.

The host plans, the device computes: a step arrives as small NumPy arrays (a ragged token
batch, `StepInput`) and is padded to one program of a set fixed by the engine's configuration
before any request comes (runner/programs.py): the only shape that varies is the token count,
rounded up a short ladder of buckets; sequences and pages per sequence are fixed per bucket,
and the attention's cost follows the keys each sequence really has, not these bounds.
`precompile` compiles the whole set (runner/step_compiler.py); a compile after that is a bug,
warned about and counted. The KV pools are donated into every step, so they are updated in
place. One device-to-host copy per step: the sampled token ids. Page copies between tiers run
in fixed chunks of pages, one small program each (runner/page_programs.py).

With tensor_parallel > 1 the params and pools live on a mesh (pensieve_jax.model.parallel): the
step is jitted with NamedSharding in/out shardings, step inputs are replicated, and page
gathers / scatters for the host tier keep every device's KV heads on that device.

This is the device seam: the engine and the KV cache layer use only the methods below (a
runner without a device, tests/fake_runner.py, implements the same ones).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pensieve_jax.model import parallel
from pensieve_jax.model.attention import AttentionBatch, Incoming, KVCache
from pensieve_jax.model.llama import Llama
from pensieve_jax.runner.page_programs import PAGE_CHUNK, PageCopies, Pools, pages_to_host, put_pages
from pensieve_jax.runner.programs import (INCOMING_PAGES, ProgramSet, StepShape,
                                          single_decode_program, token_buckets)
from pensieve_jax.runner.step_compiler import EXECUTABLES, StepCompiler
from pensieve_jax.runner.step_program import (HostPages, StepHandle, StepInput,
                                              cpu_kernels_status, host_memory_kind, jit_step,
                                              kernel_interpret, runtime_params)
from pensieve_jax.weights import LoadedModel


def _pad(a: np.ndarray, shape: tuple[int, ...], fill=0) -> np.ndarray:
    out = np.full(shape, fill, dtype=a.dtype)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


def stage_incoming(incoming: HostPages, m: int, pools: Pools, sharding) -> Incoming:
    """Host pages, padded to m pages, in the step's host memory (sharding); ids replicated."""
    k, v = put_pages(incoming.k, incoming.v, m, sharding)
    ids = np.full(m, pools.num_pages, np.int32)   # padding pages are dropped
    ids[:len(incoming.page_ids)] = incoming.page_ids
    return Incoming(k, v, pools.replicate(ids))


class ModelRunner:
    def __init__(self, model: LoadedModel, num_pages: int, page_size: int, attention: str = "xla",
                 dtype=jnp.float32, tensor_parallel: int = 1, max_num_seqs: int = 64,
                 max_batched_tokens: int = 512, max_model_len: int = 4096,
                 token_ladder: tuple[int, ...] | None = None, layered_loads: bool = False,
                 cpu_kernels: bool = True):
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
        self.cpu_kernels = cpu_kernels_status(devices[0].platform, self.dtype, attention,
                                              cpu_kernels)   # "on", or "off: why"
        self.programs = ProgramSet(
            tuple(token_ladder) if token_ladder else token_buckets(
                max_batched_tokens, single=single_decode_program(devices[0].platform)),
            max_num_seqs, -(-max_model_len // page_size), INCOMING_PAGES if layered_loads else 0)
        # where swap-ins wait for a step that loads them layer by layer: pinned host memory
        # (the device copies it asynchronously) where the backend has it, else device memory
        host_kind = host_memory_kind(jax.devices()[0])
        param_sh = None
        self.pools = Pools(c, num_pages, page_size, self.dtype, self.mesh)
        if self.mesh is None:
            self.params = runtime_params(model.params, devices[0].platform)
            self._incoming_sharding = jax.sharding.SingleDeviceSharding(
                jax.devices()[0], memory_kind=host_kind)
        else:
            kv_sh = self.pools.kv_sharding
            param_sh = parallel.param_shardings(model.params, self.mesh)
            self.params = parallel.put(model.params, param_sh)
            self._incoming_sharding = kv_sh.with_memory_kind(host_kind) if host_kind else kv_sh
        self.real_tokens = 0          # token rows run, and the rows their programs padded them to
        self.padded_tokens = 0
        self.model = Llama(c, self.dtype, attention, self.mesh, interpret=self.interpret,
                           cpu_kernels=self.cpu_kernels == "on")
        mesh_ids = None if self.mesh is None else tuple(d.id for d in self.mesh.devices.flat)
        self.pages = PageCopies(self.pools, mesh_ids, EXECUTABLES)
        # two programs: plain steps, and steps that also load swapped-in pages layer by layer
        self.compiler = StepCompiler(
            self.programs, self.pools, (c, self.dtype.name, attention, num_pages, page_size,
                                        mesh_ids, self.cpu_kernels == "on"),
            jit_step(self.model, param_sh),
            jit_step(self.model, param_sh, None if self.mesh is None else self._incoming_sharding),
            lambda: self.params, self._incoming_sharding)
        self._zero_tokens = None

    @property
    def kv(self) -> KVCache | None:
        """The KV pools as they are now (each step and page copy replaces them)."""
        return self.pools.kv

    @kv.setter
    def kv(self, value: KVCache | None) -> None:
        self.pools.kv = value

    @property
    def ready(self) -> bool:
        return self.compiler.ready

    @property
    def in_step_load_error(self) -> str | None:
        """Why steps cannot load pages inside on this backend (None: they can)."""
        return self.compiler.in_step_load_error

    @property
    def compilations_after_ready(self) -> list[str]:
        return self.compiler.after_ready + self.pages.late

    def reset_kv(self) -> None:
        """Fresh zeroed pools (after a failed step donated the old ones)."""
        self.pools.reset()

    # -- page copies (runner/page_programs.py) ------------------------------------------------

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        self.pages.copy(pairs)

    def gather_pages(self, page_ids: list[int]) -> list[tuple[jax.Array, jax.Array]]:
        return self.pages.gather(page_ids)

    def gather_pages_host(self, page_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return self.pages.gather_host(page_ids)

    def scatter_pages(self, k: np.ndarray, v: np.ndarray, page_ids: list[int]) -> None:
        self.pages.scatter(k, v, page_ids)

    def stage_pages(self, k: np.ndarray, v: np.ndarray) -> list[tuple[jax.Array, jax.Array]]:
        return self.pages.stage(k, v)

    def scatter_staged(self, staged: list[tuple[jax.Array, jax.Array]],
                       page_ids: list[int]) -> None:
        self.pages.scatter_staged(staged, page_ids)

    # -- steps --------------------------------------------------------------------------------

    def precompile(self, progress: Callable[[StepShape, float], None] | None = None) -> None:
        """Compile every program of the set (steps, then page copies); progress(shape, seconds)
        after each step program. Marks the runner ready: a compile after this is a bug."""
        self.compiler.precompile(progress)
        self.pages.compile_all()
        self.compiler.ready = self.pages.ready = True

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
        args = self._padded(s, shape)
        if load:
            m = shape.incoming_pages
            if len(incoming.page_ids) > m:      # the rest goes in before the step
                self.scatter_pages(incoming.k[:, m:], incoming.v[:, m:], incoming.page_ids[m:])
                incoming = HostPages(incoming.k[:, :m], incoming.v[:, :m], incoming.page_ids[:m])
            staged = args + (stage_incoming(incoming, m, self.pools, self._incoming_sharding),)
            try:
                self.compiler.executable(shape)
                args, incoming = staged, None
            except Exception as e:  # noqa: BLE001 - a backend that cannot compile the load
                self.compiler.no_in_step_loads(e)
                shape = self.programs.shape_for(len(s.token_ids))
        if incoming is not None:
            self.scatter_pages(*incoming)
        executable = self.compiler.executable(shape)
        src = np.full(shape.tokens, -1, np.int32)
        if token_src is not None:
            src[:len(token_src)] = token_src
        replicate = self.pools.replicate
        feed = (self._no_tokens() if last is None else last.tokens, replicate(src))
        tokens, self.kv = executable(self.params, self.kv, *replicate(args[:9]), *feed,
                                     *args[9:])
        return StepHandle(tokens, num_seqs)

    def _padded(self, s: StepInput, shape: StepShape) -> tuple:
        """The step's host arrays padded to its program's shape (counted as real / padded)."""
        num_seqs = len(s.kv_lens)
        t, n, p = shape.tokens, shape.seqs, shape.pages_per_seq
        if num_seqs > n or s.page_table.shape[1] > p:
            raise ValueError(f"a step of {num_seqs} sequences x {s.page_table.shape[1]} pages "
                             f"does not fit its program ({n} x {p}: max_num_seqs, "
                             "max_model_len)")
        self.real_tokens += len(s.token_ids)
        self.padded_tokens += t
        cu = np.concatenate([s.cu_q_lens, np.full(n - num_seqs, s.cu_q_lens[-1])]).astype(np.int32)
        return (
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

    def _no_tokens(self) -> jax.Array:
        """last_tokens of a step that reads no earlier step's tokens: zeros, on the device."""
        if self._zero_tokens is None:
            zeros = np.zeros(self.programs.max_num_seqs, np.int32)
            self._zero_tokens = (jax.device_put(zeros, jax.devices()[0]) if self.mesh is None
                                 else self.pools.replicate(zeros))
        return self._zero_tokens

    def report_stats(self) -> dict[str, dict[str, Any]]:
        """programs: the program set and what compiling and padding cost (runner/seam.py)."""
        return {"programs": {
            "count": len(self.programs.shapes),
            "shapes": [dataclasses.asdict(x) for x in self.programs.shapes],
            "page_chunk": PAGE_CHUNK, "compiled": len(self.compiler.compiled),
            "cpu_kernels": self.cpu_kernels,
            "compile_s": round(self.compiler.compile_s, 3), "ready": self.ready,
            "step_programs_after_ready": len(self.compilations_after_ready),
            "real_tokens": self.real_tokens, "padded_tokens": self.padded_tokens}}


__all__ = ["HostPages", "ModelRunner", "StepHandle", "StepInput", "pages_to_host"]
