"""Which attention an engine runs, and the start-up self-check of the Pallas kernel.

`EngineConfig.attention` None means "pallas" where the engine's device is a GPU (the kernel is
compiled there) and "xla" elsewhere; `resolve_attention` is the one place that decides it.
Where the choice is "pallas" on a GPU, `select_attention` first runs the kernel and the XLA
path (`pensieve_jax.model.attention.xla_paged_attention`) on one tiny ragged batch on the engine's
device (a decode, a prefill, a prefill chunk over cached context; the model's head layout per
device, its page size and dtype) and compares them. On a mismatch, or an error in either call,
it logs at ERROR level and the engine falls back to "xla"; `Engine.stats()` reports the
attention in use (`attention`) and the check (`attention_check`).

    choice = select_attention(None, model.config, page_size=16, dtype="bfloat16")
    choice.attention            # "pallas" or "xla"
    choice.self_check           # SelfCheckResult, or None where no check ran

The kernel's `interpret` flag is passed explicitly, from the device's platform, never inferred
from the default backend. The helpers here (`random_problem`, `kernel_attention`,
`reference_attention`, `TOLERANCE`) are also what benchmarks/gpu_check.py and tests/test_gpu.py
compare the kernel with.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pensieve_jax.model.attention import (ATTENTION_BACKENDS, AttentionBatch, KVCache,
                                    xla_paged_attention)

log = logging.getLogger(__name__)

# Largest |kernel - reference| allowed per dtype, for inputs drawn from N(0, 1) (outputs are
# softmax-weighted means of such values). float32 is compared at matmul precision "highest"
# (on a GPU the default is TF32); bf16 / f16: both paths round p and the output to the dtype.
TOLERANCE = {"float32": 1e-4, "bfloat16": 4e-2, "float16": 1e-2}

# The self-check's batch: (new tokens, context tokens incl. them) per sequence.
CHECK_SEQS = ((1, 37), (19, 19), (9, 50))


class AttentionProblem(NamedTuple):
    """One attention call's inputs: q [T, H, D], pools stacked over layers, a layer, a batch."""

    q: jax.Array
    kv: KVCache
    layer: jax.Array
    batch: AttentionBatch
    sm_scale: float
    sliding_window: int | None = None


@dataclasses.dataclass(frozen=True)
class SelfCheckResult:
    """The kernel against the XLA path on one tiny batch."""

    ok: bool                        # within tolerance, and neither call raised
    platform: str                   # the device's platform ("gpu", "cpu", ...)
    device: str                     # its kind, e.g. "NVIDIA H200"
    dtype: str
    interpret: bool                 # the kernel ran in interpret mode
    max_abs_err: float | None       # None when a call raised
    tolerance: float
    seconds: float                  # both calls, compilation included
    error: str | None = None        # what raised, as "Type: message"


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    """What an engine was asked for and what it runs."""

    requested: str | None           # EngineConfig.attention (None: by platform)
    attention: str                  # the backend the runner uses
    platform: str
    self_check: SelfCheckResult | None = None   # None: no check was needed
    fallback: bool = False          # the check failed and the engine fell back to "xla"

    def as_dict(self) -> dict[str, Any]:
        """Plain values only."""
        return dataclasses.asdict(self)

    def report_stats(self) -> dict[str, Any]:
        """A Reporter (model/reporting.py): attention, the backend in use; attention_check,
        how it was chosen (as_dict: its GPU self-check, a fallback to "xla")."""
        return {"attention": self.attention, "attention_check": self.as_dict()}


# -- resolution --------------------------------------------------------------------------------

def device_platform(device: Any = None) -> str:
    """The platform of `device` (None: jax.devices()[0], the device an engine runs on)."""
    return (device if device is not None else jax.devices()[0]).platform


def resolve_attention(requested: str | None, platform: str) -> str:
    """The attention backend for EngineConfig.attention `requested` on `platform`: None means
    "pallas" on "gpu" and "xla" elsewhere. Raises ValueError for an unknown name."""
    if requested is None:
        return "pallas" if platform == "gpu" else "xla"
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r} "
                         f"(available: {sorted(ATTENTION_BACKENDS)}, or None: by platform)")
    return requested


