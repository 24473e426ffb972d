"""pensieve_jax.runner.compile_cache: JAX's persistent compilation cache, checked across processes (a
fresh process each time: the cache is per process state in jax.config)."""

import json
import os
import pathlib
import subprocess
import sys

from pensieve_jax.runner import compile_cache

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = """
import json, os
from pensieve_jax.runner import compile_cache
if os.environ.get("FIRST_ENABLE"):           # as a program's own choice before the Engine's
    compile_cache.enable(os.environ["FIRST_ENABLE"])
used = compile_cache.enable()
assert compile_cache.enable() == used          # idempotent
import jax, jax.numpy as jnp
jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()
print(json.dumps({"used": used, **compile_cache.stats()}))
"""


def run(**env):
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "PENSIEVE_JAX_"))}
    base.update(JAX_PLATFORMS="cpu", **env)
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=base,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    cache = tmp_path / "xla"
    first = run(PENSIEVE_JAX_CACHE=str(cache))
    assert first["used"] == first["dir"] == str(cache)
    assert first["requests"] >= 1 and first["hits"] == 0 and first["writes"] >= 1
    assert any(cache.iterdir())
    second = run(PENSIEVE_JAX_CACHE=str(cache))
    assert second["hits"] >= 1 and second["misses"] == 0 and second["writes"] == 0


def test_none_keeps_it_off(tmp_path):
    off = run(PENSIEVE_JAX_CACHE="none", XDG_CACHE_HOME=str(tmp_path))
    assert off["used"] is None and off["dir"] is None and off["hits"] == 0
    assert not (tmp_path / "pensieve_jax").exists()


def test_an_explicit_none_keeps_later_enables_off(tmp_path):
    out = run(FIRST_ENABLE="none", PENSIEVE_JAX_CACHE=str(tmp_path / "xla"))
    assert out["used"] is None and out["dir"] is None
    assert not (tmp_path / "xla").exists()


def test_a_directory_configured_in_jax_is_kept(tmp_path):
    mine = tmp_path / "mine"
    out = run(PENSIEVE_JAX_CACHE=str(tmp_path / "ours"), JAX_COMPILATION_CACHE_DIR=str(mine))
    assert out["used"] == out["dir"] == str(mine)
    assert not (tmp_path / "ours").exists()


def test_where_the_cache_goes():
    home = os.path.expanduser("~")
    assert compile_cache.cache_dir(environ={}) == os.path.join(home, ".cache", "pensieve_jax",
                                                               "xla")
    assert compile_cache.cache_dir(environ={"XDG_CACHE_HOME": "/x"}) == "/x/pensieve_jax/xla"
    assert compile_cache.cache_dir(environ={"PENSIEVE_JAX_CACHE": "/y", "XDG_CACHE_HOME": "/x"}) \
        == "/y"
    for off in ("none", "off", "0", "NONE"):
        assert compile_cache.cache_dir(environ={"PENSIEVE_JAX_CACHE": off}) is None
    assert compile_cache.cache_dir("none", environ={"PENSIEVE_JAX_CACHE": "/y"}) is None
    assert compile_cache.cache_dir("/z", environ={"PENSIEVE_JAX_CACHE": "/y"}) == "/z"
