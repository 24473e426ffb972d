"""Host <-> device bandwidth of the host tier's page copies, by batch size and copy path.

    python benchmarks/bench_swap.py --preset llama3-8b --dtype bfloat16 \
        --out benchmarks/results/bench_swap_<device>.json

Pages have the preset's real shape (K and V of every layer, page_size tokens); no weights are
loaded. For n pages per batch it times, each the median of --repeats runs:

    d2h          gather on device + copy_to_host_async + read into NumPy (HostCache.write_async
                 / finish_writes: what the engine does for a swap-out batch)
    d2h_pinned   gather + device_put into the pinned_host memory kind + read into NumPy
    h2d          NumPy pages -> device_put (ModelRunner.stage_pages: a swap-in batch)

Here a batch is one gather, one device_put and one scatter of n pages; the engine runs the same
copies in chunks of runner.PAGE_CHUNK pages (one fixed-shape program call each, `page_chunk` in
the results), so its batches above that size are several such calls.
    h2d_pinned   NumPy -> pinned_host (host copy, timed apart as pin_s) -> device
    raw_h2d      one contiguous device_put of the same bytes (the reference)

and reports GB/s (gather_s / scatter_s: the device-side page gather and scatter, K and V). On
the CPU backend device_put may alias host memory: those numbers are not bandwidths. pinned_host is used only where the backend lists that memory kind. Together
with bench_tiers' `swap.in_hidden_pages / in_pages` (swap-ins finished before their turn needed
them) this is what the multi-tier cache's load-or-recompute choice and overlap rest on.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from common import environment, median_s, write_json
from pallas_kernels.kv_pages import copy_pages
from pensieve_jax.model.config import PRESETS
from pensieve_jax.runner.page_programs import PAGE_CHUNK


def memory_kinds() -> list[str]:
    try:
        return [m.kind for m in jax.devices()[0].addressable_memories()]
    except (AttributeError, NotImplementedError):
        return []


def measure(layers: int, page_size: int, kv_heads: int, head_dim: int, dtype, pool_pages: int,
            batches: list[int], repeats: int) -> dict:
    dev = jax.devices()[0]
    shape = (layers, pool_pages, page_size, kv_heads, head_dim)
    pool = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
    target = [jnp.zeros_like(pool)]                 # the scatter's pool (donated each time)
    gather = jax.jit(lambda p, ids: jnp.take(p, ids, axis=1))
    scatter = lambda p, x, ids: copy_pages(p, x, jnp.arange(ids.shape[0]), ids)   # noqa: E731
    pinned = "pinned_host" in memory_kinds()
    to_pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host") if pinned else None
    to_device = jax.sharding.SingleDeviceSharding(dev, memory_kind="device") if pinned else None
    page_bytes = 2 * layers * page_size * kv_heads * head_dim * jnp.dtype(dtype).itemsize
    rows = []
    for n in batches:
        ids = jnp.asarray(np.random.default_rng(n).permutation(pool_pages)[:n], jnp.int32)
        host = np.asarray(gather(pool, ids))
        nbytes = 2 * host.nbytes                      # K and V move as two such arrays

        def d2h():
            for _ in range(2):
                a = gather(pool, ids)
                a.copy_to_host_async()
                np.asarray(a)

        def h2d():
            jax.block_until_ready([jax.device_put(host, dev) for _ in range(2)])

        def raw_h2d():
            jax.block_until_ready(jax.device_put(np.concatenate([host, host], axis=1), dev))

        def gather_only():
            jax.block_until_ready([gather(pool, ids) for _ in range(2)])

        row = {"pages": n, "bytes": nbytes,
               "gather_s": median_s(gather_only, repeats),
               "d2h_s": median_s(d2h, repeats),
               "h2d_s": median_s(h2d, repeats),
               "raw_h2d_s": median_s(raw_h2d, repeats)}
        staged = jax.device_put(host, dev)

        def scatter_only():
            for _ in range(2):
                target[0] = scatter(target[0], staged, ids)     # donated: in place
            jax.block_until_ready(target[0])
        row["scatter_s"] = median_s(scatter_only, repeats)
        if pinned:
            def d2h_pinned():
                for _ in range(2):
                    np.asarray(jax.device_put(gather(pool, ids), to_pinned))

            def pin():
                jax.block_until_ready([jax.device_put(host, to_pinned) for _ in range(2)])
            held = [jax.device_put(host, to_pinned) for _ in range(2)]

            def h2d_pinned():
                jax.block_until_ready([jax.device_put(a, to_device) for a in held])
            row.update(d2h_pinned_s=median_s(d2h_pinned, repeats),
                       pin_s=median_s(pin, repeats), h2d_pinned_s=median_s(h2d_pinned, repeats))
        for key in [k for k in row if k.endswith("_s") and k not in ("gather_s", "scatter_s")]:
            row[key[:-2] + "_GBps"] = round(nbytes / row[key] / 1e9, 3)
        rows.append(row)
    return {"page_bytes": page_bytes, "pinned_host": pinned, "memory_kinds": memory_kinds(),
            "batches": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--layers", type=int, help="override the preset's layer count (small runs)")
    ap.add_argument("--pool-pages", type=int, default=512)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    c = PRESETS[args.preset]
    if max(args.batches) > args.pool_pages:
        raise SystemExit(f"--pool-pages {args.pool_pages} < largest batch {max(args.batches)}")
    layers = args.layers or c.num_layers
    result = {**environment(argv, __file__), "preset": args.preset, "layers": layers,
              "dtype": args.dtype, "page_size": args.page_size, "page_chunk": PAGE_CHUNK}
    result.update(measure(layers, args.page_size, c.num_kv_heads, c.head_dim,
                          jnp.dtype(args.dtype), args.pool_pages, args.batches, args.repeats))
    print(f"{result['device']} ({result['backend']}), page {result['page_bytes'] / 2**20:.2f} MiB, "
          f"pinned_host: {result['pinned_host']}")
    for r in result["batches"]:
        extra = (f"  d2h_pinned {r['d2h_pinned_GBps']:6.2f}  h2d_pinned {r['h2d_pinned_GBps']:6.2f}"
                 if "d2h_pinned_GBps" in r else "")
        print(f"{r['pages']:4d} pages: d2h {r['d2h_GBps']:6.2f}  h2d {r['h2d_GBps']:6.2f}  raw h2d "
              f"{r['raw_h2d_GBps']:6.2f} GB/s  gather {r['gather_s'] * 1e3:.2f} ms  scatter "
              f"{r['scatter_s'] * 1e3:.2f} ms{extra}")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