def needs_self_check(attention: str, platform: str) -> bool:
    """The compiled kernel is checked before use: "pallas" on a GPU (interpreted elsewhere)."""
    return attention == "pallas" and platform == "gpu"


def select_attention(requested: str | None, model_config, page_size: int, dtype,
                     tensor_parallel: int = 1, device: Any = None,
                     check: Callable[..., SelfCheckResult] | None = None) -> AttentionChoice:
    """Resolve `requested` for the device and, where needed, self-check the kernel; falls
    back to "xla" (logging at ERROR) when the check fails. check: attention_self_check by
    default (tests pass another)."""
    device = device if device is not None else jax.devices()[0]
    platform = device_platform(device)
    attention = resolve_attention(requested, platform)
    if not needs_self_check(attention, platform):
        return AttentionChoice(requested, attention, platform)
    c = model_config
    window = c.sliding_window
    result = (check or attention_self_check)(
        c.num_heads // tensor_parallel, c.num_kv_heads // tensor_parallel, c.head_dim,
        page_size, dtype, device=device,
        **({} if window is None else {"sliding_window": check_window(window)}))
    if result.ok:
        log.info("attention self-check passed on %s (%s, max |err| %.2e <= %.0e, %.1f s): "
                 "using the Pallas kernel", result.device, result.dtype, result.max_abs_err,
                 result.tolerance, result.seconds)
        return AttentionChoice(requested, attention, platform, result)
    log.error("ATTENTION SELF-CHECK FAILED on %s (%s): the Pallas kernel %s; FALLING BACK TO "
              "THE XLA ATTENTION PATH (slower). Check: %s", result.device, result.dtype,
              f"raised {result.error}" if result.error else
              f"differs from the XLA path by {result.max_abs_err:.3e} > {result.tolerance:.0e}",
              result)
    return AttentionChoice(requested, "xla", platform, result, fallback=True)


def check_window(window: int) -> int:
    """The window the self-check runs a windowed model's kernel with: the model's, made short
    enough (at most 24 keys) that the check's contexts (up to 50 tokens) cross it."""
    return min(window, 24)


# -- the problem and the two calls --------------------------------------------------------------

