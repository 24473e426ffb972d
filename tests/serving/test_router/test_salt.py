"""Tenant isolation through the router: a chat conversation keeps the cache_salt it began with
on every replica it runs on (moved and recomputed there, moved by KV transfer, prefilled on a
prefill replica), tenants with identical prompts share no pages, a turn naming another salt is
refused, and the global prefix tree keeps salts apart (routed turns, Generate prompts, the
replicas' cache reports), so E2 never expects a cache hit from another tenant's prefix."""

import json
import time

import grpc
import pytest

from pensieve_jax.tokenizer import Tokenizer
from serving.client import connect
from serving.cluster import BackgroundCluster, ClusterConfig
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.protocol import sampling_to_proto
from serving.router import RouterService
from ..conftest import ENGINE_OPTIONS, GREEDY, MODEL, user, wait_until

INTERVAL = 0.05
PAGE = ENGINE_OPTIONS["page_size"]
# a system prompt longer than a page (256 tokens): one full page of it can be shared
SYSTEM = "You are a careful assistant. " * 11
TURNS = ["Hello there, who are you?", "Tell me more.", "And a third thing."]
A, B = "tenant-a-secret", "tenant-b-secret"


def cluster_of(engine, **config):
    config = ClusterConfig(MODEL, engine_options=tuple(ENGINE_OPTIONS.items()),
                           health_period_s=0.2, **config)
    return BackgroundCluster(config, loaded_model=engine.model)


def replica_salts(cluster, index, replica_cid):
    """(the replica server's session salt, its engine conversation's salt) of a conversation."""
    server, engine = cluster.cluster.servers[index], cluster.cluster.engines[index]
    session = cluster.call(lambda: server.service.conversations[replica_cid].session)
    return session.cache_salt, engine.call(lambda: engine.store.conversations[replica_cid].salt)


def engine_salts(cluster, index):
    """The salts of every conversation replica `index`'s engine holds."""
    engine = cluster.cluster.engines[index]
    return engine.call(lambda: {c.salt for c in engine.store.conversations.values()})


def router_conv(cluster, cid):
    return cluster.call(lambda: cluster.router.conversations[cid])


@pytest.fixture(scope="module")
def reference(engine):
    """One engine's replies (salts change what is shared, never what is said)."""
    with engine.session(system=SYSTEM, cache_salt=A) as s:
        return [s.send(t, GREEDY) for t in TURNS]


# -- the router's bookkeeping (no servers) ---------------------------------------

def test_router_keys_routes_and_reports_by_salt():
    router = RouterService(["127.0.0.1:1", "127.0.0.1:2"], "e2", Tokenizer.byte_level(512))
    r0, r1 = router.replicas
    ids = list(range(1, 101))
    router.cache.learn(r0, ids, "s-0", A)                        # before reports: the estimate
    assert router.tree.match(ids, A) == {0: 100} and router.tree.match(ids) == {}
    # another tenant's identical prompt is no hit: explored, nothing expected cached
    d = router.route(ids, None, salt=B)
    assert (d.reason, d.matched) == ("explore", 0)
    d = router.route(ids, None, salt=A)
    assert (d.replica, d.reason, d.matched) == (0, "exploit", 100)
    d = router.route(ids, None)                             # unsalted: no hit either
    assert d.reason == "explore" and d.matched == 0
    # a report's conversations count under their salt
    router.apply_report(r1, pb.CacheReportResponse(
        epoch="e", version=1, full=True, num_conversations=2, conversations=[
            pb.CachedConversation(conversation_id="s-1", cache_salt=B, token_ids=ids[:50]),
            pb.CachedConversation(conversation_id="s-2", token_ids=ids[:20])]),
        time.monotonic())
    assert router.tree.match(ids, B) == {1: 50}
    assert router.tree.match(ids) == {1: 20}
    assert router.tree.match(ids, A) == {0: 100}
    assert router.router_stats()["tree"]["salts"] == 2


# -- through the router -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def single(engine):
    """One replica behind the router: every conversation lands on it."""
    with cluster_of(engine, replicas=1, policy="e2") as c:
        yield c


