"""Compiling before measuring: every step-shape bucket a workload can reach (--precompile grid),
once per set of engine shapes in this process, through JAX's persistent compilation cache."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import numpy as np

_PRECOMPILED: dict[tuple, str] = {}      # programs_shared(config) -> the engine that compiled


def precompile_grid(engine, max_context: int, max_seqs: int) -> dict[str, Any]:
    """Compile every step-shape bucket a workload can reach before any request runs: the
    runner's buckets are (tokens t, sequences n, pages per sequence p, longest query q: 1 for a
    decode-only step, else t), each a power of two. The grid spans n up to max_seqs, p up to
    the pages of max_context and t up to max_batched_tokens. Each key runs one synthetic step
    (made-up page tables over the idle pool; the pages are free, and are written again before
    they are read). Returns counts and seconds; {"error": ...} if the runner's interface has
    changed (the warm-up passes then do all the warming)."""
    start = time.perf_counter()
    try:
        from pensieve_jax.runner import StepInput, bucket
        runner = engine.runner
        b = runner.buckets
        page = runner.page_size
        before = runner.num_compilations

        def pow2s(lo: int, hi: int) -> list[int]:
            out, x = [], bucket(1, lo)
            while x <= bucket(hi, lo):
                out.append(x)
                x *= 2
            return out

        max_tokens = engine.config.max_batched_tokens
        # A step of S rows pads to n = bucket(S) >= S, so the fewest rows that give n is
        # n // 2 + 1: with them a mixed step of t == n tokens is possible too.
        keys = []
        for n in pow2s(b.min_seqs, max_seqs):
            rows = n // 2 + 1 if n > 1 else 1
            for p in pow2s(b.min_pages, math.ceil(max_context / page)):
                keys.append((bucket(n, b.min_tokens), n, p, 1, rows))
                for t in pow2s(b.min_tokens, max_tokens):
                    if rows < t <= rows * p * page:
                        keys.append((t, n, p, t, rows))
        for t, n, p, q, rows in keys:
            q_lens = [1] * rows
            if q > 1:
                extra = t - rows                           # spread over the rows, each <= ctx
                for i in range(rows):
                    add = min(extra, p * page - 1)
                    q_lens[i] += add
                    extra -= add
            ctx = p * page
            positions = np.concatenate([np.arange(ctx - m, ctx) for m in q_lens])
            table = (np.arange(rows * p) % runner.num_pages).reshape(rows, p)
            ones = np.ones(rows)
            runner.step(StepInput(
                np.zeros(sum(q_lens), np.int32), positions.astype(np.int32),
                table.astype(np.int32), np.full(rows, ctx, np.int32),
                np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32),
                np.zeros(rows, np.float32), np.zeros(rows, np.int32), ones.astype(np.float32),
                ones.astype(np.uint32), np.zeros(rows, np.int32)))
        # the XLA attention's query-tile bucket: every count a mixed step of this key can need
        from pensieve_jax.attention import max_q_blocks
        tile_keys = 0
        for t, n, p, q, rows in keys:
            if q > 1:               # a sequence's q_len is at most its context, p pages
                for tiles in pow2s(1, max_q_blocks(t, n, min(t, p * page))):
                    runner.compile_step(t, n, p, q, tiles)
                    tile_keys += 1
        return {"keys": len(keys), "tile_keys": tile_keys,
                "compiled": runner.num_compilations - before,
                "seconds": time.perf_counter() - start}
    except Exception as e:  # an engine whose runner changed: rely on the warm-up passes
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - start}


def programs_shared(config) -> tuple | None:
    """A key for engines whose compiled steps the runner shares in-process (same shapes:
    everything but the cache policy), or None if this runner does not share them."""
    import pensieve_jax.runner as runner_module
    if not hasattr(runner_module, "_EXECUTABLES"):
        return None
    return tuple(sorted((k, str(v)) for k, v in dataclasses.asdict(config).items()
                        if k != "cache_policy"))


def precompile_once(engine, config, name: str, max_context: int, max_seqs: int
                    ) -> dict[str, Any]:
    """precompile_grid, unless an engine of the same shapes already compiled them in this
    process ({"shared_with": its name}: its programs serve this engine too)."""
    key = programs_shared(config)
    if key is not None and key in _PRECOMPILED:
        return {"shared_with": _PRECOMPILED[key]}
    pre = precompile_grid(engine, max_context, max_seqs)
    print(f"{name}: precompiled {json.dumps(pre)}", flush=True)
    if "error" not in pre and key is not None:
        _PRECOMPILED[key] = name
    return pre


def enable_compile_cache(path: str | None) -> str | None:
    """JAX's persistent compilation cache: a bucket compiled once (by either policy's engine,
    or an earlier run) loads in a fraction of its compile time."""
    if not path or path == "none":
        return None
    import jax
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path
