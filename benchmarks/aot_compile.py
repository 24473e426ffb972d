"""Compile the engine's programs for an H200 / H100 ahead of time, on a machine without a GPU.

    make aot            # both targets, every program: benchmarks/results/aot_{h200,h100}.json
    make aot-kernels    # the kernel sweep's CI subset for the H200 (aot_h200_kernels.json)
    python benchmarks/aot_compile.py --out DIR [--target h200|h100|both] [--kernels-only]
                                     [--sweep full|ci] [--tp 1 2] [--smoke]

Needs the CUDA plugin (`jax-cuda13-plugin`, `jax-cuda13-pjrt` at the jaxlib version) and ptxas
(`nvidia-cuda-nvcc`), but no GPU: `make aot` installs them into .venv/aot, which this script
puts on sys.path. Runs with JAX_PLATFORMS=cpu (set unless given). A target is a compile-only
device from a GpuTargetConfig text proto (benchmarks/gpu_targets/*.txtpb) through
`jax.experimental.topologies.get_topology_desc`; `jit(f).lower(...).compile()` on its devices
runs XLA's GPU pipeline: Pallas -> Triton -> PTX (sm_90a) -> ptxas.

What is compiled, per target (the programs ARE the engine's: `runner.jit_step` / `lower_step` /
`jit_page_programs`, the functions ModelRunner jits, on abstract parameters and pools):
  * step      every step program of the default EngineConfig's program set for
              random:llama3-8b bfloat16, attention="pallas" (interpret=False: decided by
              `runner.kernel_interpret` from the target's devices), with the layered-load
              variants (swap_in="layered" with a host tier), on a KV pool sized as the engine
              would size it on that card (`engine_config.pool_pages`, see `memory_plan`);
  * page      the page gather / copy / scatter programs (PAGE_CHUNK pages);
  * step_tp2 / page_tp2   the same with tensor_parallel=2 (a 1x1x2 topology: two GPUs of
              one host), collectives included;
  * kernel    the Pallas kernel alone over a sweep of page sizes, head layouts, token mixes
              (decode-only, mixed, prefill) and dtypes.

Per program the JSON records: compiled or the error, the Triton custom calls in the compiled
program (every program with Pallas attention must have one: without it the kernel was
interpreted), registers / spills / stack of every Triton kernel (the Pallas kernel and XLA's
own Triton fusions: ptxas -v over the PTX that XLA dumps, with the options XLA gives ptxas),
XLA's memory analysis (argument / output / alias / temp bytes) against the memory plan, XLA's
warnings, and lower / compile seconds. Without a GPU XLA cannot autotune (nor size its GPU
sort): these executables prove compilation, registers and memory, not speed.
AOT_DUMP_DIR=DIR keeps XLA's dumps (HLO text, PTX) per program. Exit status 1 when a program
failed to compile or lacks its Triton kernel (spills are reported, not failed).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIR = ROOT / ".venv" / "aot"        # where `make aot` installs the CUDA plugin and ptxas
sys.path.insert(0, str(ROOT))
if PLUGIN_DIR.is_dir():
    sys.path.append(str(PLUGIN_DIR))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# the parts: benchmarks/aot_lib/ (its __init__ lists them); they import jax
from benchmarks.aot_lib.engine_programs import MODEL, engine_programs  # noqa: E402
from benchmarks.aot_lib.kernel_sweep import SWEEPS, kernel_programs  # noqa: E402
from benchmarks.aot_lib.ptxas import PTXAS_OPTIONS, find_ptxas  # noqa: E402
from benchmarks.aot_lib.report import log_row, print_table, summarize  # noqa: E402
from benchmarks.aot_lib.targets import Target, targets  # noqa: E402
from benchmarks.common import environment, write_json  # noqa: E402


def source_hash() -> str:
    """sha256 of the sources the programs come from (pensieve_jax, pallas_kernels): which
    working tree a result belongs to, where git_commit only says "modified". Taken once, at
    start (SOURCE_HASH), as the modules were imported."""
    h = hashlib.sha256()
    for package in ("pensieve_jax", "pallas_kernels"):
        for path in sorted((ROOT / package).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    return h.hexdigest()[:16]


SOURCE_HASH = source_hash()


def run_target(target: Target, args, ptxas: str | None) -> dict:
    print(f"{target.name}: {target.field('device_description_str')} "
          f"({target.proto_path.name})", flush=True)
    result: dict[str, Any] = {"target": target.describe(), "source_sha256": SOURCE_HASH,
                              "ptxas": ptxas,
                              "ptxas_options": list(PTXAS_OPTIONS), "engine": []}
    rows: list[dict] = []
    start = time.perf_counter()
    if not args.kernels_only and not args.smoke:
        for tp in args.tp:
            try:
                tp_rows, meta = engine_programs(target, tp, ptxas, log_row,
                                                getattr(args, "model", MODEL))
            except Exception as e:  # noqa: BLE001 - a setup that fails is recorded, not fatal
                meta = {"tp": tp, "error": f"{type(e).__name__}: {e}"[:4000],
                        "traceback": traceback.format_exc()[-3000:]}
                tp_rows = []
                print(f"  [{target.name}] tp={tp} setup FAILED: {meta['error']}", flush=True)
            result["engine"].append(meta)
            rows += tp_rows
    rows += kernel_programs(target, ptxas, log_row, "smoke" if args.smoke else args.sweep)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["summary"] = summarize(rows)
    result["all_ok"] = all(r["ok"] for r in rows) and not any(
        "error" in m for m in result["engine"])
    result["programs"] = rows
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                    help="folder for aot_<target>.json (aot_<target>_kernels.json with "
                         "--kernels-only, aot_<target>_smoke.json with --smoke)")
    ap.add_argument("--target", default="both", choices=["h200", "h100", "both"])
    ap.add_argument("--kernels-only", action="store_true", help="the Pallas kernel sweep only")
    ap.add_argument("--smoke", action="store_true", help="one small kernel config (the test)")
    ap.add_argument("--sweep", default="full", choices=SWEEPS[:2],
                    help="the kernel sweep (ci: a subset)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2],
                    help="tensor-parallel degrees of the engine programs")
    ap.add_argument("--model", default=MODEL,
                    help="a random: preset of the engine programs, e.g. random:qwen3-8b or "
                         "random:mistral-7b-v0.1 (results: aot_<target>_<preset>.json)")
    args = ap.parse_args(argv)
    if not plugin_installed():
        print("the CUDA plugin is not installed (make aot installs it into .venv/aot)",
              file=sys.stderr)
        return 2
    ptxas = find_ptxas()
    suffix = "_smoke" if args.smoke else "_kernels" if args.kernels_only else ""
    if args.model != MODEL and not (args.smoke or args.kernels_only):
        suffix = "_" + args.model.removeprefix("random:").replace(".", "_")
    failed = False
    for target in targets(args.target):
        result = {**environment(argv, __file__), **run_target(target, args, ptxas)}
        print_table(target.name, result["summary"])
        write_json(Path(args.out) / f"aot_{target.name}{suffix}.json", result)
        failed |= not result["all_ok"]
    return 1 if failed else 0


def plugin_installed() -> bool:
    """Whether JAX can discover a CUDA PJRT plugin (jax_plugins.xla_cuda13 or _cuda12)."""
    import importlib.util
    try:
        return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (13, 12))
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
