import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_swap.py"


@pytest.mark.slow
def test_bench_swap_reports_every_path_per_batch(tmp_path):
    # its own process: pinned_host buffers and memory-kind puts on the CPU backend stay out of
    # the test process
    out = tmp_path / "swap.json"
    subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--dtype", "float32",
                    "--pool-pages", "16", "--batches", "1", "8", "--repeats", "1",
                    "--out", str(out)], check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert [r["pages"] for r in result["batches"]] == [1, 8]
    assert result["page_bytes"] == 2 * 2 * 16 * 2 * 16 * 4     # tiny: 2 layers, 2 kv heads, dim 16
    for row in result["batches"]:
        assert row["bytes"] == row["pages"] * result["page_bytes"]
        for key in ("d2h_GBps", "h2d_GBps", "raw_h2d_GBps"):
            assert row[key] > 0
        assert ("h2d_pinned_GBps" in row) == result["pinned_host"]
