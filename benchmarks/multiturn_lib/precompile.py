"""Compiling before measuring: the engine's whole step program set (`engine.warm_up()`,
--precompile all) through JAX's persistent compilation cache. The engine derives its program
set from its configuration (pensieve_jax.runner.programs.ProgramSet), so nothing here guesses shapes."""

from __future__ import annotations

import time
from typing import Any


def warm_up(engine) -> dict[str, Any]:
    """engine.warm_up() (a no-op on an engine built with precompile on, which warmed up when it
    was built): its seconds and the program set's size. Engines of the same shapes in this
    process share compiled programs, so a second policy's warm-up mostly finds them ready."""
    start = time.perf_counter()
    engine.warm_up()
    seconds = time.perf_counter() - start
    programs = engine.stats()["programs"]
    return {"seconds": round(seconds, 3),
            "warm_up_s": None if engine.warm_up_s is None else round(engine.warm_up_s, 3),
            "programs": programs["count"], "compile_s": programs["compile_s"],
            "ready": programs["warm"]}


def enable_compile_cache(path: str | None) -> str | None:
    """JAX's persistent compilation cache (pensieve_jax.runner.compile_cache): a program compiled once
    (by either policy's engine, or an earlier run) loads in a fraction of its compile time.
    path None: $PENSIEVE_JAX_CACHE, else the default directory; "none": off (engines built
    later leave it off too). Returns the directory in use (None: off)."""
    from pensieve_jax.runner import compile_cache
    return compile_cache.enable(path)
