"""Smoke test of bench_attention_mixed on random:tiny: the work-list XLA attention and the legacy
dense layout run every step kind through the runner's fixed programs, give the same greedy
tokens (per step and over a whole engine run) and nearly the same logits."""

import json

import bench_attention_mixed
import pytest

pytestmark = pytest.mark.slow   # long: `make test-all` runs it (not `make test`)


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
    # 1 prefill of 100 tokens + 3 decodes over 64: the program of 103 tokens, 4 sequences
    assert kinds["mixed"]["program"]["tokens"] == result["programs"]["max_batched_tokens"] == 103
    assert kinds["decode"]["program"]["seqs"] == 4
    # the work list computes whole items (128 keys; 8 or 16 a loop iteration): at these tiny
    # sizes less than the dense layout next to a prefill, more for 4 decodes over 104 keys
    assert 0 < kinds["mixed"]["score_pairs_after"] < kinds["mixed"]["score_pairs_before"]
    assert kinds["decode"]["score_pairs_after"] == 8 * 128 > kinds["decode"]["score_pairs_before"]
    assert result["engine_check"]["tokens_identical"]
