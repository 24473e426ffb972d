"""Smoke test of benchmarks/bench_router.py: every policy on both workloads, tiny."""

import json

import bench_router
import pytest

pytestmark = pytest.mark.slow   # long: `make test-all` runs it (not `make test`)


def test_bench_router_tiny(tmp_path):
    out = tmp_path / "router.json"
    report = bench_router.main([
        "--replicas", "2", "--conversations", "2", "--rounds", "2", "--scale", "0.03",
        "--system-len", "60", "--max-context", "150", "--max-model-len", "512",
        "--page-size", "128", "--num-pages", "16", "--rate", "0", "--think-time", "0",
        "--no-warmup", "--out", str(out)])
    assert json.loads(out.read_text())["results"].keys() == {"round-robin", "affinity", "e2"}
    for policy, workloads in report["results"].items():
        for name, r in workloads.items():
            assert r["turns"] == report["workloads"][name]["turns"], (policy, name)
            assert r["throughput_tokens_per_s"] > 0 and r["latency_s"]["p99"] > 0
            assert 0 <= r["hit_rate"] <= 1 and sum(r["turns_per_replica"]) == r["turns"]
    # conversations stick to their replica under affinity: later turns hit the cache
    assert report["results"]["affinity"]["sharegpt"]["hit_rate_later_turns"] > 0
