"""The router: the prefix tree and the E2 decision (units), then 3 in-process random:tiny
replicas behind a router under each policy (outputs equal to one engine's, cache hits on later
turns, no conversation lost when a replica stops, between turns or mid-reply)."""

import json

import grpc
import pytest

from pensieve_jax.engine.sampling import SamplingParams
from serving.client import connect
from serving.cluster import BackgroundCluster, ClusterConfig
from serving.errors import NotFound
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.prefix_tree import PrefixTree
from serving.routing import Candidate, E2Config, RoundRobin, affinity_choose, e2_choose, e2_cost
from .conftest import ENGINE_OPTIONS, GREEDY, MODEL, stream_in_background, user

TURNS = ["Hello there, who are you?", "Tell me more.", "And a third thing."]
SYSTEM = "Be brief."


# -- prefix tree ------------------------------------------------------------------------------

def test_tree_match_split_and_counts():
    t = PrefixTree()
    t.insert([1, 2, 3, 4], 0, 1.0)
    t.insert([1, 2, 5], 1, 2.0)
    t.insert([1, 2, 3, 9, 9], 0, 3.0)
    assert t.match([1, 2, 3, 4, 7]) == {0: 4, 1: 2}
    assert t.match([1, 2, 5, 6]) == {0: 2, 1: 3}
    assert t.match([7]) == {}
    assert (t.cached_tokens(0), t.cached_tokens(1)) == (6, 3)


def test_tree_evicts_least_recently_used_leaves():
    t = PrefixTree()
    t.insert([1, 2, 3, 4], 0, 1.0)
    t.insert([1, 2, 3, 9, 9], 0, 3.0)
    t.touch([1, 2, 3, 4], 0, 5.0)                  # [4] is now the most recent
    assert t.evict(0, 4) == 2                      # [9, 9] goes first
    assert t.match([1, 2, 3, 9, 9]) == {0: 3}
    assert t.match([1, 2, 3, 4]) == {0: 4}
    assert t.evict(0, 0) == 4 and t.num_nodes() == 0


def test_tree_drop_replica_keeps_others():
    t = PrefixTree()
    t.insert([1, 2, 3], 0, 1.0)
    t.insert([1, 2, 3], 1, 1.0)
    t.drop_replica(0)
    assert t.match([1, 2, 3]) == {1: 3} and t.cached_tokens(0) == 0


def test_tree_keyed_holders_share_prefixes():
    """Each replica conversation is a holder: a prefix stays credited while any holder of that
    replica covers it, and hold() returns the change of what the replica is credited with."""
    t = PrefixTree()
    assert t.hold([1, 2, 3, 4], 0, "a", 1.0) == 4
    assert t.hold([1, 2, 3, 9, 9], 0, "b", 1.0) == 2          # shares [1, 2, 3] with a
    assert t.hold([1, 2, 3, 4], 1, "a", 1.0) == 4             # same key, another replica
    assert t.hold([], 0, "a", 2.0) == -1                       # a evicted: [4] goes, not [1, 2, 3]
    assert t.match([1, 2, 3, 4]) == {0: 3, 1: 4}
    assert t.hold([1, 2], 0, "b", 2.0) == -3                   # b's tail evicted
    assert t.hold([1, 2, 7], 0, "b", 3.0) == 1                 # ... and grown another way
    assert t.match([1, 2, 7]) == {0: 3, 1: 2} and t.cached_tokens(0) == 3
    assert t.holders(0) == {"b": (1, 2, 7)}
    t.insert([5, 5], 0, 3.0)                                   # an unkeyed estimate
    assert t.drop_unheld(0) == 2 and t.match([5, 5]) == {}
    assert t.hold([], 0, "b", 4.0) == -3 and t.cached_tokens(0) == 0
    t.drop_replica(1)
    assert t.num_nodes() == 0 and t.holders(1) == {}


# -- policies ---------------------------------------------------------------------------------

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


# -- a cluster of 3 replicas --------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(engine):
    """The single-engine outputs: one conversation of TURNS, and a raw generation."""
    with engine.session(system=SYSTEM) as s:
        replies = [s.send(t, GREEDY) for t in TURNS]
    return replies, engine.generate(engine.tokenizer.encode("raw text"), GREEDY)


