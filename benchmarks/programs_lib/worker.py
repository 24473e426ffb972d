"""One worker process, one engine: Engine.from_pretrained timed (compilations before ready
counted), then the phases the spec names; its result JSON is rewritten after every phase, so a
process that dies leaves what it measured. `bench_programs.py --worker SPEC_JSON` runs it, with
pensieve_jax on PYTHONPATH from the system's checkout."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from programs_lib.counters import CompileCounter, Sampler, memory, memory_fields, thin
from programs_lib.phases import PHASES, engine_programs
from programs_lib.report import phase_line


def without_editable_finders() -> None:
    """Drop setuptools' editable-install finders: they would resolve a pensieve_jax module the
    PYTHONPATH checkout lacks (the old worktree) from the installed checkout instead."""
    def editable(f) -> bool:
        return (getattr(f, "__module__", None) or type(f).__module__).startswith("__editable__")
    sys.meta_path[:] = [f for f in sys.meta_path if not editable(f)]


def close_engine(engine) -> None:
    """close() or shutdown(), whichever this engine has."""
    for name in ("close", "shutdown"):
        fn = getattr(engine, name, None)
        if callable(fn):
            fn()
            return


def worker(spec: dict) -> None:
    """One process: start the engine (timed), then the phases in spec["phases"]; the result
    JSON is rewritten after every phase, so a process that dies leaves what it measured."""
    t_start = time.perf_counter()
    out = Path(spec["out"])
    result: dict[str, Any] = {"system": spec["system"], "role": spec["role"], "phases": []}

    def save() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=float))
        tmp.replace(out)

    without_editable_finders()
    import jax
    counter = CompileCounter().install()
    import pensieve_jax
    if not Path(pensieve_jax.__file__).resolve().is_relative_to(Path(spec["source"]).resolve()):
        raise SystemExit(f"pensieve_jax came from {pensieve_jax.__file__}, not {spec['source']}")
    from pensieve_jax import Engine, EngineConfig     # (every layout exports them)
    from common import git_commit
    result["pensieve_jax"] = str(Path(pensieve_jax.__file__).parent)
    result["git_commit"] = git_commit()
    result["env"] = {k: os.environ.get(k) for k in ("PENSIEVE_JAX_CACHE",
                                                     "PENSIEVE_JAX_PRECOMPILE")}
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    has_cache = (Path(pensieve_jax.__file__).parent / "compile_cache.py").exists()
    result["api"] = {"precompile_option": "precompile" in fields,
                     "warm_up": hasattr(Engine, "warm_up"), "compile_cache": has_cache}
    options = {k: v for k, v in spec["engine_options"].items() if k in fields}
    result["engine_options"] = options
    result["engine_options_unknown"] = sorted(set(spec["engine_options"]) - fields)
    result["import_s"] = time.perf_counter() - t_start
    sampler = Sampler(Path(spec["samples"]), counter).start()
    mem0 = memory()
    t0 = time.perf_counter()
    sampler.phase = "startup"
    engine = Engine.from_pretrained(spec["model"], spec["dtype"], **options)
    ready_s = time.perf_counter() - t0
    counter.mark_ready()
    sampler.phase = "ready"
    stats = engine.stats()
    result["startup"] = {
        "from_pretrained_s": ready_s,
        "process_to_ready_s": time.time() - spec.get("spawned_at", time.time()),
        "memory_before": mem0, "memory_ready": memory_fields(sampler.sample()),
        "compiles": counter.snapshot(), "engine_programs": engine_programs(stats),
        "engine_compilations": stats.get("compilations")}
    result["jax"] = jax.__version__
    result["phases"].append("startup")
    print(f"[{spec['label']}] ready in {ready_s:.1f} s, "
          f"{result['startup']['compiles']['before_ready']['compiled']} compiled, "
          f"{result['startup']['compiles']['before_ready']['loaded']} loaded from cache",
          flush=True)
    save()
    try:
        for phase, fn in PHASES:
            if phase in spec["phases"]:
                result[phase] = fn(engine, spec, counter, sampler)
                result["phases"].append(phase)
                print(f"[{spec['label']}] {phase} done: {phase_line(phase, result[phase])}",
                      flush=True)
                save()
        stats = engine.stats()
        result["engine_programs"] = engine_programs(stats)
        result["engine_compilations"] = stats.get("compilations")
    finally:
        sampler.stop()
        result["compiles"] = counter.snapshot()
        result["memory_end"] = memory()
        result["memory_peak"] = dict(sampler.peak)
        result["samples"] = thin(sampler.samples, 60)
        save()
    t = time.perf_counter()
    close_engine(engine)
    result["close_s"] = time.perf_counter() - t
    result["phases"].append("closed")
    save()
