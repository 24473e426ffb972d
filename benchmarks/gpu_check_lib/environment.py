"""Phase environment of benchmarks/gpu_check.py: python, jax/jaxlib and plugin versions,
devices, memory kinds and sizes, nvidia-smi (host_facts(): what can be read before jax starts).
"""

from __future__ import annotations

import os
import subprocess
import sys

from gpu_check_lib.results import Phase

PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
            "jax-cuda12-pjrt", "flax", "numpy", "ml-dtypes", "orbax-checkpoint", "tokenizers",
            "grpcio", "protobuf", "gguf", "triton", "nvidia-cudnn-cu13", "nvidia-cuda-nvcc")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    from importlib import metadata
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def nvidia_smi() -> str | None:
    """nvidia-smi's report (None where there is none)."""
    try:
        r = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        return (r.stdout + r.stderr).strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def host_facts() -> dict:
    """Python, the packages and nvidia-smi: what can be read before jax starts."""
    env = {k: os.environ.get(k) for k in ("JAX_PLATFORMS", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES",
                                          "XLA_PYTHON_CLIENT_PREALLOCATE",
                                          "XLA_PYTHON_CLIENT_MEM_FRACTION") if k in os.environ}
    return {"python": sys.version, "executable": sys.executable, "packages": package_versions(),
            "env": env, "nvidia_smi": nvidia_smi()}


def phase_environment(ph: Phase) -> dict:
    import jax
    import jaxlib
    from common import environment
    dev = jax.devices()[0]
    try:
        memory_kinds = [m.kind for m in dev.addressable_memories()]
    except (AttributeError, NotImplementedError):
        memory_kinds = []
    out = {**environment(None, __file__), "python": sys.version, "jaxlib": jaxlib.__version__,
           "devices": [str(d) for d in jax.devices()], "memory_kinds": memory_kinds,
           "memory_stats": dev.memory_stats()}
    out["headline"] = {"device": out["device"], "num_devices": out["num_devices"],
                       "jax": out["jax"], "python": sys.version.split()[0],
                       "pinned_host": "pinned_host" in memory_kinds}
    return out
