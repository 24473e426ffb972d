"""Time the ragged paged attention kernel against its baselines, next to the device's ceilings.

    python benchmarks/bench_kernels.py --out benchmarks/results/bench_kernels_<device>.json
    python benchmarks/bench_kernels.py --smoke      # tiny shapes, interpret mode: checks the script

Cases (bf16, 32 q heads / 8 KV heads, head_dim 128, pages of 16):
  decode:  batch 64, context 4096, one new token each
  prefill: 512 new tokens over 4096 cached tokens, one sequence
Baselines: jax's decode-only Pallas `paged_attention` (decode), dense attention on contiguous KV
(`jax.nn.dot_product_attention`, the non-paged ideal), and the XLA paged attention (our CPU
path: a work list of query rows x key blocks, each block's pages gathered; `xla_gather_s`). Ceilings: a large device-to-device copy (bytes read + written) and a large bf16 matmul.
Timing: median of --iters runs after warm-up, synchronizing on the result (wall clock).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import environment, write_json
from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference
from pensieve_jax.model.attention import AttentionBatch, KVCache, xla_paged_attention
from pensieve_jax.runner.step_program import kernel_interpret


def timeit(fn, *args, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ceilings(iters: int, smoke: bool) -> dict:
    n = (1 << 20) if smoke else (1 << 30)
    x = jnp.ones((n // 2,), jnp.bfloat16) * 1.5
    copy = jax.jit(lambda a: a * 1)
    t = timeit(copy, x, iters=iters)
    m = 256 if smoke else 8192
    a = jax.random.normal(jax.random.key(0), (m, m), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    tm = timeit(mm, a, a, iters=iters)
    return {"copy_GBps": 2 * n / t / 1e9, "matmul_bf16_TFLOPs": 2 * m ** 3 / tm / 1e12}


def make(batch, q_len, ctx, heads, kv_heads, head_dim, page_size, dtype, seed):
    """Pools with each sequence's pages shuffled; kv_len = ctx (the new tokens included)."""
    rng = np.random.default_rng(seed)
    pages_per_seq = -(-ctx // page_size)
    num_pages = batch * pages_per_seq
    table = rng.permutation(num_pages).reshape(batch, pages_per_seq).astype(np.int32)
    shape = (num_pages, page_size, kv_heads, head_dim)
    k = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    v = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    q = jnp.asarray(rng.standard_normal((batch * q_len, heads, head_dim), np.float32), dtype)
    kv_lens = jnp.full((batch,), ctx, jnp.int32)
    cu = jnp.arange(0, (batch + 1) * q_len, q_len, dtype=jnp.int32)
    return q, k, v, jnp.asarray(table), kv_lens, cu


def contiguous(q, k, v, table, kv_lens, cu, batch, q_len):
    """The same problem with contiguous KV [B, ctx, KVH, D] for the dense baseline."""
    ctx = int(kv_lens[0])
    kc = k[table].reshape(batch, -1, *k.shape[2:])[:, :ctx]
    vc = v[table].reshape(batch, -1, *v.shape[2:])[:, :ctx]
    return q.reshape(batch, q_len, *q.shape[1:]), kc, vc


def run_case(name, batch, q_len, ctx, args, iters, interpret) -> dict:
    heads, kv_heads, head_dim, page_size = args.heads, args.kv_heads, args.head_dim, args.page_size
    dtype = jnp.bfloat16
    q, k, v, table, kv_lens, cu = make(batch, q_len, ctx, heads, kv_heads, head_dim, page_size,
                                       dtype, seed=1)
    ours = jax.jit(lambda *a: ragged_paged_attention(*a, interpret=interpret))
    out = ours(q, k, v, table, kv_lens, cu)
    ref = ragged_paged_attention_reference(*(x.astype(jnp.float32) if x.dtype == dtype else x
                                             for x in (q, k, v, table, kv_lens, cu)))
    err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    row = {"case": name, "batch": batch, "q_len": q_len, "ctx": ctx, "rel_err": err,
           "ours_s": timeit(ours, q, k, v, table, kv_lens, cu, iters=iters)}

    qd, kc, vc = contiguous(q, k, v, table, kv_lens, cu, batch, q_len)
    pos = ctx - q_len + jnp.arange(q_len)
    mask = (jnp.arange(ctx)[None, :] <= pos[:, None])[None, None]          # [1, 1, q, ctx]
    dense = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(a, b, c, mask=mask))
    row["dense_contiguous_s"] = timeit(dense, qd, kc, vc, iters=iters)

    kv = KVCache(k[None], v[None])
    batch_meta = AttentionBatch(table, kv_lens, cu)
    xla = jax.jit(lambda a, kv, b: xla_paged_attention(a, kv, jnp.int32(0), b,
                                                       sm_scale=head_dim ** -0.5))
    row["xla_gather_s"] = timeit(xla, q, kv, batch_meta, iters=iters)

    if q_len == 1:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
        kh, vh = k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3)    # their layout: head-major
        pages = table.shape[1]
        splits = max(d for d in (1, 2, 4, 8, 16) if pages % d == 0)
        ppcb = max(d for d in (1, 2, 4, 8) if d <= max(1, 64 // page_size)
                   and (pages // splits) % d == 0)
        jax_pa = jax.jit(lambda a, b, c, t, l: paged_attention(
            a, b, c, t, l, pages_per_compute_block=ppcb, k_splits=splits, interpret=interpret))
        row["jax_paged_decode_s"] = timeit(jax_pa, q, kh, vh, table, kv_lens, iters=iters)

    itemsize = jnp.dtype(dtype).itemsize
    kv_bytes = 2 * batch * ctx * kv_heads * head_dim * itemsize
    io_bytes = 2 * q.size * itemsize
    flops = 4 * batch * heads * head_dim * q_len * (ctx - (q_len - 1) / 2)   # causal: qk + pv
    row["GBps"] = (kv_bytes + io_bytes) / row["ours_s"] / 1e9
    row["TFLOPs"] = flops / row["ours_s"] / 1e12
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    interpret = kernel_interpret(jax.devices()[:1])   # by the device's platform (explicit)
    if args.smoke:
        args.heads, args.kv_heads, args.head_dim, args.iters = 4, 2, 64, 2
        cases = [("decode", 4, 1, 64), ("prefill", 1, 32, 96)]
    else:
        cases = [("decode", 64, 1, 4096), ("prefill", 1, 512, 4608)]
    result = {**environment(argv, __file__), "interpret": interpret,
              "ceilings": ceilings(args.iters, args.smoke), "rows": []}
    for name, batch, q_len, ctx in cases:
        row = run_case(name, batch, q_len, ctx, args, args.iters, interpret)
        result["rows"].append(row)
        base = {k: v for k, v in row.items() if k.endswith("_s")}
        print(f"{name:8s} rel_err {row['rel_err']:.1e}  " +
              "  ".join(f"{k[:-2]} {v * 1e3:.3f} ms" for k, v in base.items()) +
              f"  | ours {row['GBps']:.0f} GB/s, {row['TFLOPs']:.2f} TFLOP/s")
    c = result["ceilings"]
    print(f"ceilings: copy {c['copy_GBps']:.0f} GB/s, bf16 matmul {c['matmul_bf16_TFLOPs']:.1f} "
          f"TFLOP/s on {result['device']} ({result['backend']}, interpret={interpret})")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
