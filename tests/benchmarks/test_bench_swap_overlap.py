import json
import subprocess
import sys
from pathlib import Path
import pytest

pytestmark = pytest.mark.slow   # long: `make test-all` runs it (not `make test`)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_swap_overlap.py"


def test_bench_swap_overlap_times_both_swap_in_paths(tmp_path):
    # its own process, like bench_swap: pinned_host buffers on the CPU backend stay out of ours
    out = tmp_path / "overlap.json"
    subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--dtype", "float32",
                    "--seqs", "2", "--context", "16", "--batches", "8", "--repeats", "1",
                    "--out", str(out)], check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["incoming_pages"] > 0          # the runner has the step programs that load
    (row,) = result["rows"]
    assert row["pages"] == 8 and row["bytes"] == 8 * 2 * 2 * 16 * 2 * 16 * 4
    for path in ("layered", "next_step"):
        assert row[f"{path}_s"] > 0 and 0 <= row[f"{path}_hidden"] <= 1
