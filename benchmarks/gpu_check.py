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
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

# the phases and the files they write: gpu_check_lib/ (its __init__ lists the parts)
from gpu_check_lib.results import load_json, plain, save_json

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
              f"{r['wall_s']:.1f} s  {json.dumps(r.get('headline'), default=plain)}"
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
        from gpu_check_lib.phase_process import run_phase
        Path(args.out).mkdir(parents=True, exist_ok=True)
        budget = args.phase_budget or phase_budgets([args.phase], args.budget_s)[args.phase]
        run_phase(args.phase, Path(args.out), args.dry_run, args.deadline or time.time() + budget,
                  budget)
        return 0
    args.phases = [p for p in PHASES if p in args.phases]
    return 0 if run_all(args)["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
