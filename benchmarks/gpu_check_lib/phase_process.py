"""One phase of benchmarks/gpu_check.py run in this process (gpu_check.py starts one process a
phase): the backend started and recorded, the phase function's result or its error saved.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

from gpu_check_lib.decode_bandwidth import phase_decode_bandwidth
from gpu_check_lib.engine import phase_engine
from gpu_check_lib.environment import host_facts, phase_environment
from gpu_check_lib.kernel import phase_kernel
from gpu_check_lib.prefill import phase_prefill
from gpu_check_lib.results import Phase, error_text
from gpu_check_lib.swap import phase_swap

PHASE_FUNCTIONS: dict[str, Callable[[Phase], dict]] = {
    "environment": phase_environment, "kernel": phase_kernel,
    "decode_bandwidth": phase_decode_bandwidth, "prefill": phase_prefill, "swap": phase_swap,
    "engine": phase_engine}

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
