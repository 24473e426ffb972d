"""3 in-process random:tiny replicas behind a router under each policy: outputs equal to one
engine's, cache hits on later turns, no conversation lost when a replica stops, between turns or
mid-reply. (The prefix tree and the policies: test_prefix_tree.py, test_routing.py.)"""

import json

import grpc
import pytest

from pensieve_jax.engine.sampling import SamplingParams
from serving.client import connect
from serving.cluster import BackgroundCluster, ClusterConfig
from serving.errors import NotFound
from serving.pensieve.v1 import pensieve_pb2 as pb
from ..conftest import ENGINE_OPTIONS, GREEDY, MODEL, stream_in_background, user

TURNS = ["Hello there, who are you?", "Tell me more.", "And a third thing."]
SYSTEM = "Be brief."


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
