"""BackgroundHttp: an HttpGateway on its own thread and event loop (tests, notebooks).

    with BackgroundServer(engine) as server, BackgroundHttp(server.target, "tiny") as http:
        client = openai.OpenAI(base_url=http.url, api_key="none")
"""

from __future__ import annotations

from typing import Any

from serving.http.gateway import HttpGateway
from serving.loop_thread import LoopThread


class BackgroundHttp:
    """An HttpGateway (the same arguments) listening on host:port (0: a free port), started on
    its own thread; `url` is the base URL of its OpenAI API."""

    def __init__(self, grpc_target: str, model_name: str, host: str = "127.0.0.1",
                 port: int = 0, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None, **kwargs: Any):
        self.gateway = HttpGateway(grpc_target, model_name, **kwargs)
        self._loop = LoopThread("pensieve-http", lambda: self.gateway.start(
            host, port, ssl_certfile, ssl_keyfile), on_failure=self.gateway.shutdown)

    @property
    def port(self) -> int:
        return self.gateway.port

    @property
    def url(self) -> str:
        """The OpenAI base URL, e.g. "http://127.0.0.1:PORT/v1"."""
        return self.gateway.url

    def stop(self) -> None:
        self._loop.stop(self.gateway.shutdown)

    def __enter__(self) -> "BackgroundHttp":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
