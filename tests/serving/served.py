"""`python -m serving serve` as a subprocess for the end-to-end tests: started on free loopback
ports with the shared engine options, its output read on a thread of its own (so a chatty
server never blocks on a full pipe), what it announces found in that output, stopped with a
SIGTERM.

    served = Served(env, "--http-port", "0")          # returns once gRPC is announced
    url = served.announced(r"OpenAI API on (http://\\S+/v1)")
    assert served.stop() == 0, "".join(served.lines)
"""

from __future__ import annotations

import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

from .conftest import ENGINE_OPTIONS, MODEL

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVING = r"pensieve: serving \S+ on (127\.0\.0\.1:\d+)"
METRICS = r"metrics on http://127\.0\.0\.1:(\d+)/metrics"


def server_command(*extra: str) -> list[str]:
    """`python -m serving serve` on random:tiny with the tests' engine options, port 0, then
    `extra`."""
    options = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE_OPTIONS.items()]
    return [sys.executable, "-m", "serving", "serve", "--model", MODEL, "--port", "0",
            *options, *extra]


class Served:
    """A `pensieve serve` subprocess; `target` is its gRPC address, `lines` what it printed so
    far. Raises RuntimeError (with its output) if it announces no port within start_s."""

    def __init__(self, env: dict, *extra: str, start_s: float = 60.0):
        self.proc = subprocess.Popen(server_command(*extra), cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.announced(SERVING, start_s)
        if target is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))
        self.target: str = target

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def announced(self, pattern: str, timeout: float = 60.0) -> str | None:
        """Group 1 of the first line printed that matches pattern, waiting up to timeout
        seconds for it (None if none came, or the process ended first)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m.group(1)
            if time.monotonic() > deadline or not self._reader.is_alive():
                return next((m.group(1) for line in list(self.lines)
                             if (m := re.search(pattern, line))), None)
            time.sleep(0.01)

    @property
    def metrics_port(self) -> int | None:
        """The Prometheus port, when it announced one (--metrics-port)."""
        port = self.announced(METRICS, timeout=0)
        return int(port) if port is not None else None

    def stop(self, signal_it: bool = True, timeout: float = 20) -> int:
        """Wait for the exit (after a SIGTERM unless signal_it is False); the exit status. Every
        line it printed is in `lines` then."""
        if signal_it and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        return self.proc.returncode
