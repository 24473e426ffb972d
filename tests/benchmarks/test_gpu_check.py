"""benchmarks/gpu_check.py: the dry run end to end (CPU: tiny shapes, the kernels interpreted,
random:tiny), so the GPU check cannot rot before a GPU runs it; and what a killed phase leaves."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gpu_check

SCRIPT = Path(gpu_check.__file__)


@pytest.mark.slow   # ~45 s of CPU: .ci/run runs this file after `make test`
def test_dry_run_writes_every_phase_with_its_keys_and_no_error(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for name in gpu_check.PHASES:
        result = json.loads((out / f"{name}.json").read_text())
        assert result["error"] is None, (name, result["error"])
        assert result["ok"] and result["complete"] and result["exit_status"] == 0, name
        missing = set(gpu_check.COMMON_KEYS + gpu_check.PHASE_KEYS[name]) - set(result)
        assert not missing, (name, missing)
        assert result["dry_run"] and result["interpret"] and result["backend"] == "cpu"
        assert not result.get("skipped"), (name, result["skipped"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["all_ok"] and list(summary["phases"]) == list(gpu_check.PHASES)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.json" for n in gpu_check.PHASES] + ["summary.json"])    # 7 files: all come back

    kernel = json.loads((out / "kernel.json").read_text())
    assert kernel["all_within_tolerance"] and {c["dtype"] for c in kernel["cases"]} == \
        {"float32", "bfloat16"}
    assert kernel["triton_in_program"] is False            # interpreted: no Triton call
    assert kernel["decode_vs_jax"]["ok"]                   # JAX's paged attention agrees too
    bw = json.loads((out / "decode_bandwidth.json").read_text())
    assert bw["ceilings"]["copy_GBps"] > 0 and bw["pct_of_copy_bandwidth"] > 0
    swap = json.loads((out / "swap.json").read_text())
    (row,) = swap["overlap"]["rows"]
    assert 0 <= row["layered_hidden"] <= 1 and 0 <= row["next_step_hidden"] <= 1
    engine = json.loads((out / "engine.json").read_text())
    assert [len(engine["points"][p]) for p in ("stateful", "stateless")] == [2, 2]
    assert all(s["same_turns"] == s["turns"] > 0 for s in engine["same_outputs"].values())
    assert engine["attention"]["stateful"]["attention"] == "xla"      # CPU: the XLA path
    assert engine["ttft_by_turn"]["stateful"]
    assert engine["stateful_vs_stateless_at_equal_p90_latency"]


def test_a_killed_phase_keeps_what_it_saved_and_says_why(tmp_path, monkeypatch):
    def killed(cmd, env, timeout):
        # the phase saved a case, then ran past its budget
        (tmp_path / "kernel.json").write_text(json.dumps(
            {"phase": "kernel", "ok": False, "error": None, "complete": False,
             "cases": [{"dtype": "float32", "ok": True}]}))
        raise subprocess.TimeoutExpired(cmd, timeout)
    monkeypatch.setattr(gpu_check.subprocess, "run", killed)
    args = type("Args", (), {"out": str(tmp_path), "dry_run": True})()
    result = gpu_check.run_child("kernel", args, 12.0)
    assert not result["ok"] and result["error"] == "killed after its budget of 12 s"
    assert result["cases"] == [{"dtype": "float32", "ok": True}]
    assert json.loads((tmp_path / "kernel.json").read_text())["error"] == result["error"]

    def crashed(cmd, env, timeout):       # died before it wrote anything
        return subprocess.CompletedProcess(cmd, -11)
    monkeypatch.setattr(gpu_check.subprocess, "run", crashed)
    result = gpu_check.run_child("swap", args, 30.0)
    assert not result["ok"] and "status -11" in result["error"]


def test_budgets_are_shares_and_add_up():
    budgets = gpu_check.phase_budgets(list(gpu_check.PHASES), 480)
    assert abs(sum(budgets.values()) - 480) < 1e-6 and budgets["engine"] == 240
    some = gpu_check.phase_budgets(["kernel", "engine"], 100)
    assert abs(sum(some.values()) - 100) < 1e-6 and some["engine"] > some["kernel"]
