"""One load point of one target: warm-up passes until nothing compiles, then the measured pass
(rerun while it still compiles), with device pages sampled and the engine's counters diffed."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any

import numpy as np

import workload as wl

from .metrics import numeric_delta, step_profile, summarize_pass
from .replay import replay


class PageSampler:
    """Polls engine.stats()['pages'] while a pass runs: peak and mean pages in use per tier."""

    def __init__(self, target, interval_s: float = 0.25):
        self.target, self.interval = target, interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self.target.kind == "engine":
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.samples.append(self.target.stats().get("pages", {}))
            except Exception:
                return
            if self._stop.wait(self.interval):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self.samples.append(self.target.stats().get("pages", {}))

    def summary(self) -> dict[str, Any]:
        out = {}
        for tier in sorted({t for s in self.samples for t in s}):
            used = [s[tier].get("used", 0) for s in self.samples if tier in s]
            total = max((s[tier].get("total", 0) for s in self.samples if tier in s), default=0)
            out[tier] = {"peak_used": int(max(used)), "mean_used": float(np.mean(used)),
                         "total": int(total)}
        return out


def measure(target, workload: wl.Workload, *, seed: int, users: int | None, warmup_passes: int,
            progress: bool, label: str, keep_outputs: bool = False,
            max_retries: int = 2) -> dict[str, Any]:
    """Warm-up passes (other token ids and conversation ids) until one compiles nothing (at
    most warmup_passes), then the measured pass (token ids from `seed`, the same for every
    policy). A measured pass that still compiled is kept as one more warm-up pass and run again
    under new conversation ids (at most max_retries times); the last one's compilations are
    reported either way."""
    warm = []
    for k in range(warmup_passes):
        before = target.compilations()
        start = time.perf_counter()
        replay(target, workload, token_seed=seed + 1000 * (k + 1), tag=f"{label}-warm{k}",
               users=users, progress=progress, desc=f"{label} warm-up {k + 1}")
        compiled = target.compilations() - before
        warm.append({"compilations": compiled, "seconds": time.perf_counter() - start})
        if compiled == 0:
            break
    for attempt in range(max_retries + 1):
        log_start = len(getattr(target, "step_log", ()))
        before_stats = target.stats()
        load_before = _loadavg()
        with PageSampler(target) as pages:
            run = replay(target, workload, token_seed=seed, tag=f"{label}-run{attempt}",
                         users=users, progress=progress, desc=label, keep_outputs=keep_outputs)
        after_stats = target.stats()
        delta = numeric_delta(before_stats, after_stats)
        if not delta.get("compilations") or attempt == max_retries:
            break
        warm.append({"compilations": int(delta["compilations"]), "seconds": run["wall_s"],
                     "measured_pass_rerun": True})
    result = summarize_pass(run["records"], run["wall_s"])
    result.update({
        "rate_conversations_per_s": workload.rate, "users": users, "wall_s": run["wall_s"],
        "warmup_passes": warm, "compilations_while_measured": int(delta.get("compilations", 0)),
        "engine_delta": delta, "pages": pages.summary(),
        "loadavg_1min": [load_before, _loadavg()],
        "model_steps": step_profile(getattr(target, "step_log", [])[log_start:]),
        "turns": [dataclasses.asdict(r) for r in run["records"]],
    })
    if keep_outputs:
        result["_outputs"] = run["outputs"]
    return result


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
