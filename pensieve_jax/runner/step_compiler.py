"""Compiling the step programs of a ProgramSet: all of them before the engine is ready
(`precompile`), each found again by its shape while serving (`executable`). A compile after
ready is a bug: logged as a warning and recorded.

Programs are shared by every runner of the same key in the process (`EXECUTABLES`), traced
once per machine and code version (runner/program_store.py) and their compiles kept in JAX's
persistent compilation cache (runner/compile_cache.py).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
import warnings
from typing import Any, Callable

from pensieve_jax.runner import program_store
from pensieve_jax.runner.page_programs import Pools
from pensieve_jax.runner.programs import ProgramSet, StepShape
from pensieve_jax.runner.step_program import export_step, lower_exported, lower_step

log = logging.getLogger(__name__)

EXECUTABLES: dict[tuple, Any] = {}    # every compiled program of the process, by key


class StepCompiler:
    """The compiled step programs of one runner. key_base: what besides the shape makes a
    program (model config, dtype, attention, pool, devices); step / step_loading: the jitted
    step without and with in-step page loads (step_program.jit_step)."""

    def __init__(self, programs: ProgramSet, pools: Pools, key_base: tuple, step, step_loading,
                 params_of: Callable[[], Any], incoming_sharding: Any):
        self.programs = programs
        self.pools = pools
        self.ready = False            # set once the program set is compiled: later compiles warn
        self.after_ready: list[str] = []
        self.compile_s = 0.0          # seconds spent compiling step programs
        self.in_step_load_error: str | None = None   # why steps cannot load pages inside
        self.compiled: dict[tuple, Any] = {}
        self._key_base = key_base
        self._step, self._step_loading = step, step_loading
        self._params_of = params_of
        self._incoming_sharding = incoming_sharding

    def key(self, shape: StepShape) -> tuple:
        return self._key_base + (shape,)

    def executable(self, shape: StepShape):
        """The compiled program for shape (compiled now if it is not yet: before ready, a
        lazy engine; after, a bug)."""
        key = self.key(shape)
        executable = EXECUTABLES.get(key)
        if executable is None:          # shared by every runner of the same shapes in-process
            if self.ready:
                self.after_ready.append(str(shape))
                log.warning("compiling step program %s after the engine was ready (a shape "
                            "outside the program set: a bug)", shape)
            start = time.perf_counter()
            EXECUTABLES[key] = executable = self.lower(shape).compile()
            self.compile_s += time.perf_counter() - start
        self.compiled[key] = executable
        return executable

    def lower(self, shape: StepShape):
        step = self._step_loading if shape.incoming_pages else self._step
        params, kv = self._params_of(), self.pools.kv
        # traced once per machine and code version (program_store); not the variants that
        # take host pages (their memory kinds) nor those over a mesh (their shardings)
        if self.pools.mesh is None and not shape.incoming_pages:
            program = program_store.exported(self.key(shape), params,
                                             lambda: export_step(step, params, kv, shape))
            if program is not None:
                return lower_exported(program, params, kv, shape)
        return lower_step(step, params, kv, shape, self._incoming_sharding)

    def no_in_step_loads(self, error: Exception) -> None:
        """Steps cannot load pages inside on this backend: they are loaded before it."""
        self.in_step_load_error = f"{type(error).__name__}: {error}"[:500]
        warnings.warn("pages cannot be loaded inside a step on this backend; they are "
                      f"loaded before it instead ({self.in_step_load_error})")

    def precompile(self, progress: Callable[[StepShape, float], None] | None = None) -> None:
        """Compile every step program of the set; progress(shape, seconds) after each.
        Programs are traced (or read from the program store) one by one and compiled in
        parallel (XLA compiles outside the GIL; JAX's cache answers warm ones)."""
        start = time.perf_counter()
        workers = max(1, min(os.cpu_count() or 1, 4))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = {}
            for shape in self.programs.shapes:   # each compile starts as the next one traces
                key = self.key(shape)
                if shape.incoming_pages and self.in_step_load_error is not None:
                    continue
                if key in EXECUTABLES:
                    self.compiled[key] = EXECUTABLES[key]
                else:
                    try:
                        futures[pool.submit(self.lower(shape).compile)] = (shape, key)
                        continue
                    except Exception as e:  # noqa: BLE001 - a backend that cannot lower the load
                        self._failed(shape, e)
                if progress is not None:
                    progress(shape, time.perf_counter() - start)
            for future in concurrent.futures.as_completed(futures):
                shape, key = futures[future]
                try:
                    EXECUTABLES[key] = self.compiled[key] = future.result()
                except Exception as e:  # noqa: BLE001 - see dispatch: loads go before the step
                    self._failed(shape, e)
                if progress is not None:
                    progress(shape, time.perf_counter() - start)
        self.compile_s += time.perf_counter() - start

    def _failed(self, shape: StepShape, error: Exception) -> None:
        if not shape.incoming_pages:
            raise error
        self.no_in_step_loads(error)
