"""BackgroundHttp: an HttpGateway on its own thread and event loop (tests, notebooks).

    with BackgroundServer(engine) as server, BackgroundHttp(server.target, "tiny") as http:
        client = openai.OpenAI(base_url=http.url, api_key="none")
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from serving.http.gateway import HttpGateway


class BackgroundHttp:
    """An HttpGateway (the same arguments) listening on host:port (0: a free port), started on
    its own thread; `url` is the base URL of its OpenAI API."""

    def __init__(self, grpc_target: str, model_name: str, host: str = "127.0.0.1",
                 port: int = 0, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None, **kwargs: Any):
        self.gateway = HttpGateway(grpc_target, model_name, **kwargs)
        self._address = (host, port, ssl_certfile, ssl_keyfile)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),),
                                        name="pensieve-http", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.gateway.start(*self._address)
        except BaseException as e:
            self._error = e
            self._ready.set()
            await self.gateway.shutdown()
            return
        self._ready.set()
        await self._stop.wait()
        await self.gateway.shutdown()

    @property
    def port(self) -> int:
        return self.gateway.port

    @property
    def url(self) -> str:
        """The OpenAI base URL, e.g. "http://127.0.0.1:PORT/v1"."""
        return self.gateway.url

    def stop(self) -> None:
        if self._thread.is_alive() and self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()

    def __enter__(self) -> "BackgroundHttp":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
