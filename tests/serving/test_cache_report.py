"""Replicas report what their cache holds (MemPool.CacheReport) and the router's prefix tree
follows: the engine-side tracker (versions, diffs, evictions by memory pressure), then a
2-replica e2 cluster on loopback where an eviction and a KV import reach the tree and steer E2,
and a replica without the RPC (an older server) that still routes."""

import json
import logging
import time

import grpc
import pytest

import serving.server
from pensieve_jax.kvcache.report import CacheTracker
from pensieve_jax.session import turn_messages
from serving.client import connect
from serving.cluster import BackgroundCluster, ClusterConfig
from serving.mempool import GRPC_OPTIONS
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.router.routing import E2Config, e2_choose
from .conftest import ENGINE_OPTIONS, GREEDY, MODEL, engine_like, settle, wait_until

INTERVAL = 0.05
# a system prompt longer than a page (256 tokens), so an imported copy is shared by prefix
SYSTEM = "You are a careful assistant. " * 11
TURNS = ["Hello there, who are you?", "Tell me more.", "And a third thing."]


# -- engine side ------------------------------------------------------------------------------

def test_tracker_reports_changes_only(engine):
    settle(engine)
    tracker = CacheTracker(engine)
    first = tracker.report()
    assert first.full and first.page_size == ENGINE_OPTIONS["page_size"]
    s = engine.session(system="Be brief.")
    s.send(TURNS[0], GREEDY)
    settle(engine)
    r = tracker.report(first.epoch, first.version)
    assert not r.full and r.version > first.version
    mine = {h.conversation_id: h for h in r.conversations}
    assert mine[s.conversation_id].token_ids == tuple(s.token_ids)      # every token, held on device
    same = tracker.report(r.epoch, r.version)                      # nothing changed: empty
    assert (same.version, same.conversations, same.removed) == (r.version, [], [])
    s.send(TURNS[1], GREEDY)
    settle(engine)
    grown = tracker.report(r.epoch, r.version)
    assert [h.token_ids for h in grown.conversations] == [tuple(s.token_ids)]
    s.close()
    gone = tracker.report(grown.epoch, grown.version)
    assert gone.removed == [s.conversation_id] and not gone.conversations
    assert gone.num_conversations == r.num_conversations - 1
    assert tracker.report("another-epoch", gone.version).full      # a restarted replica
    assert tracker.report(gone.epoch, gone.version + 5).full        # a version it never gave


def test_tracker_learns_evictions(engine):
    """The engine's own eviction (what a turn short of pages does) drops a conversation's
    front page: it holds nothing any more, and the next report says so."""
    other = engine_like(engine)              # the same shapes: nothing new to compile
    try:
        tracker = CacheTracker(other, max_tombstones=1)
        a, b = other.session(), other.session()
        a.send("a short conversation", GREEDY)
        b.send("another one", GREEDY)
        settle(other)
        r = tracker.report()
        held = {h.conversation_id: len(h.token_ids) for h in r.conversations}
        assert held == {a.conversation_id: len(a.token_ids), b.conversation_id: len(b.token_ids)}
        store = other.store
        # a has been idle the longest: its page goes first (dropped: there is no host tier)
        other.call(lambda: store.make_room(store.allocator.num_free + 1))
        after = tracker.report(r.epoch, r.version)
        assert after.removed == [a.conversation_id] and after.conversations == []
        assert after.num_conversations == 1
        b.close()
        # one tombstone kept: a caller two removals behind gets a full report
        assert tracker.report(r.epoch, r.version).full
        assert tracker.report(r.epoch, tracker.version).removed == []
    finally:
        other.shutdown()


# -- the router's reconciliation (no servers) --------------------------------------------------

def held(cid, ids):
    return pb.CachedConversation(conversation_id=cid, token_ids=ids)


