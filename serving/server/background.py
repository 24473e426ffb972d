"""BackgroundServer: a PensieveServer on its own thread and event loop (notebooks, tests)."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any, Callable

from serving.server.service import PensieveService
from serving.server.startup import DEFAULT_HOST, PensieveServer

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine


class BackgroundServer:
    """A PensieveServer on its own thread and event loop. `target` is its address.

        with BackgroundServer(engine) as server:
            chat = serving.client.connect(server.target).session()
    """

    def __init__(self, engine: "Engine", host: str = DEFAULT_HOST, port: int = 0, **kwargs):
        self.server = PensieveServer(engine, host, port, **kwargs)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),),
                                        name="pensieve-grpc", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()

    @property
    def target(self) -> str:
        return self.server.target

    @property
    def internal_target(self) -> str:
        """Where its MemPool listens (the internal port)."""
        return self.server.internal_target

    @property
    def replica_address(self) -> str:
        """This server as a router's replica: "HOST:PORT,internal=HOST:PORT"."""
        return self.server.replica_address

    @property
    def service(self) -> PensieveService:
        return self.server.service

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the server is warm (health SERVING); NotReady if its warm-up failed."""
        asyncio.run_coroutine_threadsafe(self.server.wait_ready(), self._loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's event loop (for inspection); returns its result."""
        async def run():
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def stop(self, grace: float = 1.0) -> None:
        if not self._thread.is_alive():
            return

        async def stop():
            await self.server.shutdown(grace)
            self._stop.set()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result()
        self._thread.join()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
