"""What one worker process counts, whatever engine it runs: its memory (mappings, RSS), the
XLA compilations of every jitted function (through jax.monitoring), samples of both over time,
and the real and padded step tokens of an engine that does not report them."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def memory() -> dict[str, float]:
    """This process's memory mappings (lines of /proc/self/maps), RSS and peak RSS (MiB)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/maps", "rb") as f:
            out["maps"] = sum(1 for _ in f)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key = "rss_mib" if line.startswith("VmRSS") else "peak_rss_mib"
                    out[key] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return out


def memory_fields(sample: dict) -> dict:
    """The memory numbers of a sample (maps, RSS, peak RSS), without its time and phase."""
    return {k: sample[k] for k in ("maps", "rss_mib", "peak_rss_mib") if k in sample}


class CompileCounter:
    """Counts XLA compilations of every jitted function through jax.monitoring: number and
    seconds, before and after mark_ready(); compilations served from JAX's persistent cache
    (its cache_hits event comes first, on the same thread) are counted as loads. Works on any
    engine: it only listens to jax."""

    def __init__(self):
        self.ready = False
        self._lock = threading.Lock()
        self._local = threading.local()
        self.counts = {k: {"compiled": 0, "compiled_s": 0.0, "loaded": 0, "loaded_s": 0.0}
                       for k in ("before_ready", "after_ready")}
        self.names: dict[str, dict[str, dict[str, float]]] = {"before_ready": {},
                                                               "after_ready": {}}

    def install(self) -> "CompileCounter":
        from jax import monitoring
        monitoring.register_event_listener(self._on_event)
        monitoring.register_event_duration_secs_listener(self._on_duration)
        return self

    def _on_event(self, event: str, **_kw) -> None:
        if event == CACHE_HIT_EVENT:
            self._local.hit = True

    def _on_duration(self, event: str, duration: float, **kw) -> None:
        if event != COMPILE_EVENT:
            return
        hit = getattr(self._local, "hit", False)
        self._local.hit = False
        with self._lock:
            phase = "after_ready" if self.ready else "before_ready"
            c = self.counts[phase]
            kind = "loaded" if hit else "compiled"
            c[kind] += 1
            c[kind + "_s"] += float(duration)
            f = self.names[phase].setdefault(str(kw.get("fun_name", "?")),
                                             {"compiled": 0, "loaded": 0, "s": 0.0})
            f[kind] += 1
            f["s"] += float(duration)

    def mark_ready(self) -> None:
        with self._lock:
            self.ready = True

    def total(self) -> int:
        with self._lock:
            return sum(c["compiled"] + c["loaded"] for c in self.counts.values())

    def after_ready(self) -> int:
        with self._lock:
            c = self.counts["after_ready"]
            return c["compiled"] + c["loaded"]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out = {k: {kk: (round(vv, 3) if isinstance(vv, float) else vv)
                       for kk, vv in c.items()} for k, c in self.counts.items()}
            out["compile_s_total"] = round(sum(c["compiled_s"] + c["loaded_s"]
                                               for c in self.counts.values()), 3)
            out["compilations_after_ready"] = (self.counts["after_ready"]["compiled"]
                                               + self.counts["after_ready"]["loaded"])
            for phase, names in self.names.items():   # the slowest first
                out[phase + "_by_function"] = {
                    k: dict(v, s=round(v["s"], 3)) for k, v in
                    sorted(names.items(), key=lambda kv: -kv[1]["s"])}
            return out


class Sampler:
    """Every interval: memory() and the compile count, appended to a JSON-lines file (read by
    the parent if this process dies) and kept for the peaks."""

    def __init__(self, path: Path, counter: CompileCounter, interval_s: float = 0.5):
        self.path, self.counter, self.interval = path, counter, interval_s
        self.phase = "start"
        self.t0 = time.perf_counter()
        self.peak: dict[str, float] = {}
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def sample(self) -> dict:
        s = {"t_s": round(time.perf_counter() - self.t0, 2), "phase": self.phase, **memory(),
             "compilations": self.counter.total()}
        for k in ("maps", "rss_mib"):
            if k in s:
                self.peak[k] = max(self.peak.get(k, 0), s[k])
        self.samples.append(s)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(s) + "\n")
        except OSError:
            pass
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def thin(samples: list[dict], n: int) -> list[dict]:
    """About n samples spread over the list, the last one always kept."""
    if len(samples) <= n:
        return samples
    step = len(samples) / n
    return [samples[int(i * step)] for i in range(n)] + [samples[-1]]


class PaddingCounter:
    """Real and padded step tokens of an engine whose stats() has no "programs" (the old one):
    wraps runner.step and pads as its runner does (a power-of-two bucket of tokens)."""

    def __init__(self, engine):
        try:
            from pensieve_jax.runner import bucket     # the old engine's flat layout
        except ImportError:
            from pensieve_jax.runner.programs import bucket
        runner = engine.runner
        step, minimum = runner.step, runner.buckets.min_tokens
        self.real = self.padded = 0

        def counted(s, *a, **kw):
            n = len(s.token_ids)
            self.real += n
            self.padded += bucket(n, minimum)
            return step(s, *a, **kw)
        runner.step = counted