def test_router_reconciles_reports():
    from pensieve_jax.tokenizer import Tokenizer
    from serving.router import RouterService
    router = RouterService(["127.0.0.1:1,internal=2"], "e2", Tokenizer.byte_level(512))
    r, tree = router.replicas[0], router.tree
    router.cache.learn(r, [1, 2, 3], "s-0")               # before any report: the LRU estimate
    assert tree.match([1, 2, 3]) == {0: 3} and tree.holders(0) == {}
    t0 = time.monotonic()
    router.apply_report(r, pb.CacheReportResponse(
        epoch="e", version=1, full=True, conversations=[held("s-1", [1, 2, 9])],
        num_conversations=1), t0)
    # the estimate gave way to what the replica holds
    assert tree.match([1, 2, 3]) == {0: 2} and tree.match([1, 2, 9]) == {0: 3}
    assert router.reports["estimate_dropped_tokens"] == 1
    assert (r.reports, r.report_epoch, r.report_version) == (True, "e", 1)

    router.cache.learn(r, [1, 2, 9, 4], "s-1")            # a turn routed after the report was asked
    router.cache.learn(r, [6, 6], "s-2")                  # a turn routed but not kept there
    t1 = time.monotonic()
    router.cache.learn(r, [7, 7], "s-3")                  # routed after the next report was asked
    router.apply_report(r, pb.CacheReportResponse(
        epoch="e", version=2, conversations=[held("s-1", [1, 2, 9, 4])], num_conversations=1), t1)
    assert tree.holders(0) == {"s-1": (1, 2, 9, 4), "s-3": (7, 7)}   # s-2 let go, s-3 pending
    assert router.reports["evictions_learnt"] == 1
    t2 = time.monotonic()
    router.apply_report(r, pb.CacheReportResponse(
        epoch="e", version=3, removed=["s-1"], conversations=[held("s-3", [7, 7])],
        num_conversations=1), t2)
    assert tree.holders(0) == {"s-3": (7, 7)} and tree.match([1, 2, 9, 4]) == {}
    router.apply_report(r, pb.CacheReportResponse(                   # out of step with it
        epoch="e", version=4, conversations=[held("s-4", [8])], num_conversations=5), t2)
    assert router.reports["resyncs"] == 1 and r.report_epoch == ""   # next: a full report
    stats = router.router_stats()
    assert stats["replicas"][0]["cache_report"] == "reporting"
    assert stats["cache_reports"]["received"] == 4


# -- through the router -----------------------------------------------------------------------

def cluster_of(engine, **config):
    config = ClusterConfig(MODEL, engine_options=tuple(ENGINE_OPTIONS.items()),
                           health_period_s=0.2, cache_report_interval_s=INTERVAL, **config)
    return BackgroundCluster(config, loaded_model=engine.model)


@pytest.fixture(scope="module")
def reference(engine):
    with engine.session(system=SYSTEM) as s:
        return [s.send(t, GREEDY) for t in TURNS]


