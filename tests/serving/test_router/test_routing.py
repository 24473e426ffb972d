"""The routing policies: E2's exploit, explore, affinity and rebalance; round-robin."""

from serving.router.routing import Candidate, E2Config, RoundRobin, affinity_choose, e2_choose, \
    e2_cost


def cand(replica, load=0.0, matched=0, cached=0, capacity=0):
    return Candidate(replica, load, matched, cached, capacity)


def test_e2_exploits_when_cached_part_is_larger():
    c = [cand(0, load=500, matched=80), cand(1, load=0, matched=10)]
    d = e2_choose(c, 100, E2Config(affinity=False))
    assert (d.replica, d.reason, d.matched) == (0, "exploit", 80)


def test_e2_rebalances_a_hot_prefix_off_an_overloaded_replica():
    c = [cand(0, load=5000, matched=80), cand(1, load=0)]
    d = e2_choose(c, 100, E2Config(affinity=False, rebalance_threshold=1000))
    assert (d.replica, d.reason) == (1, "rebalance")


def test_e2_explores_lowest_cost_otherwise():
    # replica 0 caches 40 of 100 (not more than the 60 to compute): explore.
    # costs: 0 -> 100 + 60 = 160; 1 -> 0 + 100 = 100; 2 -> 50 + 100 + eviction 50 = 200
    c = [cand(0, load=100, matched=40), cand(1), cand(2, load=50, cached=950, capacity=1000)]
    assert e2_cost(c[2], 100, E2Config()) == 200
    d = e2_choose(c, 100, E2Config(affinity=False))
    assert (d.replica, d.reason) == (1, "explore")


def test_e2_affinity_and_rebalance():
    config = E2Config(rebalance_threshold=1000)
    near = [cand(0, load=900, matched=90), cand(1, load=0)]
    assert e2_choose(near, 100, config, home=0).reason == "affinity"
    far = [cand(0, load=5000, matched=90), cand(1, load=0)]
    d = e2_choose(far, 100, config, home=0)
    assert (d.replica, d.reason) == (1, "rebalance")
    assert e2_choose(near, 100, config, home=7).reason in ("exploit", "explore")   # home down


def test_round_robin_and_affinity_skip_missing_replicas():
    rr = RoundRobin()
    assert [rr.choose([cand(0), cand(1), cand(2)]).replica for _ in range(4)] == [0, 1, 2, 0]
    assert rr.choose([cand(0), cand(2)]).replica == 2
    assert affinity_choose([cand(0), cand(1)], 1, rr).replica == 1
    assert affinity_choose([cand(0), cand(1)], 2, rr).reason == "round-robin"
