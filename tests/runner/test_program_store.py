"""The program store: a second process loads the traced step programs instead of tracing them,
compiles them from JAX's cache, runs them to the same tokens, and ignores an entry it cannot
load."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, time
import numpy as np
from pensieve_jax.runner import compile_cache, step_compiler
from pensieve_jax.runner.model_runner import ModelRunner
from pensieve_jax.runner.step_program import StepInput
from pensieve_jax.weights import load_model
compile_cache.enable()
runner = ModelRunner(load_model("random:tiny", "float32"), 16, 8, max_num_seqs=2,
                     max_batched_tokens=16, max_model_len=64)
traced = []
export_step = step_compiler.export_step
step_compiler.export_step = lambda step, p, kv, shape: traced.append(shape.tokens) or export_step(
    step, p, kv, shape)
runner.precompile()
tokens = []
for n in (1, 5, 16):
    s = StepInput(np.arange(1, n + 1, dtype=np.int32), np.arange(n, dtype=np.int32),
                  np.asarray([[1, 2]], np.int32), np.asarray([n], np.int32),
                  np.asarray([0, n], np.int32), np.zeros(1, np.float32), np.zeros(1, np.int32),
                  np.ones(1, np.float32), np.zeros(1, np.uint32), np.zeros(1, np.int32))
    tokens.append(int(runner.step(s)[0]))
print(json.dumps({"traced": traced, "tokens": tokens,
                  "misses": compile_cache.stats()["misses"]}))
"""


def run(cache: Path, store: str | None = None) -> dict:
    env = dict(os.environ, PENSIEVE_JAX_CACHE=str(cache))
    env.pop("PENSIEVE_JAX_PROGRAM_STORE", None)         # on by default
    if store is not None:
        env["PENSIEVE_JAX_PROGRAM_STORE"] = store
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_loads_the_programs_and_gets_the_same_tokens(tmp_path):
    first = run(tmp_path)
    assert first["traced"] == [1, 8, 16]                    # the CPU ladder for 16 tokens
    stored = sorted((tmp_path / "programs").glob("*.jaxexport"))
    assert len(stored) == 3                                 # the 3 step programs
    second = run(tmp_path)
    assert second["traced"] == [] and second["tokens"] == first["tokens"]
    assert second["misses"] == 0                            # every compile came from the cache
    for path in stored:                                     # damaged entries: compiled again
        path.write_bytes(b"not a program")
    third = run(tmp_path)
    assert third["traced"] == [1, 8, 16] and third["tokens"] == first["tokens"]
    off = run(tmp_path / "off", store="0")                  # traced and compiled directly
    assert off["traced"] == [] and off["tokens"] == first["tokens"]
    assert not (tmp_path / "off" / "programs").exists()
