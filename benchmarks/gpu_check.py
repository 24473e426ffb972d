"""The first thing to run on a GPU: one command, at most --budget-s seconds (8 minutes on an
H200 by default), that shows what only a GPU can show, and what the CPU-only machines cannot.

    python benchmarks/gpu_check.py --out OUT                 # on the GPU
    python benchmarks/gpu_check.py --out OUT --dry-run       # anywhere (CI): tiny shapes, the
                                                             # kernels interpreted, random:tiny
    python benchmarks/gpu_check.py --out OUT --phases kernel engine     # some phases only

Phases, in this order, each in a process of its own (a crash, a hang or the GPU memory of one
cannot touch the next) under its own time budget, a share of --budget-s (time a phase leaves
unused goes to the next ones); a phase past its budget is killed. Each writes OUT/<phase>.json
as it goes (`"complete": false` until it ends; a killed phase's file keeps what it finished, with
the error) and OUT/summary.json is rewritten after every phase, so a run killed from outside
keeps every phase it finished. A phase's exception is recorded in its file (`error`) and the
next phase runs.

  environment      python, jax/jaxlib and plugin versions, devices, memory kinds and sizes,
                   nvidia-smi.
  kernel           the compiled ragged paged attention kernel (interpret=False on a GPU) against
                   its plain-jnp reference on ragged mixed batches (decodes, prefills, chunks
                   over cached context, padding rows) in several head layouts: float32 at matmul
                   precision "highest" (a GPU's default is TF32) and bfloat16, each within
                   pensieve_jax.model.self_check.TOLERANCE; whether the lowered program holds the
                   Triton call; and on decode (batch 64, 4k context, 32/8 heads, d128, bf16)
                   against JAX's own Pallas `paged_attention`: both errors and both times.
  decode_bandwidth a device-to-device copy's bandwidth (bytes read + written; and a bf16 matmul)
                   first, then the decode kernel at that shape (bench_kernels.run_case: with
                   dense contiguous attention, the XLA paged path and JAX's paged attention
                   beside it) as GB/s read and as % of the copy's bandwidth.
  prefill          512 new tokens over 4k cached and a 4k prompt from scratch, paged (the kernel)
                   against contiguous dense attention (jax.nn.dot_product_attention: XLA, and
                   cuDNN where it runs), errors against dense float32.
  swap             host <-> device page copies of the llama3-8b page shape (bench_swap.measure)
                   and how much of a swap-in's copy one step hides, both swap-in modes
                   (bench_swap_overlap.measure).
  engine           the engine, stateful against stateless, on a ShareGPT-shaped multi-turn
                   replay of random:llama3-8b bf16 at two loads (benchmarks/multiturn_lib):
                   throughput at equal p90 normalized latency, TTFT by turn, whether both
                   policies produced the same tokens, and the attention the engine chose (its
                   start-up self-check).

Timing: median wall time of blocking calls after warm-up (bench_kernels.timeit). Numbers from a
--dry-run mean nothing (interpret mode, tiny shapes, XLA at optimization level 0 to compile
faster): it exists so that this script runs end to end in CI and cannot rot
(tests/benchmarks/test_gpu_check.py). The GPU command line: benchmarks/README.md, "GPU check".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

# Phases and their shares of --budget-s (at 480 s: 14, 67, 38, 38, 82, 240 seconds).
PHASES: dict[str, float] = {"environment": 0.03, "kernel": 0.14, "decode_bandwidth": 0.08,
                            "prefill": 0.08, "swap": 0.17, "engine": 0.50}
# What each phase's JSON holds besides the common keys (tests/benchmarks/test_gpu_check.py).
COMMON_KEYS = ("phase", "ok", "error", "complete", "seconds", "budget_s", "dry_run", "backend",
               "device", "interpret", "headline")
PHASE_KEYS: dict[str, tuple[str, ...]] = {
    "environment": ("python", "jax", "jaxlib", "devices", "memory_kinds", "packages",
                    "nvidia_smi"),
    "kernel": ("cases", "decode_vs_jax", "all_within_tolerance", "triton_in_program"),
    "decode_bandwidth": ("ceilings", "decode", "pct_of_copy_bandwidth"),
    "prefill": ("cases",),
    "swap": ("bandwidth", "overlap"),
    "engine": ("model", "workload", "points", "stateful_vs_stateless_at_equal_p90_latency",
               "ttft_by_turn", "attention"),
}


# -- results on disk ---------------------------------------------------------------------------

def _plain(o: Any) -> Any:
    """json default: NumPy scalars as numbers, anything else as its str."""
    item = getattr(o, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return str(o)


def save_json(path: Path, obj: dict) -> None:
    """Write atomically (a kill mid-write leaves the previous file)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_plain) + "\n")
    os.replace(tmp, path)


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def error_text(e: BaseException) -> str:
    """'Type: message' and the innermost frames, short enough for a results file."""
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return (f"{type(e).__name__}: {e}"[:1500] + "\n" + "".join(tb[-3:])[-1500:]).strip()


