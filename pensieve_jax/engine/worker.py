"""The engine thread: one background thread owns all scheduling state and runs the steps;
callers on any thread post functions to its inbox, which run between steps.

An inbox function runs after the step in flight is drained (it sees every token sampled so
far, no placeholder), unless it is marked `overlaps` (new turns: they only join the queue).
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from typing import Any, Callable

from pensieve_jax.engine.errors import EngineClosed
from pensieve_jax.engine.loop import StepLoop
from pensieve_jax.kvcache.conversations import ConversationStore

log = logging.getLogger(__name__)


def overlaps(fn: Callable[[], None]) -> Callable[[], None]:
    """Mark an inbox function that may run while a step is in flight."""
    fn.overlaps = True
    return fn


class EngineThread:
    """Started by the first post; `stop(last)` runs `last` after what was posted before, then
    ends the thread. ttl: idle conversations are forgotten after it (checked between steps)."""

    def __init__(self, loop: StepLoop, store: ConversationStore, ttl: float | None):
        self.loop, self.store, self.ttl = loop, store, ttl
        self.closed = False                  # stop() ran (guarded by _lock)
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def post(self, fn: Callable[[], None]) -> None:
        with self._lock:         # so nothing lands in the inbox behind stop()'s end
            if self.closed:
                raise EngineClosed("the engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pensieve-engine",
                                                daemon=True)
                self._thread.start()
            self._inbox.put(fn)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread between steps; its result or exception comes back."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                future.set_result(fn())
            except Exception as e:  # delivered to the caller
                future.set_exception(e)
        self.post(run)
        return future.result()

    def stop(self, last: Callable[[], None]) -> bool:
        """End the thread after what was posted, `last` run on it before it ends (not run if
        the thread never started). False if it was stopped already."""
        with self._lock:
            if self.closed:
                return False
            thread = self._thread
            if thread is threading.current_thread():
                raise RuntimeError("close() on the engine thread would wait for itself")
            self.closed = True
            if thread is not None:
                self._inbox.put(last)
                self._inbox.put(None)
        if thread is not None:
            thread.join()
            self._thread = None
        return True

    def _run(self) -> None:
        ttl = self.ttl
        while True:
            block = self.loop.idle()
            try:
                while True:
                    fn = self._inbox.get(block=block, timeout=ttl / 4 if block and ttl else None)
                    if fn is None:
                        return
                    if not getattr(fn, "overlaps", False):
                        self.loop.drain()
                    try:
                        fn()
                    except Exception:  # noqa: BLE001 - the thread serves the other callers on
                        log.exception("engine inbox function failed")
                    block = False
            except queue.Empty:
                pass
            if ttl is not None:
                self.store.expire(ttl)
            try:
                self.loop.step()
            except Exception as e:  # noqa: BLE001 - a bug outside a step's own failure path
                log.exception("engine step failed")
                self.loop.fail_all(RuntimeError(f"engine step failed: {type(e).__name__}"))
