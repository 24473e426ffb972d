"""Traced step programs on disk, so a warm start neither traces nor compiles them.

JAX's persistent compilation cache (compile_cache) skips XLA's compile, but each program must
still be traced and lowered first to find its cache key: about a second per step program for
SmolLM2 on a 2-core CPU, most of a warm start. This store keeps each step program as traced
(`jax.export`: the StableHLO module with its calling convention, serialized) under
`<compilation cache dir>/programs/`, keyed by everything that shapes a program:

    the program's own key (model config, dtype, attention, pool, shape, devices), the
    parameter tree's shapes, dtypes and shardings, jax and jaxlib versions, the backend and
    its devices, XLA_FLAGS, and a hash of every source file of pensieve_jax and pallas_kernels

so an edit of the code, an upgrade or another machine makes a new entry instead of loading a
stale one. A warm start reads the module (milliseconds), lowers a call of it (about 0.15 s)
and compiles that, which JAX's cache answers. Cold and warm starts compile the same call, so
the cache serves the second. What cannot be exported (a backend or custom call jax.export
does not take) is traced as before; an entry that fails to load is ignored and traced again.

On by default; PENSIEVE_JAX_PROGRAM_STORE=0 (or none, off) turns it off, and it is off while
the compilation cache is. The directory is trusted like the compilation cache: its modules
run. (An earlier store kept serialized XLA executables; on XLA CPU a loaded one failed with
"Function <fusion> not found", so this one keeps what precedes the compile instead.)
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
from jax import export

from pensieve_jax.runner import compile_cache
from pensieve_jax.model.attention import AttentionBatch, Incoming, KVCache

log = logging.getLogger(__name__)

_PACKAGES = ("pensieve_jax", "pallas_kernels", "cpu_kernels")
ENV = "PENSIEVE_JAX_PROGRAM_STORE"     # "0" / "none" / "off": JAX's cache only
SUFFIX = ".jaxexport"

for _tuple in (AttentionBatch, Incoming, KVCache):    # the step programs' argument trees
    export.register_namedtuple_serialization(_tuple, serialized_name=f"pensieve_jax.{_tuple.__name__}")


@functools.lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[2]
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    import jaxlib
    devices = [(d.platform, d.device_kind) for d in jax.devices()]
    h.update(repr((jax.__version__, jaxlib.__version__, devices,
                   os.environ.get("XLA_FLAGS", ""))).encode())
    return h.hexdigest()


def _directory() -> str | None:
    """The compilation cache's directory when the store is on (None: off)."""
    if os.environ.get(ENV, "1").strip().lower() in compile_cache.OFF:
        return None
    return compile_cache.stats().get("dir")


def enabled() -> bool:
    """The store is on: not turned off by the environment, and a compilation cache is in use."""
    return bool(_directory())


def _path(key: tuple, params: Any) -> Path | None:
    directory = _directory()
    if not directory:
        return None
    signature = jax.tree.map(
        lambda a: (tuple(a.shape), str(a.dtype), str(getattr(a, "sharding", ""))), params)
    h = hashlib.sha256(_code_fingerprint().encode())
    h.update(repr((key, jax.tree.structure(params), jax.tree.leaves(signature))).encode())
    return Path(directory) / "programs" / f"{h.hexdigest()[:40]}{SUFFIX}"


def load(key: tuple, params: Any) -> export.Exported | None:
    """The stored program for key (with these parameters' shapes), or None."""
    path = _path(key, params)
    return None if path is None else _read(path)


def save(key: tuple, params: Any, exported: export.Exported) -> None:
    """Store a traced program (best effort: a failure is logged, never raised)."""
    path = _path(key, params)
    if path is not None:
        _write(path, exported)


def exported(key: tuple, params: Any, trace: Callable[[], export.Exported]
             ) -> export.Exported | None:
    """The program for key: loaded from the store, else trace() (a jax.export of it) and
    stored. None when the store is off or the program cannot be exported: lower it directly."""
    path = _path(key, params)
    if path is None:
        return None
    program = _read(path)
    if program is not None:
        return program
    try:
        program = trace()
    except Exception as e:  # noqa: BLE001 - e.g. a custom call jax.export does not take
        log.debug("step program %s not exportable (%s: %s)", key[-1], type(e).__name__, e)
        return None
    _write(path, program)
    return program


def _read(path: Path) -> export.Exported | None:
    if not path.exists():
        return None
    try:
        return export.deserialize(bytearray(path.read_bytes()))
    except Exception as e:  # noqa: BLE001 - a stale or partial entry: trace instead
        log.warning("ignoring stored program %s (%s: %s)", path.name, type(e).__name__, e)
        return None


def _write(path: Path, exported: export.Exported) -> None:
    try:
        blob = exported.serialize()
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
            f.write(blob)
        os.replace(f.name, path)
    except Exception as e:  # noqa: BLE001 - what cannot be serialized is traced each time
        log.warning("cannot store traced program (%s: %s)", type(e).__name__, e)


__all__ = ["ENV", "enabled", "exported", "load", "save"]