# -- one phase, in its own process -------------------------------------------------------------

@dataclasses.dataclass
class Phase:
    """What a phase function gets: where to write, the deadline and the mode; `result` is its
    JSON, saved (incomplete) at each save() and completed by run_phase."""

    name: str
    out: Path
    dry_run: bool
    deadline: float              # time.time() by which the phase must have finished
    budget_s: float
    interpret: bool = True
    result: dict = dataclasses.field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.time()

    def has_time(self, need_s: float, what: str) -> bool:
        """Whether need_s seconds are left; if not, record `what` as skipped."""
        if self.left() >= need_s:
            return True
        self.result.setdefault("skipped", []).append(
            f"{what}: {self.left():.0f} s left of the budget, about {need_s:.0f} s needed")
        self.save()
        return False

    def save(self) -> None:
        save_json(self.out / f"{self.name}.json", self.result)


def run_phase(name: str, out: Path, dry_run: bool, deadline: float, budget_s: float) -> dict:
    """Run one phase here; its exception (a backend that fails to start included) is recorded,
    never raised."""
    ph = Phase(name, out, dry_run, deadline, budget_s)
    ph.result = {"phase": name, "ok": False, "error": None, "complete": False, "seconds": None,
                 "budget_s": round(budget_s, 1), "dry_run": dry_run, "backend": None,
                 "device": None, "interpret": None, "headline": {}}
    if name == "environment":       # what needs no jax first: kept if the backend fails
        ph.result.update(host_facts())
    ph.save()
    start = time.perf_counter()
    try:
        start_backend(ph)
        ph.result.update(PHASE_FUNCTIONS[name](ph))
        ph.result["ok"] = True
    except Exception as e:  # recorded; the next phase runs
        ph.result["error"] = error_text(e)
        print(f"[gpu_check] {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    ph.result["seconds"] = round(time.perf_counter() - start, 2)
    ph.result["complete"] = True
    ph.save()
    return ph.result


def start_backend(ph: Phase) -> None:
    """Start jax's backend and record it; the kernels are interpreted in a dry run and off a
    GPU, compiled on one (explicit, from the backend this phase runs on)."""
    import jax
    if ph.name != "environment":    # (which needs no more than jax)
        from pensieve_jax.runner import compile_cache
        compile_cache.enable()      # phases that compile the same program share it
    backend = jax.default_backend()
    ph.interpret = ph.dry_run or backend != "gpu"
    ph.result.update(backend=backend, device=str(jax.devices()[0].device_kind),
                     interpret=ph.interpret)
    ph.save()


# -- a: environment ----------------------------------------------------------------------------

PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
            "jax-cuda12-pjrt", "flax", "numpy", "ml-dtypes", "orbax-checkpoint", "tokenizers",
            "grpcio", "protobuf", "gguf", "triton", "nvidia-cudnn-cu13", "nvidia-cuda-nvcc")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    from importlib import metadata
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def nvidia_smi() -> str | None:
    """nvidia-smi's report (None where there is none)."""
    try:
        r = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        return (r.stdout + r.stderr).strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def host_facts() -> dict:
    """Python, the packages and nvidia-smi: what can be read before jax starts."""
    env = {k: os.environ.get(k) for k in ("JAX_PLATFORMS", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES",
                                          "XLA_PYTHON_CLIENT_PREALLOCATE",
                                          "XLA_PYTHON_CLIENT_MEM_FRACTION") if k in os.environ}
    return {"python": sys.version, "executable": sys.executable, "packages": package_versions(),
            "env": env, "nvidia_smi": nvidia_smi()}