def test_salted_chats_share_pages_only_within_their_salt(single):
    with connect(single.target, timeout=60) as client:
        first = client.session(system=SYSTEM, cache_salt=A)
        assert first.send(TURNS[0], GREEDY).usage.cached_tokens == 0
        other = client.session(system=SYSTEM, cache_salt=B)
        assert other.send(TURNS[0], GREEDY).usage.cached_tokens == 0   # B shares nothing of A
        unsalted = client.session(system=SYSTEM)
        assert unsalted.send(TURNS[0], GREEDY).usage.cached_tokens == 0
        same = client.session(system=SYSTEM, cache_salt=A)
        assert same.send(TURNS[0], GREEDY).usage.cached_tokens >= PAGE  # A shares A's page
        for s, salt in ((first, A), (other, B), (unsalted, None), (same, A)):
            cid = router_conv(single, s.conversation_id).cids[0]
            assert replica_salts(single, 0, cid) == (salt, salt or "")
        for s in (first, other, unsalted, same):
            s.close()


def test_continuing_turn_with_another_salt_is_refused(single, reference):
    with connect(single.target, timeout=60) as client:
        s = client.session(system=SYSTEM, cache_salt=A)
        got = [s.send(TURNS[0], GREEDY)]
        for wrong in (B, "x"):
            request = pb.ChatRequest(conversation_id=s.conversation_id,
                                     messages=[user(TURNS[1])],
                                     sampling=sampling_to_proto(GREEDY), cache_salt=wrong)
            with pytest.raises(grpc.RpcError) as e:
                list(client.stub.Chat(request, timeout=30))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "cache_salt" in e.value.details() and A not in e.value.details()
        got.append(s.send(TURNS[1], GREEDY))              # its own salt again: accepted
        s.cache_salt = None
        got.append(s.send(TURNS[2], GREEDY))              # none: the conversation's own
        assert [r.token_ids for r in got] == [r.token_ids for r in reference]
        assert all(r.usage.cached_tokens > 0 for r in got[1:])
        conv = router_conv(single, s.conversation_id)
        assert conv.salt == A and len(conv.history) == 1 + 2 * len(TURNS)
        assert replica_salts(single, 0, conv.cids[0]) == (A, A)
        # an unsalted conversation takes no salt later either
        u = client.session(system=SYSTEM)
        u.send(TURNS[0], GREEDY)
        u.cache_salt = A
        with pytest.raises(ValueError, match="cache_salt"):
            u.send(TURNS[1], GREEDY)
        s.close()
        u.close()


def test_salted_conversation_keeps_its_salt_on_every_replica(engine, reference):
    """Round-robin: turn 1 on one replica, turn 2 on the next (recomputed there from the exact
    ids), turn 3 on the third with its KV transferred there (adopted). Each copy has the salt,
    and the transfer matched the KV under it."""
    with cluster_of(engine, replicas=3, policy="round-robin", kv_move="recompute") as cluster, \
            connect(cluster.target, timeout=60) as client:
        router = cluster.router
        s = client.session(system=SYSTEM, cache_salt=A)
        got, homes = [], []
        for i, turn in enumerate(TURNS):
            if i == 2:
                cluster.call(lambda: setattr(router, "kv_move", "transfer"))
                s.cache_salt = None                       # the conversation's own
            got.append(s.send(turn, GREEDY))
            homes.append(router_conv(cluster, s.conversation_id).home)
        assert sorted(homes) == [0, 1, 2]
        assert [r.token_ids for r in got] == [r.token_ids for r in reference]
        conv = router_conv(cluster, s.conversation_id)
        assert sorted(conv.cids) == [0, 1, 2]
        for index, cid in conv.cids.items():
            assert replica_salts(cluster, index, cid) == (A, A)
            assert engine_salts(cluster, index) == {A}
        stats = cluster.call(router.router_stats)
        assert stats["kv_moves"]["transfers"] == 1 and stats["kv_moves"]["tokens"] > 0
        assert got[2].usage.cached_tokens >= PAGE          # the transferred pages


