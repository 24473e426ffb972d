"""Turns on worker threads: each streaming call reads its turn (a blocking iterator) in a worker
thread that hands the items to the event loop, so any number of streams proceed at once."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Callable, Iterator

from serving.errors import ShuttingDown


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class Worker:
    """Runs a blocking iterator in a worker thread; the event loop reads its items in order.
    cancel() stops it: on_cancel unblocks the iterator (it cancels the engine turn), and the
    worker closes the iterator at its next item."""

    def __init__(self, loop: asyncio.AbstractEventLoop, executor, make_iter: Callable[[], Iterator],
                 on_cancel: Callable[[], None]):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._on_cancel = on_cancel
        self.cancelled = False
        self.ended = False          # the reader saw the iterator's end (or its error)
        self.done = loop.run_in_executor(executor, self._run, loop, make_iter)

    def _run(self, loop, make_iter) -> None:
        def put(item):
            loop.call_soon_threadsafe(self._queue.put_nowait, item)
        try:
            items = make_iter()
            try:
                for item in items:
                    if self.cancelled:
                        break
                    put(item)
            finally:
                if hasattr(items, "close"):
                    items.close()
        except BaseException as e:  # handed to the reader
            put(_Failed(e))
            return
        put(_END)

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._on_cancel()

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._queue.get()
        if item is _END:
            self.ended = True
            raise StopAsyncIteration
        if isinstance(item, _Failed):
            self.ended = True
            raise item.error
        return item


class WorkerPool:
    """The worker threads of a server's turns (at most max_streams at once). Once draining (at
    shutdown) it starts no more; drain() lets the running ones finish, then cancels them."""

    def __init__(self, max_streams: int = 1024):
        self.workers: set[Worker] = set()
        self.draining = False
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_streams, thread_name_prefix="pensieve-stream")

    def start(self, make_iter: Callable[[], Iterator], on_cancel: Callable[[], None]) -> Worker:
        """A Worker reading make_iter() (ShuttingDown once draining)."""
        if self.draining:
            raise ShuttingDown("the server is shutting down")
        worker = Worker(asyncio.get_running_loop(), self._executor, make_iter, on_cancel)
        self.workers.add(worker)
        worker.done.add_done_callback(lambda _: self.workers.discard(worker))
        return worker

    async def drain(self, grace: float) -> None:
        """Let running turns finish for up to `grace` seconds, then cancel the rest (their
        streams end with finish_reason "abort")."""
        self.draining = True
        if self.workers:
            await asyncio.wait([w.done for w in self.workers], timeout=grace)
        for worker in list(self.workers):
            worker.cancel()
        if self.workers:
            await asyncio.wait([w.done for w in self.workers], timeout=30)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