def phase_environment(ph: Phase) -> dict:
    import jax
    import jaxlib
    from common import environment
    dev = jax.devices()[0]
    try:
        memory_kinds = [m.kind for m in dev.addressable_memories()]
    except (AttributeError, NotImplementedError):
        memory_kinds = []
    out = {**environment(None, __file__), "python": sys.version, "jaxlib": jaxlib.__version__,
           "devices": [str(d) for d in jax.devices()], "memory_kinds": memory_kinds,
           "memory_stats": dev.memory_stats()}
    out["headline"] = {"device": out["device"], "num_devices": out["num_devices"],
                       "jax": out["jax"], "python": sys.version.split()[0],
                       "pinned_host": "pinned_host" in memory_kinds}
    return out


# -- b: the kernel against its reference and JAX's paged attention -------------------------------

def kernel_layouts(dry: bool) -> list[tuple[int, int, int, int]]:
    """(q heads, KV heads, head_dim, page_size): Llama-3-8B, SmolLM2-135M (group 3), MHA."""
    if dry:
        return [(4, 2, 16, 4)]
    return [(32, 8, 128, 16), (9, 3, 64, 16), (32, 32, 128, 16)]


def kernel_seqs(dry: bool) -> tuple[tuple[int, int], ...]:
    """(new tokens, context incl. them): decodes, a prefill, chunks over cached context, an
    empty row."""
    if dry:
        return ((1, 37), (19, 19), (9, 50), (0, 0))
    return ((1, 4096), (1, 777), (384, 384), (128, 3000), (17, 33), (0, 0))


def triton_in_lowered(p, interpret: bool) -> bool:
    """Whether the kernel's lowered program holds the Triton custom call (a program built
    with the interpreter compiles too, without it)."""
    from pallas_kernels import ragged_paged_attention_stacked
    text = ragged_paged_attention_stacked.lower(p.q, p.kv.k, p.kv.v, p.layer, *p.batch,
                                                sm_scale=p.sm_scale,
                                                interpret=interpret).as_text()
    return "triton" in text.lower()


def kernel_case(layout, dtype: str, seqs, interpret: bool) -> dict:
    """The kernel against the reference on one ragged batch (precision highest)."""
    import jax
    from pensieve_jax.model import self_check as sc
    heads, kv_heads, head_dim, page_size = layout
    with jax.default_matmul_precision("highest"):
        p = sc.random_problem(heads, kv_heads, head_dim, page_size, dtype, seqs, seed=1,
                              pad_tokens=5)
        got = jax.block_until_ready(sc.kernel_attention(p, interpret))
        want = sc.reference_attention(p)
        err = sc.max_abs_err(got, want)
        pad_zero = bool((got[int(p.batch.cu_q_lens[-1]):] == 0).all())
    tol = sc.tolerance(dtype)
    return {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "page_size": page_size,
            "dtype": dtype, "seqs": [list(s) for s in seqs], "max_abs_err": err,
            "tolerance": tol, "padding_rows_zero": pad_zero,
            "ok": err <= tol and pad_zero}


def decode_shape(dry: bool) -> dict:
    """The decode case of the issue: batch 64, 4k context, 32/8 heads, d128, pages of 16."""
    if dry:
        return dict(batch=2, ctx=32, heads=4, kv_heads=2, head_dim=16, page_size=8)
    return dict(batch=64, ctx=4096, heads=32, kv_heads=8, head_dim=128, page_size=16)