def make_cluster(engine, policy):
    config = ClusterConfig(MODEL, 3, policy, engine_options=tuple(ENGINE_OPTIONS.items()),
                           health_period_s=0.2)
    return BackgroundCluster(config, loaded_model=engine.model)


@pytest.fixture(scope="module", params=["round-robin", "affinity", "e2"])
def cluster(request, engine):
    with make_cluster(engine, request.param) as c:
        yield c


def test_outputs_equal_single_engine(cluster, reference):
    replies, generated = reference
    with connect(cluster.target, timeout=60) as client:
        session = client.session(system=SYSTEM)
        got = [session.send(t, GREEDY) for t in TURNS]
        assert [r.token_ids for r in got] == [r.token_ids for r in replies]
        assert [r.text for r in got] == [r.text for r in replies]
        # the same token accounting: every replica saw the identical token sequence
        assert [r.usage.prompt_tokens for r in got] == [r.usage.prompt_tokens for r in replies]
        g = client.generate("raw text", GREEDY)
        assert list(g.token_ids) == generated and g.conversation_id.startswith("gen-")
        assert client.end_conversation(g.conversation_id)
        session.close()
        stats = json.loads(client.stats_response().stats_json)["router"]
        policy = cluster.router.policy
        assert stats["by_policy"][policy]["turns"] >= 4
        if policy == "round-robin":       # each turn on the next replica: nothing cached
            assert stats["events"]["moves"] >= 2
        else:                             # later turns hit the cache on their replica
            assert all(r.usage.cached_tokens > 0 for r in got[1:])
            assert stats["by_policy"][policy]["hit_rate"] > 0
            assert stats["events"]["moves"] == 0


def test_bad_input_statuses(cluster):
    with connect(cluster.target, timeout=30) as client:
        assert not client.end_conversation("conv-nope")
        s = client.session()
        s.conversation_id = "conv-nope"
        with pytest.raises(NotFound):
            s.send("hi", GREEDY)
        for request in (pb.ChatRequest(), pb.ChatRequest(messages=[user("hi")],
                                                         history_token_ids=[1, 2])):
            with pytest.raises(grpc.RpcError) as e:
                list(client.stub.Chat(request, timeout=30))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stats_aggregate_replicas(cluster):
    with connect(cluster.target, timeout=30) as client:
        response = client.stats_response()
        stats = json.loads(response.stats_json)
        assert len(stats["replicas"]) == 3 and response.pages_total == 3 * 64
        assert response.model == MODEL


def test_replica_stopped_between_turns_loses_no_conversation(engine, reference):
    replies, _ = reference
    with make_cluster(engine, "e2") as cluster, connect(cluster.target, timeout=60) as client:
        sessions = [client.session(system=SYSTEM) for _ in range(3)]
        for s in sessions:
            s.send(TURNS[0], GREEDY)
        router = cluster.router
        homes = cluster.call(lambda: {s.conversation_id: router.conversations[s.conversation_id].home
                                      for s in sessions})
        victim = homes[sessions[0].conversation_id]
        cluster.stop_replica(victim)
        for s in sessions:                 # every conversation goes on, with the same text
            rest = [s.send(t, GREEDY) for t in TURNS[1:]]
            assert [r.text for r in rest] == [r.text for r in replies[1:]]
        moved = [s for s in sessions if homes[s.conversation_id] == victim]
        assert moved and all(cluster.call(lambda: router.conversations[s.conversation_id].home)
                             != victim for s in moved)
        stats = cluster.call(router.router_stats)
        assert not stats["replicas"][victim]["healthy"]


def test_replica_stopped_mid_reply_is_replayed(engine):
    params = SamplingParams(max_tokens=300, ignore_eos=True)
    with engine.session(system=SYSTEM) as s:
        expected = s.send(TURNS[0], params)
    with make_cluster(engine, "affinity") as cluster, connect(cluster.target, timeout=60) as client:
        session = client.session(system=SYSTEM)
        pieces, t = stream_in_background(session, TURNS[0], params)
        router = cluster.router
        home = cluster.call(lambda: next(iter(router.conversations.values())).cids)
        cluster.stop_replica(next(iter(home)))
        t.join(60)
        assert "".join(pieces) == expected.text
        assert session.last_reply.token_ids == expected.token_ids
        events = cluster.call(router.router_stats)["events"]
        assert events["failovers"] >= 1
        assert session.send(TURNS[1], GREEDY).finish_reason == "length"
