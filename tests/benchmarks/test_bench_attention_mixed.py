"""Smoke test of bench_attention_mixed on random:tiny: both backends run every step kind, give
the same greedy tokens (per step and over a whole engine run) and nearly the same logits."""

import json

import bench_attention_mixed


def test_bench_attention_mixed_smoke(tmp_path):
    out = tmp_path / "r.json"
    result = bench_attention_mixed.main([
        "--model", "random:tiny", "--page-size", "8", "--prefill", "100", "--decodes", "3",
        "--context", "64", "--iters", "1", "--min-seconds", "0", "--kinds", "mixed", "decode",
        "--engine-prompts", "40", "12", "--engine-max-tokens", "3", "--engine-budget", "32",
        "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    kinds = {r["kind"]: r for r in result["rows"]}
    assert set(kinds) == {"mixed", "decode"}
    for r in kinds.values():
        assert r["tokens_identical"] and r["max_abs_logit_diff"] < 1e-4 * max(1, r["max_abs_logit"])
        assert r["ms_before"] > 0 and r["ms_after"] > 0
    assert kinds["mixed"]["query_rows_after"] < kinds["mixed"]["query_rows_before"]
    assert result["engine_check"]["tokens_identical"]