def jax_paged_decode(interpret: bool, pages_per_seq: int, page_size: int) -> Callable:
    """JAX's Pallas paged_attention (GPU decode kernel) on pools in its layout [KVH, pages,
    page, D] (head_major), with splits and compute blocks that divide the page-table width (as
    bench_kernels). It does not scale the logits: q is scaled by head_dim ** -0.5 first (a
    multiply, timed with it)."""
    import jax
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
    splits = max(d for d in (1, 2, 4, 8, 16) if pages_per_seq % d == 0)
    ppcb = max(d for d in (1, 2, 4, 8) if d <= max(1, 64 // page_size)
               and (pages_per_seq // splits) % d == 0)

    def run(q, k_heads, v_heads, table, lens):
        q = (q * q.shape[-1] ** -0.5).astype(q.dtype)
        return paged_attention(q, k_heads, v_heads, table, lens, pages_per_compute_block=ppcb,
                               k_splits=splits, interpret=interpret)
    return jax.jit(run)


def head_major(pages):
    """[pages, page, KVH, D] -> JAX paged_attention's [KVH, pages, page, D] (a copy)."""
    return pages.transpose(2, 0, 1, 3)


def decode_vs_jax(ph: Phase) -> dict:
    """Ours, JAX's paged attention and the reference on the decode shape: errors and times."""
    import jax
    import jax.numpy as jnp
    from bench_kernels import make, timeit
    from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference
    s = decode_shape(ph.dry_run)
    q, k, v, table, kv_lens, cu = make(s["batch"], 1, s["ctx"], s["heads"], s["kv_heads"],
                                       s["head_dim"], s["page_size"], jnp.bfloat16, seed=3)
    ours = jax.jit(lambda *a: ragged_paged_attention(*a, interpret=ph.interpret))
    theirs = jax_paged_decode(ph.interpret, table.shape[1], s["page_size"])
    ref = jax.jit(ragged_paged_attention_reference)(q, k, v, table, kv_lens, cu)
    row: dict[str, Any] = {**s, "dtype": "bfloat16"}
    from pensieve_jax.model.self_check import max_abs_err, tolerance
    iters = 2 if ph.dry_run else 30
    row["ours_max_abs_err"] = max_abs_err(ours(q, k, v, table, kv_lens, cu), ref)
    row["ours_s"] = timeit(ours, q, k, v, table, kv_lens, cu, iters=iters)
    ph.result["decode_vs_jax"] = row
    ph.save()
    kh, vh = head_major(k), head_major(v)           # their layout, made outside the timing
    row["jax_max_abs_err"] = max_abs_err(theirs(q, kh, vh, table, kv_lens), ref)
    row["jax_s"] = timeit(theirs, q, kh, vh, table, kv_lens, iters=iters)
    row["tolerance"] = tolerance("bfloat16")
    row["ok"] = max(row["ours_max_abs_err"], row["jax_max_abs_err"]) <= row["tolerance"]
    row["ours_speedup_vs_jax"] = row["jax_s"] / row["ours_s"]
    return row


def phase_kernel(ph: Phase) -> dict:
    cases = ph.result.setdefault("cases", [])
    for layout in kernel_layouts(ph.dry_run):
        for dtype in ("float32", "bfloat16"):
            if not ph.has_time(3 if ph.dry_run else 8, f"kernel case {layout} {dtype}"):
                continue
            try:
                cases.append(kernel_case(layout, dtype, kernel_seqs(ph.dry_run), ph.interpret))
            except Exception as e:  # one layout failing says something; go on with the rest
                cases.append({"layout": list(layout), "dtype": dtype, "ok": False,
                              "error": error_text(e)})
            ph.save()
    from pensieve_jax.model.self_check import random_problem
    p = random_problem(*kernel_layouts(ph.dry_run)[0], "bfloat16")
    ph.result["triton_in_program"] = triton_in_lowered(p, ph.interpret)
    ph.save()
    row = decode_vs_jax(ph) if ph.has_time(5 if ph.dry_run else 20, "decode vs JAX") else None
    all_ok = bool(cases) and all(c.get("ok") for c in cases)
    worst = {d: max((c["max_abs_err"] for c in cases if c.get("dtype") == d
                     and "max_abs_err" in c), default=None) for d in ("float32", "bfloat16")}
    return {"cases": cases, "decode_vs_jax": row, "all_within_tolerance": all_ok,
            "headline": {"all_within_tolerance": all_ok, "worst_max_abs_err": worst,
                         "triton_in_program": ph.result["triton_in_program"],
                         "decode_ours_ms": row and row["ours_s"] * 1e3,
                         "decode_jax_ms": row and row["jax_s"] * 1e3,
                         "decode_ok": row and row["ok"]}}


# -- c: decode bandwidth against the copy bandwidth ------------------------------------------------

def phase_decode_bandwidth(ph: Phase) -> dict:
    from bench_kernels import ceilings, run_case
    iters = 2 if ph.dry_run else 30
    ceil = ceilings(iters, ph.dry_run)
    ph.result["ceilings"] = ceil
    ph.save()
    s = decode_shape(ph.dry_run)
    args = SimpleNamespace(heads=s["heads"], kv_heads=s["kv_heads"], head_dim=s["head_dim"],
                           page_size=s["page_size"])
    row = run_case("decode", s["batch"], 1, s["ctx"], args, iters, ph.interpret)
    pct = 100 * row["GBps"] / ceil["copy_GBps"]
    return {"ceilings": ceil, "decode": row, "pct_of_copy_bandwidth": pct,
            "headline": {"copy_GBps": ceil["copy_GBps"], "decode_GBps": row["GBps"],
                         "pct_of_copy_bandwidth": pct, "decode_ms": row["ours_s"] * 1e3,
                         "matmul_bf16_TFLOPs": ceil["matmul_bf16_TFLOPs"]}}


# -- d: prefill over paged context against contiguous dense ----------------------------------------

def prefill_cases(dry: bool) -> list[tuple[str, int, int]]:
    """(name, new tokens, context incl. them), one sequence."""
    if dry:
        return [("chunk", 32, 96)]
    return [("chunk_512_over_4096", 512, 4608), ("full_4096", 4096, 4096)]


def prefill_case(name: str, q_len: int, ctx: int, ph: Phase) -> dict:
    import jax
    import jax.numpy as jnp
    from bench_kernels import contiguous, make, timeit
    from pallas_kernels import ragged_paged_attention
    from pensieve_jax.model.self_check import max_abs_err
    s = decode_shape(ph.dry_run)
    heads, kv_heads, head_dim, page_size = s["heads"], s["kv_heads"], s["head_dim"], s["page_size"]
    q, k, v, table, kv_lens, cu = make(1, q_len, ctx, heads, kv_heads, head_dim, page_size,
                                       jnp.bfloat16, seed=4)
    qd, kc, vc = contiguous(q, k, v, table, kv_lens, cu, 1, q_len)
    pos = ctx - q_len + jnp.arange(q_len)
    mask = (jnp.arange(ctx)[None, :] <= pos[:, None])[None, None]          # [1, 1, q, ctx]
    ours = jax.jit(lambda *a: ragged_paged_attention(*a, interpret=ph.interpret))
    dense = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(a, b, c, mask=mask))
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        want = dense(f32(qd), f32(kc), f32(vc))[0]                           # [q, H, D]
    iters = 2 if ph.dry_run else 20
    row: dict[str, Any] = {"case": name, "q_len": q_len, "ctx": ctx, "heads": heads,
                           "kv_heads": kv_heads, "head_dim": head_dim, "page_size": page_size,
                           "dtype": "bfloat16"}
    row["ours_max_abs_err"] = max_abs_err(ours(q, k, v, table, kv_lens, cu), want)
    row["ours_s"] = timeit(ours, q, k, v, table, kv_lens, cu, iters=iters)
    row["dense_xla_s"] = timeit(dense, qd, kc, vc, iters=iters)
    row["dense_xla_over_ours"] = row["dense_xla_s"] / row["ours_s"]
    if ph.result["backend"] == "gpu":        # cuDNN's fused attention, where it takes the case
        try:
            causal = dict(is_causal=True) if q_len == ctx else dict(mask=mask)
            cudnn = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(
                a, b, c, implementation="cudnn", **causal))
            row["dense_cudnn_max_abs_err"] = max_abs_err(cudnn(qd, kc, vc)[0], want)
            row["dense_cudnn_s"] = timeit(cudnn, qd, kc, vc, iters=iters)
            row["dense_cudnn_over_ours"] = row["dense_cudnn_s"] / row["ours_s"]
        except Exception as e:  # not every shape or mask is supported
            row["dense_cudnn_error"] = f"{type(e).__name__}: {e}"[:500]
    flops = 4 * heads * head_dim * q_len * (ctx - (q_len - 1) / 2)
    row["ours_TFLOPs"] = flops / row["ours_s"] / 1e12
    return row


def phase_prefill(ph: Phase) -> dict:
    cases = ph.result.setdefault("cases", [])
    for name, q_len, ctx in prefill_cases(ph.dry_run):
        if ph.has_time(3 if ph.dry_run else 10, f"prefill {name}"):
            cases.append(prefill_case(name, q_len, ctx, ph))
            ph.save()
    return {"cases": cases, "headline": {
        c["case"]: {"ours_ms": c["ours_s"] * 1e3, "dense_xla_over_ours": c["dense_xla_over_ours"],
                    "dense_cudnn_over_ours": c.get("dense_cudnn_over_ours"),
                    "ours_TFLOPs": c["ours_TFLOPs"], "max_abs_err": c["ours_max_abs_err"]}
        for c in cases}}


# -- e: host <-> device swaps ----------------------------------------------------------------------

def swap_settings(dry: bool) -> dict:
    if dry:
        return dict(preset="tiny", dtype="float32", pool_pages=16, batches=[4], repeats=1,
                    seqs=2, context=16, overlap_batches=[8])
    return dict(preset="llama3-8b", dtype="bfloat16", pool_pages=256, batches=[8, 32, 128],
                repeats=5, seqs=16, context=512, overlap_batches=[32, 128])


def overlap_runner(s: dict, attention: str):
    """A ModelRunner of the preset's shape with random weights, for bench_swap_overlap.measure
    (as its main builds it): the step programs that load pages layer by layer included."""
    import jax.numpy as jnp
    from bench_swap_overlap import step_input
    from pensieve_jax.model.config import PRESETS
    from pensieve_jax.runner.model_runner import ModelRunner
    from pensieve_jax.tokenizer import Tokenizer
    from pensieve_jax.weights import LoadedModel, random_params
    config, dtype = PRESETS[s["preset"]], jnp.dtype(s["dtype"])
    model = LoadedModel(config, random_params(config, dtype),
                        Tokenizer.byte_level(config.vocab_size), f"random:{s['preset']}")
    step = step_input(s["seqs"], s["context"], 1, 16, config.vocab_size)
    used = step.page_table.size
    runner = ModelRunner(model, used + max(s["overlap_batches"]), 16, attention, dtype,
                         max_num_seqs=s["seqs"], max_batched_tokens=len(step.token_ids),
                         max_model_len=s["context"] + 1, layered_loads=True)
    return runner, step, used


def phase_swap(ph: Phase) -> dict:
    import jax.numpy as jnp
    import bench_swap
    import bench_swap_overlap
    from pensieve_jax.model.config import PRESETS
    from pensieve_jax.model.self_check import resolve_attention
    s = swap_settings(ph.dry_run)
    c = PRESETS[s["preset"]]
    bw = bench_swap.measure(c.num_layers, 16, c.num_kv_heads, c.head_dim, jnp.dtype(s["dtype"]),
                            s["pool_pages"], s["batches"], s["repeats"])
    ph.result.update(settings=s, bandwidth=bw)
    ph.save()
    overlap = None
    if ph.has_time(5 if ph.dry_run else 40, "swap overlap"):
        attention = resolve_attention(None, ph.result["backend"])
        runner, step, used = overlap_runner(s, attention)
        rows = bench_swap_overlap.measure(runner, step, used, s["overlap_batches"], s["repeats"])
        overlap = {"attention": attention, "incoming_pages": runner.programs.incoming_pages,
                   "in_step_load_error": runner.in_step_load_error, "rows": rows}
    big = bw["batches"][-1]
    return {"settings": s, "bandwidth": bw, "overlap": overlap, "headline": {
        "pages": big["pages"], "h2d_GBps": big["h2d_GBps"], "d2h_GBps": big["d2h_GBps"],
        "h2d_pinned_GBps": big.get("h2d_pinned_GBps"),
        "hidden": overlap and {r["pages"]: {"layered": r["layered_hidden"],
                                            "next_step": r["next_step_hidden"]}
                               for r in overlap["rows"]}}}


# -- f: the engine, stateful against stateless -----------------------------------------------------

def engine_argv(dry: bool) -> list[str]:
    """benchmarks/multiturn.py arguments of the replay (its parser gives the defaults)."""
    if dry:
        return ["--model", "random:tiny", "--dtype", "float32", "--conversations", "3",
                "--scale", "0.05", "--max-context", "120", "--users", "1", "2",
                "--think-time", "0", "--max-batched-tokens", "8", "--page-size", "16",
                "--max-model-len", "256", "--max-num-seqs", "2"]
    return ["--model", "random:llama3-8b", "--dtype", "bfloat16", "--conversations", "16",
            "--scale", "0.5", "--max-context", "2048", "--max-turns", "8", "--users", "4", "16",
            "--think-time", "0.2", "--max-batched-tokens", "256", "--page-size", "16",
            "--max-model-len", "2304", "--max-num-seqs", "16",
            "--engine-option", f"kv_cache_bytes={8 << 30}"]


def point_summary(p: dict) -> dict:
    """A measured point without its per-turn records and outputs."""
    return {k: v for k, v in p.items() if k not in ("turns", "_outputs")}


def same_turns(a: dict, b: dict) -> tuple[int, int]:
    """(turns with the same tokens, turns) of two policies' outputs {conversation: [turns]}."""
    pairs = [(x, y) for conv in a for x, y in zip(a[conv], b.get(conv, []))]
    return sum(x == y for x, y in pairs), len(pairs)


def phase_engine(ph: Phase) -> dict:
    import math
    import multiturn
    import workload as wl
    from multiturn_lib.engine_target import EngineTarget
    from multiturn_lib.measure import measure
    from multiturn_lib.precompile import enable_compile_cache
    from multiturn_lib.runners import load_points, make_engine, print_point
    from pensieve_jax.weights import load_model
    args = multiturn.make_parser().parse_args(engine_argv(ph.dry_run))
    enable_compile_cache(args.compile_cache)
    start = time.time()
    model = load_model(args.model, args.dtype)
    convs, name = multiturn.build_workload(args)
    ph.result.update(model=model.source, dtype=args.dtype, workload={
        "name": name, **wl.schedule(convs, math.inf, args.think_time, args.seed).summary()},
        args=vars(args), points={}, same_outputs={}, precompile={}, attention={})
    engines = {}
    try:
        for policy in ("stateful", "stateless"):
            engine, _, pre = make_engine(policy, model, convs, args)
            engines[policy] = engine
            ph.result["precompile"][policy] = pre
            ph.result["attention"][policy] = engine.stats().get("attention_check")
        ph.result["setup_s"] = round(time.time() - start, 1)
        ph.save()
        targets = {p: EngineTarget(e) for p, e in engines.items()}
        last_point_s = 0.0
        for rate, users in load_points(args):
            if not ph.has_time(1.3 * last_point_s + (2 if ph.dry_run else 10),
                               f"load point users={users}"):
                break
            t0 = time.time()
            workload = wl.schedule(convs, rate, args.think_time, args.seed)
            outputs = {}
            for policy, target in targets.items():
                p = measure(target, workload, seed=args.seed, users=users, warmup_passes=0,
                            progress=False, label=f"{policy} users={users}", keep_outputs=True,
                            max_retries=1)
                outputs[policy] = p.pop("_outputs")
                ph.result["points"].setdefault(policy, []).append(point_summary(p))
                print_point(policy, p)
            same, total = same_turns(outputs["stateful"], outputs["stateless"])
            ph.result["same_outputs"][str(users)] = {"same_turns": same, "turns": total}
            ph.save()
            last_point_s = time.time() - t0
    finally:
        for engine in engines.values():
            engine.shutdown()
    return engine_summary(ph.result)


def engine_summary(r: dict) -> dict:
    """Equal-latency comparison and TTFT by turn (the busiest point) from the measured points."""
    from multiturn_lib.metrics import compare_policies, curve
    points = r["points"]
    curves = {k: curve(v) for k, v in points.items()}
    equal = compare_policies(curves)
    ttft = {k: v[-1]["ttft_by_turn"] for k, v in points.items() if v}
    last_turn = {k: v[-1]["mean"] for k, v in ttft.items() if v}
    attention = {k: (v or {}).get("attention") for k, v in r["attention"].items()}
    return {"p90_curves": curves, "stateful_vs_stateless_at_equal_p90_latency": equal,
            "ttft_by_turn": ttft, "headline": {
                "ratio_at_equal_p90": [round(row["ratio"], 3) for row in equal],
                "ttft_last_turn_s": last_turn, "attention": attention,
                "same_outputs": r["same_outputs"],
                "points": {k: len(v) for k, v in points.items()}}}


PHASE_FUNCTIONS: dict[str, Callable[[Phase], dict]] = {
    "environment": phase_environment, "kernel": phase_kernel,
    "decode_bandwidth": phase_decode_bandwidth, "prefill": phase_prefill, "swap": phase_swap,
    "engine": phase_engine}


# -- the run: every phase in a child process, budgets, the summary ---------------------------------

def phase_budgets(phases: list[str], budget_s: float) -> dict[str, float]:
    """Each phase's share of budget_s, renormalized over the phases that run."""
    total = sum(PHASES[p] for p in phases)
    return {p: budget_s * PHASES[p] / total for p in phases}


def child_env(dry_run: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if dry_run:
        env.setdefault("PENSIEVE_JAX_PRECOMPILE", "0")
        # compile quickly rather than make fast code: a dry run's timings mean nothing
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                            " --xla_llvm_disable_expensive_passes=true").strip()
    return env


def _children_cpu_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


def run_child(name: str, args, limit_s: float) -> dict:
    """One phase in a child process, killed at limit_s; returns its JSON (or what it left, with
    the error)."""
    path = Path(args.out) / f"{name}.json"
    path.unlink(missing_ok=True)
    margin = min(15.0, 0.1 * limit_s)            # the phase stops itself this long before
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", args.out, "--phase", name,
           "--deadline", str(time.time() + limit_s - margin), "--phase-budget", str(limit_s)]
    cmd += ["--dry-run"] if args.dry_run else []
    start, cpu = time.time(), _children_cpu_s()
    status: int | str
    try:
        status = subprocess.run(cmd, env=child_env(args.dry_run), timeout=limit_s).returncode
    except subprocess.TimeoutExpired:
        status = f"killed after its budget of {limit_s:.0f} s"
    result = load_json(path) or {"phase": name, "ok": False, "error": None, "complete": False,
                                 "headline": {}}
    result["exit_status"] = status
    if not result.get("complete"):          # killed or crashed: keep what it saved, say why
        reason = status if isinstance(status, str) else \
            f"the phase's process ended with status {status} before it finished"
        result["ok"] = False
        result["error"] = reason + (f"; before that: {result['error']}" if result.get("error")
                                    else "")
    path.with_suffix(".json.tmp").unlink(missing_ok=True)     # a write the kill cut short
    result["wall_s"] = round(time.time() - start, 2)
    result["cpu_s"] = round(_children_cpu_s() - cpu, 2)
    result.setdefault("budget_s", round(limit_s, 1))
    save_json(path, result)
    return result