def test_disaggregated_salted_conversation(engine, reference):
    """The prefill replica runs the prompt under the conversation's salt, and the KV pushed
    to the decode replica (and back) keeps it."""
    with cluster_of(engine, replicas=0, prefill=1, decode=1, kv_move="transfer") as cluster, \
            connect(cluster.target, timeout=60) as client:
        s = client.session(system=SYSTEM, cache_salt=A)
        got = [s.send(t, GREEDY) for t in TURNS[:2]]
        assert [r.token_ids for r in got] == [r.token_ids for r in reference[:2]]
        assert all(r.usage.cached_tokens >= r.usage.prompt_tokens - 1 for r in got)
        conv = router_conv(cluster, s.conversation_id)
        assert conv.home == 1 and replica_salts(cluster, 1, conv.cids[1]) == (A, A)
        assert engine_salts(cluster, 0) == {A} and engine_salts(cluster, 1) == {A}
        disagg = cluster.call(cluster.router.router_stats)["disaggregation"]
        assert disagg["prefills"] == 2 and disagg["to_decode"]["transfers"] == 2
        assert disagg["to_prefill"]["transfers"] >= 1


def test_e2_never_counts_another_salts_prefix(engine):
    """Tenant A's conversation is on replica h. Tenant B's identical first turn is no hit for h
    (in the tree, from routing and from h's cache reports): E2 explores (the idle replica), not
    exploits; A's next conversation exploits h's cached page. Generate the same."""
    with cluster_of(engine, replicas=2, policy="e2", cache_report_interval_s=INTERVAL) as \
            cluster, connect(cluster.target, timeout=60) as client:
        router = cluster.router
        assert wait_until(lambda: cluster.call(
            lambda: [r["cache_report"] for r in router.router_stats()["replicas"]])
            == ["reporting"] * 2)
        reasons = lambda: cluster.call(lambda: dict(router.reasons))

        a = client.session(system=SYSTEM, cache_salt=A)
        a.send(TURNS[0], GREEDY)
        conv = router_conv(cluster, a.conversation_id)
        h, ids = conv.home, list(conv.ids)
        tree = lambda salt: cluster.call(lambda: router.tree.match(ids, salt))
        # the replica's report confirms it under A's salt
        assert wait_until(lambda: cluster.call(lambda: router.tree.holder_salt(
            h, conv.cids[h])) == A and cluster.call(lambda: router.replicas[h].learnt) == {})
        assert tree(A) == {h: len(ids)} and tree(B) == {} and tree("") == {}

        before = reasons()
        b = client.session(system=SYSTEM, cache_salt=B)
        reply = b.send(TURNS[0], GREEDY)
        assert router_conv(cluster, b.conversation_id).home == 1 - h
        assert reasons().get("explore", 0) == before.get("explore", 0) + 1
        assert reasons().get("exploit", 0) == before.get("exploit", 0)
        assert reply.usage.cached_tokens == 0
        by_policy = cluster.call(router.router_stats)["by_policy"]["e2"]
        assert by_policy["predicted_tokens"] == 0          # nothing predicted, nothing cached

        before = reasons()
        again = client.session(system=SYSTEM, cache_salt=A)
        reply = again.send(TURNS[0], GREEDY)
        assert router_conv(cluster, again.conversation_id).home == h
        assert reasons().get("exploit", 0) == before.get("exploit", 0) + 1
        assert reply.usage.cached_tokens >= PAGE

        # Generate: a prompt generated under salt G is a hit for G only
        prompt = "Once upon a time, " * 20
        g = client.generate(prompt, GREEDY, cache_salt="G")
        where = cluster.call(lambda: router.generated[g.conversation_id].replica)
        before = reasons()
        assert client.generate(prompt, GREEDY, cache_salt="G").usage.cached_tokens >= PAGE
        assert reasons().get("exploit", 0) == before.get("exploit", 0) + 1
        before = reasons()
        predicted = cluster.call(lambda: router.counters["e2"].predicted_tokens)
        other = client.generate(prompt, GREEDY, cache_salt="H")
        assert other.usage.cached_tokens == 0
        assert reasons().get("exploit", 0) == before.get("exploit", 0)
        assert cluster.call(lambda: router.counters["e2"].predicted_tokens) == predicted
        gen_ids = cluster.call(lambda: router.keys.generate_ids(prompt))
        assert cluster.call(lambda: router.tree.match(gen_ids, "G")).get(where) == len(gen_ids)
        assert cluster.call(lambda: router.tree.match(gen_ids)) == {}
        stats = json.loads(client.stats_response().stats_json)["router"]
        assert stats["tree"]["salts"] >= 3                  # A, B, G, H (while held)
