"""Phase prefill of benchmarks/gpu_check.py: new tokens over cached context and a prompt from
scratch, paged (the kernel) against contiguous dense attention (XLA, and cuDNN where it runs).
"""

from __future__ import annotations

from typing import Any

from gpu_check_lib.kernel import decode_shape
from gpu_check_lib.results import Phase


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