def test_tree_follows_evictions_and_imports(engine, reference):
    """Turn 1 lands on replica h. Its KV is also imported into replica o behind the router's
    back (an anonymous conversation there): o's report puts it in the tree. h then drops the
    conversation: h's report takes it out, so E2 moves turn 2 to o, which serves the shared
    prefix from the imported pages. Replies equal one engine's throughout."""
    with cluster_of(engine, replicas=2, policy="e2") as cluster, \
            connect(cluster.target, timeout=60) as client:
        router = cluster.router
        s = client.session(system=SYSTEM)
        got = [s.send(TURNS[0], GREEDY)]
        conv = cluster.call(lambda: router.conversations[s.conversation_id])
        h = conv.home
        o = 1 - h
        ids = list(conv.ids)
        # h's load is about len(ids) (turn 1's prefill): staying costs that much more than o
        # while h holds the conversation, about 2 * len(ids) more once it does not
        cluster.call(lambda: setattr(router, "e2", E2Config(rebalance_threshold=1.5 * len(ids))))
        reporting = lambda: cluster.call(lambda: [r["cache_report"] for r in
                                                  router.router_stats()["replicas"]])
        assert wait_until(lambda: reporting() == ["reporting"] * 2)
        tree_match = lambda: cluster.call(lambda: router.tree.match(ids))
        assert tree_match() == {h: len(ids)}

        # an import the router did not route shows up in the tree (o's report)
        internal = cluster.cluster.internal_targets
        with grpc.insecure_channel(internal[h], GRPC_OPTIONS) as channel:
            moved = pb_grpc.MemPoolStub(channel).Transfer(pb.TransferRequest(
                conversation_id=conv.cids[h], target=internal[o]), timeout=60,
                metadata=cluster.cluster.secret.metadata())
        assert moved.num_tokens == len(ids)
        assert wait_until(lambda: tree_match() == {h: len(ids), o: len(ids)})
        nxt = cluster.call(lambda: router.keys.prompt_ids(conv.template, conv.ids,
                                                          turn_messages(TURNS[1])))
        decide = lambda: cluster.call(lambda: e2_choose(router.chooser.candidates(nxt), len(nxt),
                                                        router.e2, h))
        assert decide()[:2] == (h, "affinity")       # h holds it: the conversation stays

        # h drops it: within a few report intervals the tree no longer credits h
        start = time.monotonic()
        assert cluster.cluster.engines[h].end_conversation(conv.cids[h])
        assert wait_until(lambda: tree_match() == {o: len(ids)}, timeout=2.0)
        learnt_in = time.monotonic() - start
        assert learnt_in < 2.0
        d = decide()
        assert (d.replica, d.reason, d.matched) == (o, "rebalance", len(ids))

        got += [s.send(t, GREEDY) for t in TURNS[1:]]
        assert [r.token_ids for r in got] == [r.token_ids for r in reference]
        assert [r.text for r in got] == [r.text for r in reference]
        assert cluster.call(lambda: conv.home) == o
        assert got[1].usage.cached_tokens >= ENGINE_OPTIONS["page_size"]   # the imported page

        stats = json.loads(client.stats_response().stats_json)["router"]
        reports = stats["cache_reports"]
        assert reports["received"] >= 4 and reports["failed"] == 0 and reports["resyncs"] == 0
        assert reports["evictions_learnt"] >= 1 and reports["evicted_tokens_learnt"] > 0
        assert reports["inserts_learnt"] >= 1 and reports["inserted_tokens_learnt"] > 0
        assert stats["reasons"].get("rebalance", 0) >= 1
        s.close()


def test_replica_without_cache_report_still_routes(engine, monkeypatch, caplog):
    """Replica 1 is an older server (no CacheReport): the router logs it once, estimates its
    cache from routing as before, and replies are unchanged."""
    made = []

    class OldServer(serving.server.PensieveServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
            if len(made) == 2:
                async def unimplemented(request, context):
                    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
                self.mempool.CacheReport = unimplemented

    monkeypatch.setattr(serving.server, "PensieveServer", OldServer)
    caplog.set_level(logging.WARNING, logger="serving.router")
    systems = ["Be brief.", "Answer like a pirate."]
    expected = []
    for system in systems:
        with engine.session(system=system) as s:
            expected.append([s.send(t, GREEDY).token_ids for t in TURNS])
    with cluster_of(engine, replicas=2, policy="e2") as cluster, \
            connect(cluster.target, timeout=60) as client:
        router = cluster.router
        sessions = [client.session(system=system) for system in systems]
        for i, t in enumerate(TURNS):
            for s, want in zip(sessions, expected):
                assert s.send(t, GREEDY).token_ids == want[i]
        homes = {cluster.call(lambda: router.conversations[s.conversation_id].home)
                 for s in sessions}
        assert homes == {0, 1}                      # E2 spread them: one on the old replica
        time.sleep(5 * INTERVAL)                    # more polls: still logged only once
        stats = cluster.call(router.router_stats)
        assert [r["cache_report"] for r in stats["replicas"]] == ["reporting", "unsupported"]
        assert all(r["tree_tokens"] > 0 for r in stats["replicas"])   # 1: learnt by routing
        for s in sessions:
            ids = cluster.call(lambda: router.conversations[s.conversation_id].ids)
            home = cluster.call(lambda: router.conversations[s.conversation_id].home)
            assert cluster.call(lambda: router.tree.match(ids))[home] == len(ids)
    logged = [r for r in caplog.records if "does not report its cache" in r.getMessage()]
    assert len(logged) == 1 and made[1].target in logged[0].getMessage()
