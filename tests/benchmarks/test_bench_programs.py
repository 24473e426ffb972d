"""Smoke test of benchmarks/bench_programs.py: --quick on random:tiny, this checkout only (each
engine in its own process): the results have their fields, and an engine that says it is warm
compiled nothing after it was ready."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_programs.py"


@pytest.mark.slow
def test_bench_programs_quick_new_engine(tmp_path):
    out = tmp_path / "programs.json"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--model", "random:tiny",
                    "--systems", "new", "--out", str(out)], check=True, capture_output=True,
                   timeout=300)
    result = json.loads(out.read_text())
    assert result["sizes"]["conversations"] > 0 and result["command"]
    (run,) = result["runs"]
    cold, warm = run["cold"], run["warm"]
    assert cold["exit_code"] == 0 and warm["exit_code"] == 0
    assert cold["completed"] and warm["completed"]
    for proc in (cold, warm):
        assert proc["startup"]["from_pretrained_s"] > 0
        assert proc["startup"]["memory_ready"]["maps"] > 0
        assert proc["startup"]["memory_ready"]["rss_mib"] > 0
        assert {"before_ready", "after_ready", "compilations_after_ready",
                "compile_s_total"} <= set(proc["compiles"])
    replay = cold["replay"]
    assert replay["turns"] == result["rows"][0]["replay_turns"] > 0
    assert replay["wall_s"] > 0 and replay["output_tokens_per_s"] > 0
    assert replay["memory_after"]["maps"] > 0 and replay["memory_after"]["rss_mib"] > 0
    assert replay["padding"]["padded_over_real"] >= 1
    assert warm["ttft"]["median_s"] > 0
    row = result["rows"][0]
    for key in ("startup_cold_s", "startup_warm_s", "compilations_after_ready", "compile_s",
                "replay_wall_s", "output_tokens_per_s", "padded_over_real", "maps_ready",
                "maps_after_replay", "rss_ready_mib", "rss_after_replay_mib", "ttft_turn_s"):
        assert row[key] is not None, key
    programs = cold["startup"]["engine_programs"]
    if programs is None:
        pytest.skip("this engine has no stats()['programs'] yet (issue 16's precompiled "
                    "program set): compilations after ready not checked")
    assert {"count", "shapes", "compile_s", "compilations_after_ready", "warm",
            "padded_tokens", "real_tokens"} <= set(programs)
    if programs["warm"]:
        assert row["compilations_after_ready"] == 0, cold["compiles"]["after_ready_by_function"]
        assert warm["compiles"]["compilations_after_ready"] == 0
        assert cold["engine_programs"]["compilations_after_ready"] == 0
