"""What the machine was doing and what it can do: load while a measurement ran, and memory
bandwidth (the floor of a decode step that reads every weight once)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np


def _proc_busy() -> tuple[float, float] | None:
    """(seconds all CPUs were busy since boot, seconds this process ran) from /proc."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)      # idle + iowait
        busy_total = sum(fields[:8]) - idle                             # without guest time
        with open("/proc/self/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
        mine = int(st[11]) + int(st[12])                                # utime + stime
        hz = os.sysconf("SC_CLK_TCK")
        return busy_total / hz, mine / hz
    except (OSError, ValueError, IndexError):
        return None


class Load:
    """The machine's load around one measurement:

        with Load() as load:
            ...
        load.record  # loadavg_before/after (1, 5, 15 min), others_cpus, own_cpus, wall_s

    others_cpus: CPUs (cores' worth) busy with other processes during the measurement, from
    /proc/stat minus this process's own CPU time (0 on an idle machine; at 2 the other tenants
    took both cores); own_cpus: this process's CPU use."""

    def __enter__(self) -> "Load":
        self.record: dict[str, Any] = {"loadavg_before": _loadavg()}
        self._t0, self._b0 = time.perf_counter(), _proc_busy()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._t0
        b1 = _proc_busy()
        self.record["loadavg_after"] = _loadavg()
        self.record["wall_s"] = round(wall, 4)
        if self._b0 and b1 and wall >= 0.5:       # /proc counts in ticks (10 ms)
            total, mine = b1[0] - self._b0[0], b1[1] - self._b0[1]
            self.record["own_cpus"] = round(mine / wall, 2)
            self.record["others_cpus"] = round(max(0.0, total - mine) / wall, 2)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def memory_bandwidth(mib: int = 1024, repeats: int = 5, threads: int | None = None
                     ) -> dict[str, Any]:
    """Best-of-`repeats` GB/s (1e9 bytes/s) of NumPy over a float32 array of `mib` MiB:
    read (a sum, one thread), read with `threads` threads (each sums its part; NumPy releases
    the GIL in reductions), gemv (matrix [N, 1024] times a vector: what a decode step does with
    its weights) and copy (np.copyto: bytes read + bytes written). read_gbs: the best read
    figure (sum, threaded sum, gemv), the bandwidth the decode floor uses."""
    threads = threads or os.cpu_count() or 1
    n = mib * 2 ** 20 // 4
    a = np.ones(n, np.float32)
    b = np.empty_like(a)
    nbytes = a.nbytes

    def best(fn) -> float:
        fn()                      # first touch
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    parts = np.array_split(a, threads)

    def threaded_sum():
        ts = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    read1 = nbytes / best(a.sum) / 1e9
    readn = nbytes / best(threaded_sum) / 1e9
    copy = 2 * nbytes / best(lambda: np.copyto(b, a)) / 1e9
    del b
    mat = a.reshape(-1, 1024)            # a decode step's pattern: weights [N, K] @ x [K]
    x = np.ones(1024, np.float32)
    gemv = nbytes / best(lambda: mat @ x) / 1e9
    del a, mat
    return {"array_mib": mib, "repeats": repeats, "threads": threads,
            "read_1thread_gbs": round(read1, 2), f"read_{threads}threads_gbs": round(readn, 2),
            "gemv_gbs": round(gemv, 2), "copy_gbs": round(copy, 2),
            "read_gbs": round(max(read1, readn, gemv), 2),
            "method": "best of repeats over a float32 array; read: np.sum (threads: "
                      "array_split parts summed concurrently, NumPy releases the GIL); gemv: "
                      "the array as a [N, 1024] matrix times a vector (BLAS, its threads); "
                      "copy: np.copyto, read + written bytes. read_gbs: the best read figure"}


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """Best-of-`repeats` GFLOP/s of NumPy's BLAS on an [n, n] x [n, n] float32 product (all
    its threads): the machine's f32 compute ceiling that a prefill (matmuls of hundreds of rows)
    runs against, as decode runs against the memory bandwidth."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a                                 # first touch, BLAS threads started
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t)
    return {"n": n, "repeats": repeats, "gflops": round(2 * n ** 3 / min(times) / 1e9, 1),
            "method": "best of repeats of a float32 [n, n] @ [n, n] (NumPy's BLAS)"}
