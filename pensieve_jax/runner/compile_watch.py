"""Counting XLA compiles that happen where none should: on an engine's thread once it is ready.

JAX reports every backend compile (a cache miss of any jitted function, including one loaded
from the persistent compilation cache) as a monitoring event; one process-wide listener hands
it to the armed watches of the thread that compiled.
"""

from __future__ import annotations

import logging
import threading
import weakref

import jax

log = logging.getLogger(__name__)

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_watches: "weakref.WeakSet[CompileWatch]" = weakref.WeakSet()
_listening = False
_lock = threading.Lock()


def _on_event(event: str, seconds: float, **kwargs) -> None:
    if event != BACKEND_COMPILE_EVENT:
        return
    thread = threading.current_thread()
    for watch in list(_watches):
        if watch.thread is thread:
            watch.record(kwargs.get("fun_name", "?"), seconds)


class CompileWatch:
    """Compiles of any jitted function on one thread after `arm(thread)` (an engine arms it on
    its thread once ready: every compile there is then a program outside the set)."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.count = 0
        self.seconds = 0.0
        self.names: list[str] = []        # the last few, for stats

    def arm(self, thread: threading.Thread) -> None:
        global _listening
        with _lock:
            if not _listening:
                jax.monitoring.register_event_duration_secs_listener(_on_event)
                _listening = True
            self.thread = thread
            _watches.add(self)

    def record(self, name: str, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds
        self.names = (self.names + [name])[-8:]
        log.warning("XLA compiled %s (%.2f s) on the engine thread after the engine was ready: "
                    "a program outside the precompiled set", name, seconds)

    def report_stats(self) -> dict[str, dict]:
        """A Reporter (model/reporting.py): programs.compilations_after_ready (compiles since
        armed, step programs too) and programs.compiled_after_ready (the last few names)."""
        return {"programs": {"compilations_after_ready": self.count,
                             "compiled_after_ready": list(self.names)}}


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str):
    """A tqdm bar on a terminal (stderr); nothing elsewhere (logs carry a line per program)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="program", disable=None, leave=False)
