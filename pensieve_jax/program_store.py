"""Whole compiled step programs on disk, so a warm start neither traces nor compiles them.

JAX's persistent compilation cache (compile_cache) skips XLA's compile, but each program must
still be traced and lowered first to find its cache key (about a second per step program for
SmolLM2 on a 2-core CPU, more than the load). This store keeps the executables themselves
(`jax.experimental.serialize_executable`) under `<compilation cache dir>/programs/`, keyed by
everything that shapes a program:

    the program's own key (model config, dtype, attention, pool, shape, devices), the
    parameter tree's shapes, dtypes and shardings, jax and jaxlib versions, the backend and
    its devices, XLA_FLAGS, and a hash of every source file of pensieve_jax and pallas_kernels

so an edit of the code, an upgrade or another machine makes a new entry instead of loading a
stale one. A file that fails to load is ignored (and compiled again). Opt-in with
PENSIEVE_JAX_PROGRAM_STORE=1 (and never while the compilation cache is off): on XLA CPU a loaded
executable has failed at run time with "Function <fusion> not found" (cause not found yet), so
by default a warm start traces each program and JAX's cache serves the compile. The directory
is trusted like the compilation cache: entries are unpickled and run.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import jax

from pensieve_jax import compile_cache

log = logging.getLogger(__name__)

_PACKAGES = ("pensieve_jax", "pallas_kernels")
ENV = "PENSIEVE_JAX_PROGRAM_STORE"     # "1": on; unset / "0" / "none" / ...: JAX's cache only


@functools.lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    import jaxlib
    devices = [(d.platform, d.device_kind) for d in jax.devices()]
    h.update(repr((jax.__version__, jaxlib.__version__, devices,
                   os.environ.get("XLA_FLAGS", ""))).encode())
    return h.hexdigest()


def _path(key: tuple, params: Any) -> Path | None:
    directory = compile_cache.stats().get("dir")
    if not directory or os.environ.get(ENV, "0").strip().lower() in compile_cache.OFF:
        return None
    signature = jax.tree.map(
        lambda a: (tuple(a.shape), str(a.dtype), str(getattr(a, "sharding", ""))), params)
    h = hashlib.sha256(_code_fingerprint().encode())
    h.update(repr((key, jax.tree.structure(params), jax.tree.leaves(signature))).encode())
    return Path(directory) / "programs" / f"{h.hexdigest()[:40]}.pkl"


def load(key: tuple, params: Any):
    """The stored executable for key (with these parameters' shapes), or None."""
    path = _path(key, params)
    if path is None or not path.exists():
        return None
    try:
        from jax.experimental import serialize_executable
        return serialize_executable.deserialize_and_load(*pickle.loads(path.read_bytes()))
    except Exception as e:  # noqa: BLE001 - a stale or partial entry: compile instead
        log.warning("ignoring stored program %s (%s: %s)", path.name, type(e).__name__, e)
        return None


def save(key: tuple, params: Any, compiled) -> None:
    """Store a compiled program (best effort: a failure is logged, never raised)."""
    path = _path(key, params)
    if path is None:
        return
    try:
        from jax.experimental import serialize_executable
        blob = pickle.dumps(serialize_executable.serialize(compiled))
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
            f.write(blob)
        os.replace(f.name, path)
    except Exception as e:  # noqa: BLE001 - a backend that cannot serialize: compile each time
        log.warning("cannot store compiled program (%s: %s)", type(e).__name__, e)
