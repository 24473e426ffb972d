"""Build, load and register the CPU kernels (C++ XLA FFI handlers in this folder).

The library is compiled on first use with the system's C++ compiler for this CPU
(`-march=native`) against jaxlib's FFI headers, and cached under
`$PENSIEVE_CPU_KERNELS_CACHE` (default `~/.cache/pensieve_jax/cpu_kernels`), keyed by the
sources, the flags, jaxlib's version and the CPU: about 3 s once per machine. Without a
compiler, or with `PENSIEVE_CPU_KERNELS=0`, `load()` says why and callers use plain XLA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

log = logging.getLogger(__name__)

ENV = "PENSIEVE_CPU_KERNELS"               # "0" / "off" / "false": not used
CACHE_ENV = "PENSIEVE_CPU_KERNELS_CACHE"
SOURCES = ("decode_attention.cc",)
HEADERS = ("parallel_for.h",)
TARGETS = {"pensieve_decode_attention": "PensieveDecodeAttention"}   # FFI name: C symbol
# -ffast-math for the compile only (the vectorized expf); linking with it would add
# crtfastmath, which sets flush-to-zero for the whole process when the library loads
COMPILE_FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math",
                 "-fopenmp-simd", "-std=c++17", "-fPIC", "-w")
LINK_FLAGS = ("-shared", "-fPIC")
_HERE = Path(__file__).resolve().parent


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(keep)
    except OSError:
        return platform.processor()


def _library_path() -> Path:
    import jaxlib
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update((_HERE / name).read_bytes())
    h.update(repr((COMPILE_FLAGS, LINK_FLAGS, jaxlib.__version__, platform.machine(),
                   _cpu_signature())).encode())
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pensieve_jax" /
                "cpu_kernels")
    return root / f"libpensieve_cpu_{h.hexdigest()[:16]}.so"


def _build(path: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:   # built aside, then renamed:
        out = Path(tmp) / path.name                             # concurrent builds are safe
        objects = [str(Path(tmp) / f"{Path(s).stem}.o") for s in SOURCES]
        for source, obj in zip(SOURCES, objects):
            _run([compiler, *COMPILE_FLAGS, f"-I{jax.ffi.include_dir()}", "-c",
                  str(_HERE / source), "-o", obj])
        _run([compiler, *LINK_FLAGS, *objects, "-o", str(out)])
        os.replace(out, path)


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")


@functools.lru_cache(maxsize=1)
def _load() -> str | None:
    """Build (if needed), load and register the kernels; None, or why they cannot be used."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "off", "false", "no"):
        return f"turned off ({ENV}={os.environ[ENV]})"
    if platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        return f"no build for {platform.machine()}"
    try:
        path = _library_path()
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
        for name, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except Exception as e:  # noqa: BLE001 - any failure: plain XLA instead, said loudly
        reason = f"{type(e).__name__}: {e}"[:1000]
        log.warning("CPU kernels unavailable, using plain XLA (%s)", reason)
        return reason
    return None


def load() -> bool:
    """True when the CPU kernels are built and registered with XLA (once per process)."""
    return _load() is None


def status() -> str:
    """"on", or "off: <why>" (for stats and logs)."""
    reason = _load()
    return "on" if reason is None else f"off: {reason}"
