"""Page file writes and deletes on worker threads, so that an fsync or an unlink (milliseconds
each on a busy disk) never stalls the engine loop. A worker only runs page_file.write_atomic on
arrays it was handed, or os.remove; everything else (which files exist, their states,
statistics) stays on the engine thread, which collects finished writes with `done()`. Until a
file is written its pages are served from the arrays kept here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import time

import numpy as np

from pensieve_jax.kvcache import page_file

__all__ = ["BackgroundWrites"]

WORKERS = 2        # files written at once (their fsyncs overlap)


def _write(path: str, header: bytes, k: np.ndarray, v: np.ndarray) -> float:
    start = time.perf_counter()
    page_file.write_atomic(path, header, k, v)
    return time.perf_counter() - start


def _delete(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class BackgroundWrites:
    def __init__(self):
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._inflight: dict[str, tuple[concurrent.futures.Future, np.ndarray, np.ndarray]] = {}
        self._finished: collections.deque[str] = collections.deque()   # appended by workers
        self._deletes: list[concurrent.futures.Future] = []

    def _submit(self, fn, *args) -> concurrent.futures.Future:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=WORKERS, thread_name_prefix="pensieve-page-files")
        return self._pool.submit(fn, *args)

    def submit(self, name: str, path: str, header: bytes, k: np.ndarray, v: np.ndarray) -> None:
        """Start writing file `name` at path (header, then pages k, v [layers, slots, ...])."""
        future = self._submit(_write, path, header, k, v)
        self._inflight[name] = (future, k, v)
        future.add_done_callback(lambda _: self._finished.append(name))

    def delete(self, path: str) -> None:
        """Remove a file (if it is there) in the background."""
        self._deletes = [f for f in self._deletes if not f.done()]
        self._deletes.append(self._submit(_delete, path))

    def cancel(self, name: str) -> bool:
        """Give up a write that has not started (True: nothing of it reaches the disk)."""
        entry = self._inflight.get(name)
        if entry is None or not entry[0].cancel():
            return False
        del self._inflight[name]
        return True

    def arrays(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The pages of a file still being written (None: not in flight)."""
        entry = self._inflight.get(name)
        return None if entry is None else (entry[1], entry[2])

    def done(self, wait: bool = False) -> list[tuple[str, float | OSError]]:
        """Writes finished since the last call (wait: every write and delete, waiting for
        them): (name, seconds it took) or (name, the OSError it failed with)."""
        if wait:
            concurrent.futures.wait([f for f, _, _ in self._inflight.values()] + self._deletes)
            self._deletes = []
        names = list(self._inflight) if wait else []
        while self._finished:
            names.append(self._finished.popleft())
        out = []
        for name in names:
            entry = self._inflight.pop(name, None)
            if entry is None:          # cancelled, or taken in already
                continue
            try:
                out.append((name, entry[0].result()))
            except OSError as e:
                out.append((name, e))
        return out

    def __len__(self) -> int:
        return len(self._inflight)
