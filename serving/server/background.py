"""BackgroundServer: a PensieveServer on its own thread and event loop (notebooks, tests)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from serving.loop_thread import LoopThread
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
        self._loop = LoopThread("pensieve-grpc", self.server.start)

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
        self._loop.run(self.server.wait_ready(), timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's event loop (for inspection); returns its result."""
        async def run():
            return fn()
        return self._loop.run(run())

    def stop(self, grace: float = 1.0) -> None:
        self._loop.stop(lambda: self.server.shutdown(grace))

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