def summarize(results: dict[str, dict], args, started: float) -> dict:
    return {"dry_run": args.dry_run, "budget_s": args.budget_s,
            "elapsed_s": round(time.time() - started, 1),
            "device": next((r.get("device") for r in results.values() if r.get("device")), None),
            "all_ok": all(r.get("ok") for r in results.values()) and
            len(results) == len(args.phases),
            "phases": {n: {"ok": r.get("ok"), "error": (r.get("error") or None) and
                           r["error"].splitlines()[0], "wall_s": r.get("wall_s"),
                           "cpu_s": r.get("cpu_s"),
                           "budget_s": r.get("budget_s"), "headline": r.get("headline")}
                       for n, r in results.items()}}


def run_all(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = phase_budgets(args.phases, args.budget_s)
    started, carry, results = time.time(), 0.0, {}
    for name in args.phases:
        limit = budgets[name] + carry
        print(f"[gpu_check] {name}: budget {limit:.0f} s", flush=True)
        t0 = time.time()
        results[name] = run_child(name, args, limit)
        carry = max(0.0, limit - (time.time() - t0))
        r = results[name]
        print(f"[gpu_check] {name}: {'ok' if r.get('ok') else 'FAILED'} in "
              f"{r['wall_s']:.1f} s  {json.dumps(r.get('headline'), default=_plain)}"
              + ("" if r.get("ok") else f"\n  {str(r.get('error')).splitlines()[0]}"), flush=True)
        save_json(out / "summary.json", summarize(results, args, started))
    summary = summarize(results, args, started)
    print(f"[gpu_check] {'all ok' if summary['all_ok'] else 'SOME PHASES FAILED'} in "
          f"{summary['elapsed_s']:.0f} s; results in {out}/", flush=True)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for <phase>.json and summary.json")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes, kernels interpreted, random:tiny (CPU, seconds)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="seconds for all phases together (shares: %s)" % PHASES)
    ap.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES))
    ap.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--phase-budget", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:                        # a child: one phase in this process
        Path(args.out).mkdir(parents=True, exist_ok=True)
        budget = args.phase_budget or phase_budgets([args.phase], args.budget_s)[args.phase]
        run_phase(args.phase, Path(args.out), args.dry_run, args.deadline or time.time() + budget,
                  budget)
        return 0
    args.phases = [p for p in PHASES if p in args.phases]
    return 0 if run_all(args)["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
