import json

import bench_tiers
import pytest

pytestmark = pytest.mark.slow   # long: `make test-all` runs it (not `make test`)


def test_bench_tiers_compares_setups_with_identical_outputs(tmp_path):
    out = tmp_path / "tiers.json"
    bench_tiers.main(["--model", "random:tiny", "--conversations", "12", "--turns", "2",
                      "--new-tokens", "24", "--max-tokens", "8", "--think-time", "0.02", "--warmup-passes", "1",
                      "--setups", "stateless", "device+host/pensieve",
                      "device+host/pensieve/layered", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["identical_outputs"]
    host = result["setups"]["device+host/pensieve"]
    assert set(host["swap_hidden_fraction"]) == {"in", "out"}
    layered = result["setups"]["device+host/pensieve/layered"]["swap"]
    assert layered["in_pages"] > 0 and layered["in_layered_pages"] == layered["in_pages"]
    assert result["setups"]["stateless"]["hit_rate_device"] == 0
