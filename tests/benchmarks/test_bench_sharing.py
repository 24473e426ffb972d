"""Smoke test of benchmarks/bench_sharing.py: the three setups, tiny, identical tokens."""

import json

import bench_sharing
import pytest

pytestmark = pytest.mark.slow   # long: `make test-all` runs it (not `make test`)


def test_bench_sharing_tiny(tmp_path):
    out = tmp_path / "sharing.json"
    report = bench_sharing.main([
        "--model", "random:tiny", "--users", "3", "--rounds", "2", "--system-len", "100",
        "--question-len", "10", "--answer-len", "4", "--rate", "0", "--think-time", "0",
        "--page-size", "32", "--max-batched-tokens", "128", "--out", str(out)])
    assert json.loads(out.read_text())["identical_outputs"] is True
    rows = report["setups"]
    assert rows["stateful/sharing"]["cached_shared_tokens"] > 0
    assert rows["stateful/no-sharing"]["cached_shared_tokens"] == 0
    assert rows["stateless"]["cached_tokens"] == 0
    for row in rows.values():
        assert row["requests_per_s"] > 0 and row["ttft_p90_s"] > 0
