"""Warm-up: a server opens its port at once with gRPC health NOT_SERVING, compiles the engine's
programs (`engine.warm_up()`) on a background thread, then reports SERVING. Turns that arrive
meanwhile wait behind the WarmUpGate (their deadline still runs); if the warm-up fails they
end UNAVAILABLE (NotReady)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

from pensieve_jax.engine.engine import EngineConfig

PRECOMPILE_ENV = "PENSIEVE_JAX_PRECOMPILE"   # 0: engines compile their programs on first use


def warm_up_later(options: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """EngineConfig options for an engine a PensieveServer warms up once its port is open:
    (the options with the engine's own precompile off, whether the server should warm it up:
    EngineConfig.precompile, None meaning on unless PENSIEVE_JAX_PRECOMPILE=0). An engine
    without precompile gets the options unchanged and no warm-up."""
    if "precompile" not in {f.name for f in dataclasses.fields(EngineConfig)}:
        return dict(options), False
    wanted = options.get("precompile")
    if wanted is None:
        config = EngineConfig(**options)
        wanted = config.precompile_enabled if hasattr(config, "precompile_enabled") else \
            os.environ.get(PRECOMPILE_ENV, "1").strip().lower() not in ("0", "false", "no")
    return {**options, "precompile": False}, bool(wanted)


def describe_programs(programs: dict | None) -> str:
    """' (N programs compiled in S s)' from engine.stats()["programs"], or ''."""
    if not isinstance(programs, dict) or "count" not in programs:
        return ""
    seconds = programs.get("compile_s")
    took = f" in {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
    return f" ({programs['count']} programs compiled{took})"


class WarmUpGate:
    """What turns wait behind: open until close() (a warm-up began), then shut until open(),
    or open(error) after which waiting raises error. Used on one event loop."""

    def __init__(self):
        self._future: asyncio.Future | None = None

    def close(self) -> None:
        self._future = asyncio.get_running_loop().create_future()

    def open(self, error: BaseException | None = None) -> None:
        """Let the waiting turns through (or fail them with error); later calls do nothing."""
        gate = self._future
        if gate is None or gate.done():
            return
        if error is None:
            gate.set_result(None)
        else:
            gate.set_exception(error)
            gate.exception()           # retrieved: no "never retrieved" log without waiters

    @property
    def is_open(self) -> bool:
        """Open, and not with an error."""
        gate = self._future
        return gate is None or gate.done() and gate.exception() is None

    async def wait(self) -> None:
        """Return once open; raises the error it was opened with, if any."""
        if self._future is not None:
            await asyncio.shield(self._future)
