"""LoopThread: an asyncio event loop on its own daemon thread, for servers run in the background
(notebooks, tests): BackgroundServer (gRPC) and BackgroundHttp (the OpenAI API)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable, Callable


class LoopThread:
    """Runs `start()` on a new event loop in a thread and returns once it has (raising what it
    raised; `on_failure()` runs first, if given); the loop then waits until stop()."""

    def __init__(self, name: str, start: Callable[[], Awaitable[Any]],
                 on_failure: Callable[[], Awaitable[Any]] | None = None):
        self._start, self._on_failure = start, on_failure
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name=name,
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self._start()
        except BaseException as e:
            self._error = e
            self._ready.set()
            if self._on_failure is not None:
                await self._on_failure()
            return
        self._ready.set()
        await self._stop.wait()

    def run(self, coroutine: Awaitable[Any], timeout: float | None = None) -> Any:
        """Run a coroutine on the loop; its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, shutdown: Callable[[], Awaitable[Any]]) -> None:
        """Run shutdown() on the loop, end the loop and join the thread (once)."""
        if not self._thread.is_alive():
            return

        async def stop():
            await shutdown()
            self._stop.set()
        self.run(stop())
        self._thread.join()
