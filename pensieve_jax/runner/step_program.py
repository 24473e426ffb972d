"""One step program: the model over a step's token rows, then a sampled token per sequence.

The functions here take abstract arguments too, so the programs the runner compiles and those
compiled ahead of time for another machine (benchmarks/aot_compile.py) are the same; the
records are what crosses the device seam (StepInput in, StepHandle / tokens out).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import cpu_kernels
import jax
import jax.numpy as jnp
import numpy as np

from pensieve_jax.model import parallel
from pensieve_jax.model.attention import AttentionBatch, Incoming, KVCache
from pensieve_jax.model.llama import Llama, unstack_kernels
from pensieve_jax.runner.programs import StepShape
from pensieve_jax.runner.sampler import sample


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
    kernels become arrays of their own (model/llama.py's `unstack_kernels`, under
    "layer_kernels"): XLA CPU copies a layer's slice of a stacked kernel before its dot, a
    second pass over the weights that cost decode about a sixth of its time. Elsewhere as loaded (stacked): a GPU's
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
    """The step program `step` for `shape`, traced and exported (program_store keeps it). The
    CPU kernels' custom call is allowed: a process that loads the program registers it first
    (the runner loads cpu_kernels before any step program)."""
    allowed = [jax.export.DisabledSafetyCheck.custom_call(cpu_kernels.DECODE_ATTENTION)]
    with _precision(kv):
        return jax.export.export(step, disabled_checks=allowed)(params, kv,
                                                                *step_args(kv, shape))


def cpu_kernels_status(platform: str, dtype, attention: str, wanted: bool = True) -> str:
    """Whether a runner's steps use the CPU kernels (cpu_kernels/): "on", or "off: why"."""
    if not wanted:
        return "off: not asked for (ModelRunner(cpu_kernels=False))"
    if platform != "cpu" or jnp.dtype(dtype) != jnp.float32 or attention != "xla":
        return f"off: {platform}, {jnp.dtype(dtype).name}, {attention} attention (they serve " \
               "float32 xla attention on a CPU)"
    return cpu_kernels.status()


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
