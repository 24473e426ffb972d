"""Tensor parallelism: greedy float32 outputs at tensor_parallel 2 and 4 equal one device's, over
multi-turn conversations swapped to the host tier and back (and a shared prompt copied on write),
on the XLA and Pallas attention paths.

XLA_FLAGS must be set before JAX starts, so the engines run in one subprocess (tests/tp_worker.py)
with 4 forced CPU devices; this process compares what it prints.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from pensieve_jax.model import parallel
from pensieve_jax.model.config import PRESETS
from pensieve_jax.engine.engine import EngineConfig
from pensieve_jax.model.llama import param_shapes

pytestmark = pytest.mark.slow   # long: `make test-all` runs it (not `make test`)

WORKER = Path(__file__).with_name("tp_worker.py")
RUNS = ["swaps:xla:1,2,4", "layered:xla:1,2", "short:pallas:1,2,4", "tiny:xla:1,2",
        "errors:xla:0"]


@pytest.fixture(scope="module")
def runs():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(WORKER), *RUNS], env=env, capture_output=True,
                          text=True, timeout=400, cwd=WORKER.parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def family_runs():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(WORKER), "family:xla:1,2,4", "family:pallas:1,2"],
                          env=env, capture_output=True, text=True, timeout=400,
                          cwd=WORKER.parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_same_as_one_device(by_tp):
    want = by_tp["1"]["outputs"]
    assert want and all(len(turns) for turns in want.values())
    for tp, result in by_tp.items():
        assert result["outputs"] == want, f"tensor_parallel={tp} differs from one device"


def test_multiturn_with_host_swaps_equal_across_tp_xla(runs):
    by_tp = runs["swaps:xla"]
    assert set(by_tp) == {"1", "2", "4"}
    assert_same_as_one_device(by_tp)
    assert len(by_tp["1"]["outputs"]["A"]) == 3            # one turn before the swap, two after
    for tp, result in by_tp.items():
        stats = result["stats"]
        assert stats["device_to_host_pages"] > 0 and stats["swap_in_pages"] > 0, tp
        assert stats["host_hit_tokens"] > 0 and stats["recomputed_tokens"] == 0, tp
        assert stats["copied_on_write_pages"] > 0, tp        # runner.copy_pages on the shards
        kv_heads, q_cols = 4 // int(tp), 8 * 16 // int(tp)   # tp-small: 8 heads, 4 KV, dim 16
        assert result["layout"]["kv_shard"][3] == kv_heads
        assert result["layout"]["kv_devices"] == int(tp)
        assert result["layout"]["q_proj_shard"][-1] == q_cols


def test_swap_ins_loaded_inside_the_step_on_shards(runs):
    """swap_in="layered" at tensor_parallel 1 and 2: each device loads its KV heads' slice of
    the pages from host memory; outputs equal the next-step swap-ins' at one device."""
    by_tp = runs["layered:xla"]
    assert_same_as_one_device(by_tp)
    assert by_tp["1"]["outputs"] == runs["swaps:xla"]["1"]["outputs"]
    for tp, result in by_tp.items():
        stats = result["stats"]
        assert stats["swap_in_pages"] > 0 and stats["layered_pages"] == stats["swap_in_pages"], tp
        assert result["layout"]["kv_shard"][3] == 4 // int(tp)


def test_pallas_kernel_per_shard_equal_across_tp(runs):
    by_tp = runs["short:pallas"]
    assert_same_as_one_device(by_tp)
    assert by_tp["1"]["outputs"]["x"] != by_tp["1"]["outputs"]["y"]
    for tp, result in by_tp.items():     # shard_map hands the kernel only its shard's KV heads
        assert result["layout"]["kernel_kv_heads"] == [4 // int(tp)]


def test_tiny_preset_with_host_swaps_at_tp2(runs):
    by_tp = runs["tiny:xla"]
    assert_same_as_one_device(by_tp)
    assert by_tp["2"]["stats"]["device_to_host_pages"] > 0
    assert by_tp["2"]["stats"]["swap_in_pages"] > 0
    assert by_tp["2"]["layout"]["kv_shard"][3] == 1


def test_family_features_equal_across_tp(family_runs):
    """q/k/v and o_proj biases, q/k norms and a sliding window, sharded by head: the same
    tokens at tensor_parallel 1, 2 and 4 (XLA) and 1, 2 (Pallas, interpreted)."""
    for attention in ("xla", "pallas"):
        assert_same_as_one_device(family_runs[f"family:{attention}"])
    assert family_runs["family:pallas"]["1"]["outputs"] == \
        family_runs["family:xla"]["1"]["outputs"]
    assert family_runs["family:xla"]["2"]["layout"]["q_proj_shard"][-1] == 8 * 16 // 2


def test_bad_tensor_parallel_is_a_clear_value_error(runs):
    errors = runs["errors:xla"]["0"]["outputs"]
    assert "exceeds the 4 available" in errors["too_many_devices"]
    assert "must divide num_kv_heads (2)" in errors["kv_heads"]
    assert "must divide num_heads (8)" in errors["heads"]
    with pytest.raises(ValueError, match="tensor_parallel"):
        EngineConfig(tensor_parallel=0)
    with pytest.raises(ValueError, match="exceeds"):
        parallel.check_tensor_parallel(PRESETS["tiny"], 2, num_devices=1)
    with pytest.raises(ValueError, match="exceeds"):
        parallel.make_mesh(len(jax.devices()) + 1)


def test_partition_specs_are_megatron_style():
    tree = param_shapes(PRESETS["llama3-8b"])
    specs = jax.tree_util.tree_map_with_path(
        lambda path, x: parallel.param_spec(parallel.path_names(path), tuple(x.shape), 4), tree)
    layers = specs["params"]["layers"]
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert layers[name]["kernel"] == P(None, None, "tp"), name
    for name in ("o_proj", "down_proj"):
        assert layers[name]["kernel"] == P(None, "tp", None), name
    assert layers["input_layernorm"]["weight"] == P(None, None)
    assert specs["params"]["embed_tokens"]["embedding"] == P(None, None)
    assert specs["params"]["lm_head"]["kernel"] == P(None, "tp")
    # an axis the mesh does not divide stays replicated (SmolLM2's 49152 vocab at tp=5)
    assert parallel.param_spec(("params", "lm_head", "kernel"), (576, 49153), 4) == P(None, None)


def test_cli_flag_reaches_engine_config():
    from serving.cli import engine_options, parse_args
    args = parse_args(["serve", "--model", "random:tiny", "--tensor-parallel", "2"])
    assert EngineConfig(**engine_options(args)).tensor_parallel == 2


def test_bench_tp_runs_and_matches_tp1(tmp_path):
    out = tmp_path / "tp.json"
    bench = WORKER.parents[2] / "benchmarks" / "bench_tp.py"
    proc = subprocess.run([sys.executable, str(bench), "--tp", "1", "4", "--iters", "1",
                           "--prefill", "16", "--context", "16", "--decode-batch", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert "not meaningful" in result["note"] and result["num_devices"] >= 4
    assert {r["tensor_parallel"] for r in result["rows"]} == {1, 4}
    assert all(r["same_tokens_as_tp1"] and r["seconds"] > 0 for r in result["rows"])
    assert result["collectives_in_compiled_steps"]["4"]["all-reduce"] > 0
