"""Ahead-of-time compilation for a GPU without one (issue 17): one small Pallas kernel config
compiled for the H200 target through benchmarks/aot_compile.py. Skipped unless the CUDA plugin
is installed (`make aot` or `make aot-kernels` puts it in .venv/aot; `pip install -e .[aot]`
works too). Runs in a subprocess: JAX discovers plugins once per process."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = ROOT / ".venv" / "aot"


def plugin_installed() -> bool:
    if (PLUGIN_DIR / "jax_plugins" / "xla_cuda13").is_dir():
        return True
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda13") is not None
    except ImportError:
        return False


def test_interpret_follows_the_devices_platform():
    import jax

    from pensieve_jax.runner.step_program import kernel_interpret

    class Gpu:
        platform = "gpu"
    assert kernel_interpret(jax.devices()[:1]) is True      # this CPU
    assert kernel_interpret([Gpu()]) is False
    assert kernel_interpret([Gpu(), jax.devices()[0]]) is True


def test_the_aot_seam_lowers_the_runners_own_step_program(monkeypatch):
    """lower_step over abstract params and pools (as aot_compile.py does) gives the program
    the runner traces, kernel mode included (with the program store off: on, the runner
    compiles a call of that program as exported)."""
    monkeypatch.setenv("PENSIEVE_JAX_PROGRAM_STORE", "0")
    import jax
    import jax.numpy as jnp

    from pensieve_jax.model.attention import KVCache
    from pensieve_jax.model.llama import Llama
    from pensieve_jax.runner.model_runner import ModelRunner
    from pensieve_jax.runner.step_program import jit_step, lower_step
    from pensieve_jax.weights import load_model

    model = load_model("random:tiny", "float32")
    runner = ModelRunner(model, 16, 8, "pallas", max_num_seqs=2, max_batched_tokens=8,
                         max_model_len=32)
    assert runner.interpret is True and runner.model.interpret is True
    shape = runner.programs.shapes[0]
    pool = jax.ShapeDtypeStruct(runner.kv.k.shape, jnp.float32)
    # the runner's params as it holds them (their layout may depend on the platform)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), runner.params)
    aot = lower_step(jit_step(Llama(model.config, jnp.float32, "pallas", interpret=True)),
                     params, KVCache(pool, pool), shape)
    assert aot.as_text() == runner.compiler.lower(shape).as_text()


@pytest.mark.skipif(not plugin_installed(), reason="the CUDA plugin is not installed "
                    "(make aot-kernels)")
def test_pallas_kernel_compiles_for_h200_with_triton(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aot_compile.py"), "--smoke",
                           "--target", "h200", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "aot_h200_smoke.json").read_text())
    assert result["target"]["device_kind"] == "NVIDIA H200 141GB HBM3e"
    (row,) = result["programs"]
    assert row["ok"], row.get("error")
    assert row["interpret"] is False           # decided from the compile-only GPU device
    assert row["triton"] and row["triton_calls"] >= 1    # the kernel, not its interpreter
    (kernel,) = row["pallas_kernels"]
    assert kernel["name"].startswith("ragged_paged_attention")
    assert 0 < kernel["registers"] <= 255 and kernel["spill_stores"] == kernel["spill_loads"] == 0
