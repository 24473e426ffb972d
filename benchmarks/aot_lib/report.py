"""What aot_compile.py reports: per group of programs (compiled, Triton where needed, spills,
registers, memory, seconds), the table it prints per target, and one line per program.
"""

from __future__ import annotations


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per group: programs, compiled, Triton where needed, spills, registers, memory, seconds."""
    out = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        rs = [r for r in rows if r["group"] == group]
        ok = [r for r in rs if r["ok"]]
        pallas = [k for r in ok for k in r.get("pallas_kernels", [])]
        out[group] = {
            "programs": len(rs), "compiled": len(ok),
            "triton_missing": sum(1 for r in rs if r["needs_triton"] and not r.get("triton")),
            "spill_bytes": sum(r.get("spill_bytes", 0) for r in ok),
            "spilling_programs": sum(1 for r in ok if r.get("spill_bytes")),
            "retried_with_options": sum(1 for r in ok if "compile_options" in r),
            "triton_registers_max": max((r.get("max_registers", 0) for r in ok), default=None),
            "pallas_registers_max": max((k["registers"] for k in pallas), default=None),
            "pallas_registers_min": min((k["registers"] for k in pallas), default=None),
            "max_temp_bytes": max((r["memory"]["temp"] for r in ok if r.get("memory")),
                                  default=None),
            "within_plan": (all(r["within_plan"] for r in ok if "within_plan" in r)
                            if any("within_plan" in r for r in ok) else None),
            "compile_s": round(sum(r.get("compile_s", 0) for r in rs), 1),
            "max_compile_s": max((r.get("compile_s", 0) for r in rs), default=0)}
    return out


def print_table(target: str, summary: dict[str, dict]) -> None:
    gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    print(f"\n{target}: {'group':10s} {'compiled':>10s} {'no triton':>9s} {'spilling':>8s} "
          f"{'regs(pallas)':>12s} {'temp GiB':>8s} {'in plan':>7s} {'compile s':>9s}")
    for group, s in summary.items():
        regs = ("-" if s["pallas_registers_max"] is None
                else f"{s['pallas_registers_min']}-{s['pallas_registers_max']}")
        print(f"{'':{len(target) + 1}s} {group:10s} {s['compiled']:>4d}/{s['programs']:<5d} "
              f"{s['triton_missing']:>9d} {s['spilling_programs']:>8d} {regs:>12s} "
              f"{gib(s['max_temp_bytes']):>8s} {str(s['within_plan']):>7s} "
              f"{s['compile_s']:>9.1f}")


def log_row(row: dict) -> dict:
    status = "ok" if row["ok"] else "FAILED"
    extra = ""
    if row["ok"]:
        regs = [k["registers"] for k in row.get("pallas_kernels", [])]
        extra = (f"triton={row['triton_calls']} spills={row.get('spill_bytes')} "
                 f"regs={regs} temp={row['memory']['temp'] if row.get('memory') else '-'} "
                 f"{row.get('compile_s')} s"
                 + (f" (with {row['compile_options']})" if "compile_options" in row else ""))
    else:
        extra = row["error"].splitlines()[0][:300]
    print(f"  [{row['target']}] {row['name']}: {status} {extra}", flush=True)
    return row
