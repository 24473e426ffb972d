"""JAX's persistent compilation cache, on by default: a program compiled once (by this process,
an earlier run, another replica) loads from disk in a fraction of its compile time.

    from pensieve_jax.runner import compile_cache
    compile_cache.enable()        # -> "/home/me/.cache/pensieve_jax/xla" (the Engine does this)
    compile_cache.stats()         # {"dir": ..., "requests": 12, "hits": 12, "misses": 0, ...}

Where: `$PENSIEVE_JAX_CACHE` if set, else `$XDG_CACHE_HOME/pensieve_jax/xla` (default
`~/.cache/pensieve_jax/xla`). `PENSIEVE_JAX_CACHE=none` (or `off`, `0`) keeps it off. A cache
directory already configured in jax.config (`jax.config.update("jax_compilation_cache_dir", ...)`
or the `JAX_COMPILATION_CACHE_DIR` environment variable) is never replaced: enable() returns it.
Every program is cached (no minimum compile time or entry size), since the engine's step
programs are few and each compiles for seconds.

The cache directory is trusted: whoever can write to it can make this process run their code.
Keep it private (the default is in your own home).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Mapping

ENV = "PENSIEVE_JAX_CACHE"
OFF = ("none", "off", "0", "false", "no")

log = logging.getLogger(__name__)
_lock = threading.Lock()
_enabled: str | None = None         # the dir enable() turned on (or found configured)
_kept_off = False                   # enable("none") was called: later enable() stay off
_counts = {"requests": 0, "hits": 0, "writes": 0}
_EVENTS = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
           "/jax/compilation_cache/cache_hits": "hits",
           "/jax/compilation_cache/cache_misses": "writes"}   # recorded when an entry is written
_listening = False


def cache_dir(path: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The directory enable(path) would use when jax.config has none yet (None: off)."""
    env = os.environ if environ is None else environ
    choice = path if path is not None else env.get(ENV)
    if choice is not None and choice.strip().lower() in OFF:
        return None
    if choice and choice.strip():
        return os.path.abspath(os.path.expanduser(choice.strip()))
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pensieve_jax", "xla")


def enable(path: str | None = None) -> str | None:
    """Turn JAX's persistent compilation cache on; returns the directory in use (None: off).

    path: the directory (None: `$PENSIEVE_JAX_CACHE`, else the XDG default; "none" keeps it
    off, also for later calls without a path, such as the Engine's). Idempotent and
    thread-safe. A directory already set in jax.config wins over path and the environment, and
    its thresholds are left as they are. Call it before the first compilation you want cached
    (programs compiled before it are not written)."""
    global _enabled, _kept_off
    import jax

    with _lock:
        _listen()
        configured = jax.config.jax_compilation_cache_dir
        if configured:                      # the user's (or an earlier enable()'s): keep it
            _enabled = configured
            return configured
        if path is None and _kept_off:
            return None
        target = cache_dir(path)
        if target is None:
            _kept_off = _kept_off or path is not None
            return None
        try:
            os.makedirs(target, exist_ok=True)
        except OSError as e:
            log.warning("compilation cache off: cannot create %s (%s); set %s to a writable "
                        "directory or to none", target, e, ENV)
            return None
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        jax.config.update("jax_compilation_cache_dir", target)
        _enabled = target
        log.debug("persistent compilation cache in %s", target)
        return target


def _on_event(event: str, **_: Any) -> None:
    key = _EVENTS.get(event)
    if key is not None:
        _counts[key] += 1


def _listen() -> None:
    global _listening
    if _listening:
        return
    try:
        from jax import monitoring
        monitoring.register_event_listener(_on_event)
    except Exception as e:  # an older or newer jax without it: no counts, the cache still works
        log.debug("compilation cache counts unavailable: %s", e)
    _listening = True


def stats() -> dict[str, Any]:
    """Counts since enable() (or since this call first listened): compilations that consulted
    the persistent cache (`requests`), those it answered (`hits`), those compiled instead
    (`misses`), and entries written (`writes`); `dir` is the cache directory in use."""
    with _lock:
        _listen()
        counts = dict(_counts)
    counts["misses"] = counts["requests"] - counts["hits"]
    try:
        import jax
        counts["dir"] = jax.config.jax_compilation_cache_dir or None
    except Exception:
        counts["dir"] = _enabled
    return counts


__all__ = ["ENV", "cache_dir", "enable", "stats"]
