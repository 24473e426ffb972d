"""The Pallas kernel alone, compiled for a target over a sweep of page sizes, head layouts,
token mixes (decode-only, mixed, prefill), dtypes and sliding windows (full; ci: a subset;
smoke: one small case).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from benchmarks.aot_lib.compile import compile_program
from benchmarks.aot_lib.targets import Target
from pensieve_jax.runner.step_program import kernel_interpret


@dataclasses.dataclass(frozen=True)
class KernelCase:
    page_size: int
    heads: int
    kv_heads: int
    head_dim: int
    mix: str                  # "decode", "mixed", "prefill"
    dtype: str
    tokens: int
    seqs: int
    precision: str = "default"   # jax.default_matmul_precision while tracing: float32 dots
                                 # run TF32 by default, IEEE fp32 with "highest" (what the
                                 # runner sets for float32 programs)
    max_model_len: int = 4096
    num_pages: int = 2048
    sliding_window: int | None = None    # Mistral-style: keys older than this are not read

    @property
    def name(self) -> str:
        kind = self.dtype + ("" if self.precision == "default" else f"/{self.precision}")
        window = "" if self.sliding_window is None else f" window={self.sliding_window}"
        return (f"kernel p{self.page_size} h{self.heads}/{self.kv_heads} d{self.head_dim} "
                f"{self.mix} T={self.tokens} S={self.seqs} {kind}{window}")


MIXES = {"decode": (64, 64), "mixed": (256, 64), "prefill": (512, 4)}
HEAD_LAYOUTS = ((32, 8, 128), (8, 8, 64), (16, 4, 128), (64, 8, 128))
SWEEPS = ("full", "ci", "smoke")


def kernel_cases(sweep: str = "full") -> list[KernelCase]:
    """full: page sizes 16/32/64 x head layouts x token mixes x bf16 / f32 (TF32), and f32 with
    precision highest at page size 16; ci: page size 16, three layouts, bf16 / f32; smoke: one
    small config."""
    if sweep == "smoke":
        return [KernelCase(16, 8, 2, 64, "mixed", "bfloat16", 32, 4, max_model_len=256,
                           num_pages=64)]
    pages, layouts = ((16,), HEAD_LAYOUTS[:3]) if sweep == "ci" else ((16, 32, 64), HEAD_LAYOUTS)
    cases = [KernelCase(p, h, kvh, d, mix, dt, *MIXES[mix])
             for p in pages for h, kvh, d in layouts for mix in MIXES
             for dt in ("bfloat16", "float32")]
    if sweep == "full":
        cases += [KernelCase(16, h, kvh, d, mix, "float32", *MIXES[mix], precision="highest")
                  for h, kvh, d in layouts for mix in MIXES]
    if sweep in ("full", "ci"):     # the sliding window (Mistral 7B v0.1: 4096; a small one)
        cases += [KernelCase(16, 32, 8, 128, mix, "bfloat16", *MIXES[mix], sliding_window=w,
                             max_model_len=8192, num_pages=4096)
                  for w in (4096, 64) for mix in MIXES]
    return cases


def lower_kernel(case: KernelCase, device):
    """The kernel alone on one layer of a pool (interpret from the device's platform)."""
    from pallas_kernels import ragged_paged_attention_stacked
    sharding = SingleDeviceSharding(device)
    dt = jnp.dtype(case.dtype)
    spec = lambda shape, d: jax.ShapeDtypeStruct(shape, d, sharding=sharding)  # noqa: E731
    pages_per_seq = -(-case.max_model_len // case.page_size)
    pool = spec((2, case.num_pages, case.page_size, case.kv_heads, case.head_dim), dt)
    args = (spec((case.tokens, case.heads, case.head_dim), dt), pool, pool,
            spec((), jnp.int32), spec((case.seqs, pages_per_seq), jnp.int32),
            spec((case.seqs,), jnp.int32), spec((case.seqs + 1,), jnp.int32))
    interpret = kernel_interpret([device])
    fn = jax.jit(lambda *a: ragged_paged_attention_stacked(
        *a, interpret=interpret, sliding_window=case.sliding_window))
    with jax.default_matmul_precision(case.precision):
        return fn.lower(*args)


def kernel_programs(target: Target, ptxas: str | None, log, sweep: str) -> list:
    device = target.devices(1)[0]
    rows = []
    for case in kernel_cases(sweep):
        rows.append(log(compile_program(case.name, "kernel", target,
                                        lambda case=case: lower_kernel(case, device),
                                        needs_triton=True, ptxas=ptxas,
                                        case=dataclasses.asdict(case),
                                        interpret=kernel_interpret([device]))))
    return rows
