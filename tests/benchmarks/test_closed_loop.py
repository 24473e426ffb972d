"""benchmarks/closed_loop.py and tier_pools.py: the pieces the engine benchmarks share (no
engine: plain threads and arithmetic)."""

import threading
import types

import pytest

from closed_loop import USAGE_TOTALS, run_users, usage_totals
from pensieve_jax.weights import load_model
from tier_pools import tier_pools


def test_run_users_runs_every_user_at_once_and_times_them():
    arrived, seen = threading.Barrier(3, timeout=10), []

    def user(i):
        arrived.wait()            # only passes when all three run at the same time
        seen.append(i)
    wall = run_users(user, 3)
    assert sorted(seen) == [0, 1, 2] and wall > 0


def test_usage_totals_sums_each_field():
    usages = [types.SimpleNamespace(**{k: n * (j + 1) for j, k in enumerate(USAGE_TOTALS)})
              for n in (1, 2, 3)]
    totals = usage_totals(usages)
    assert totals == {k: 6 * (j + 1) for j, k in enumerate(USAGE_TOTALS)}
    assert usage_totals(usages, ("cached_tokens",)) == {"cached_tokens": 12}


def test_tier_pools_are_fractions_of_the_working_set_with_floors():
    model = load_model("random:tiny")
    c = model.config
    pools = tier_pools(model, "float32", 16, 1000, 0.25, 0.1, min_device_pages=8)
    assert (pools.device_pages, pools.host_pages) == (250, 100)
    assert pools.page_bytes == 2 * c.num_layers * 16 * c.num_kv_heads * c.head_dim * 4
    assert pools.host_bytes == 100 * pools.page_bytes
    small = tier_pools(model, "bfloat16", 16, 10, 0.25, 0.0, min_device_pages=8,
                       min_host_pages=2)
    assert (small.device_pages, small.host_pages) == (8, 2)
    assert small.page_bytes == pools.page_bytes // 2
    with pytest.raises(ValueError, match="host_fraction"):
        tier_pools(model, "float32", 16, 10, 0.25, -1.0, min_device_pages=8)
