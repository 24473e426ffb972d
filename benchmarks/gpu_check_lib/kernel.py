"""Phase kernel of benchmarks/gpu_check.py: the ragged paged attention kernel against its
plain-jnp reference on ragged mixed batches in several head layouts (float32 at precision
"highest" and bfloat16), whether the lowered program holds the Triton call, and on the decode
shape (decode_shape(), shared with the decode_bandwidth and prefill phases) against JAX's own
Pallas paged_attention.
"""

from __future__ import annotations

from typing import Any, Callable

from gpu_check_lib.results import Phase, error_text


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
