"""Phase decode_bandwidth of benchmarks/gpu_check.py: a device-to-device copy's bandwidth, then
the decode kernel at the decode shape as GB/s read and as % of the copy's bandwidth.
"""

from __future__ import annotations

from types import SimpleNamespace

from gpu_check_lib.kernel import decode_shape
from gpu_check_lib.results import Phase


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