def random_problem(num_heads: int, num_kv_heads: int, head_dim: int, page_size: int, dtype,
                   seqs: Sequence[tuple[int, int]] = CHECK_SEQS, num_layers: int = 2,
                   seed: int = 0, device: Any = None, spare_pages: int = 3,
                   pad_tokens: int = 0, sliding_window: int | None = None) -> AttentionProblem:
    """Random q and pools (N(0, 1)) for sequences of (new tokens, context tokens including
    them), each sequence's pages scattered over a shuffled pool; the last layer is read.
    pad_tokens: query rows past the last sequence's (a program's padding; outputs 0). Built
    with NumPy and placed on `device` (None: the default device)."""
    rng = np.random.default_rng(seed)
    pages_per_seq = max(-(-ctx // page_size) for _, ctx in seqs)
    num_pages = len(seqs) * pages_per_seq + spare_pages
    table = rng.permutation(num_pages)[:len(seqs) * pages_per_seq].reshape(len(seqs), -1)
    shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
    k, v = (rng.standard_normal(shape, np.float32) for _ in range(2))
    q_lens = [q for q, _ in seqs]
    q = rng.standard_normal((sum(q_lens) + pad_tokens, num_heads, head_dim), np.float32)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    put = lambda a, dt=None: jax.device_put(jnp.asarray(a, dt), device)  # noqa: E731
    batch = AttentionBatch(put(table, jnp.int32), put([c for _, c in seqs], jnp.int32),
                           put(cu, jnp.int32))
    return AttentionProblem(put(q, dtype), KVCache(put(k, dtype), put(v, dtype)),
                            put(num_layers - 1, jnp.int32), batch, head_dim ** -0.5,
                            sliding_window)


def kernel_attention(p: AttentionProblem, interpret: bool) -> jax.Array:
    """The Pallas kernel on the problem (interpret given explicitly)."""
    from pallas_kernels import ragged_paged_attention_stacked
    return ragged_paged_attention_stacked(p.q, p.kv.k, p.kv.v, p.layer, *p.batch,
                                          sm_scale=p.sm_scale, interpret=interpret,
                                          sliding_window=p.sliding_window)


_xla = jax.jit(xla_paged_attention, static_argnames=("sm_scale", "sliding_window", "mesh"))


def xla_attention(p: AttentionProblem) -> jax.Array:
    """The XLA attention path on the problem."""
    return _xla(p.q, p.kv, p.layer, p.batch, sm_scale=p.sm_scale,
                sliding_window=p.sliding_window)


@functools.cache
def _reference():
    from pallas_kernels import ragged_paged_attention_reference
    return jax.jit(ragged_paged_attention_reference,
                   static_argnames=("sm_scale", "interpret", "sliding_window"))


def reference_attention(p: AttentionProblem) -> jax.Array:
    """The kernel's plain-jnp reference (float32 inside) on the problem's layer, one sequence
    at a time over that sequence's own pages (the reference holds [tokens, context, heads,
    head_dim] in float32: gigabytes for a whole batch of long sequences); padding rows 0."""
    layer = int(p.layer)
    k, v = p.kv.k[layer], p.kv.v[layer]
    cu = np.asarray(p.batch.cu_q_lens)
    kv_lens, table = np.asarray(p.batch.kv_lens), np.asarray(p.batch.page_table)
    page_size = k.shape[1]
    out = jnp.zeros(p.q.shape, p.q.dtype)
    for s in range(len(kv_lens)):
        lo, hi = int(cu[s]), int(cu[s + 1])
        if hi == lo:
            continue
        pages = max(1, -(-int(kv_lens[s]) // page_size))
        one = _reference()(
            p.q[lo:hi], k, v, jnp.asarray(table[s:s + 1, :pages]),
            jnp.asarray(kv_lens[s:s + 1]), jnp.asarray([0, hi - lo], jnp.int32),
            sm_scale=p.sm_scale, sliding_window=p.sliding_window)
        out = out.at[lo:hi].set(one)
    return out


def max_abs_err(a: jax.Array, b: jax.Array) -> float:
    """max |a - b| in float32 (inf where either has a NaN)."""
    d = jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))
    return float(jnp.where(jnp.isnan(d), jnp.inf, d).max())


def tolerance(dtype) -> float:
    """TOLERANCE of a dtype (float32's bound for dtypes it does not list)."""
    return TOLERANCE.get(jnp.dtype(dtype).name, TOLERANCE["float32"])


# -- the check ---------------------------------------------------------------------------------

def attention_self_check(num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                         dtype, device: Any = None,
                         candidate: Callable[[AttentionProblem, bool], jax.Array] | None = None,
                         sliding_window: int | None = None) -> SelfCheckResult:
    """The kernel (candidate; kernel_attention by default) against the XLA path on one tiny
    batch on `device`, float32 at matmul precision "highest". Never raises: an error in either
    call is the result's `error`."""
    device = device if device is not None else jax.devices()[0]
    platform, name = device_platform(device), jnp.dtype(dtype).name
    interpret = platform != "gpu"
    start = time.perf_counter()
    err, error = None, None
    try:
        with jax.default_matmul_precision("highest"):
            p = random_problem(num_heads, num_kv_heads, head_dim, page_size, dtype,
                               device=device, sliding_window=sliding_window)
            got = (candidate or kernel_attention)(p, interpret)
            want = xla_attention(p)
            err = max_abs_err(got, want)
    except Exception as e:          # a failed lowering or launch is a failed check
        error = f"{type(e).__name__}: {e}"[:2000]
    tol = tolerance(dtype)
    return SelfCheckResult(ok=error is None and err is not None and err <= tol,
                           platform=platform, device=str(device.device_kind), dtype=name,
                           interpret=interpret, max_abs_err=err, tolerance=tol,
                           seconds=round(time.perf_counter() - start, 3), error=error)
