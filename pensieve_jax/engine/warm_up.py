"""Warming an engine up: compile every program it can run before any request (Engine.warm_up),
then watch for compiles on its thread, which are bugs from then on (runner/compile_watch.py)."""

from __future__ import annotations

import logging
import threading
import time

from pensieve_jax.runner.compile_watch import CompileWatch, progress_bar
from pensieve_jax.runner.seam import Runner

log = logging.getLogger(__name__)


class WarmUp:
    """An engine's warm-up, run once on its thread (`run`), and the watch it arms there.

    seconds: how long it took (None: not run, or the runner was ready without it)."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.watch = CompileWatch()       # any compile on the engine thread once ready
        self.seconds: float | None = None

    def run(self) -> None:
        """On the engine thread: compile the runner's programs (a log line each), then arm the
        watch on this thread. Idempotent."""
        if not self.runner.ready:
            self.seconds = precompile(self.runner)
            self.watch.arm(threading.current_thread())

    def report_stats(self) -> dict[str, dict[str, float | None]]:
        """A Reporter (model/reporting.py): programs.warm_up_s (`seconds`)."""
        return {"programs": {"warm_up_s": self.seconds}}


def precompile(runner: Runner) -> float:
    """Compile the runner's programs with a progress bar and a log line each; the seconds."""
    start = time.perf_counter()
    total = len(runner.programs.shapes)
    bar = progress_bar(total, "compiling step programs")
    done = iter(range(1, total + 1))

    def compiled(shape, seconds: float) -> None:
        log.info("step program %d/%d ready at %.1f s: %s", next(done), total, seconds, shape)
        bar.update(1)
    try:
        runner.precompile(compiled)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    log.info("engine ready: %d step programs compiled or loaded in %.1f s", total, seconds)
    return seconds
