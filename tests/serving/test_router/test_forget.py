"""The router forgets conversations: EndConversation (forwarded to the replicas), idle expiry
after conversation_ttl_s and a cap on how many it remembers (least recently used idle first),
never one with a turn in flight: a 2-replica e2 cluster on loopback whose router runs on a fake
clock (expiry when the test says so). (The table alone: test_table.py.)"""

import json

import pytest

from pensieve_jax.engine.sampling import SamplingParams
from serving.client import connect
from serving.cluster import BackgroundCluster, ClusterConfig
from serving.errors import NotFound
from ..conftest import ENGINE_OPTIONS, GREEDY, MODEL, stream_in_background, wait_until
from .clock import FakeClock

TTL = 60.0
SYSTEM = "Be brief."
TURNS = ["Hello there, who are you?", "Tell me more.", "And a third thing."]
# one token: "n" (random:tiny's first reply token), whose text encodes back to the same id, so a
# history resent as text is the exact token sequence the replica had (see the resume test)
ONE = SamplingParams(max_tokens=1, ignore_eos=True)


def test_options():
    from serving.cli import parse_args
    args = parse_args(["router", "--replica", "h:1", "--conversation-ttl-s", "30",
                       "--max-conversations", "5"])
    assert (args.conversation_ttl_s, args.routing.max_conversations) == (30.0, 5)
    args = parse_args(["router", "--replica", "h:1", "--conversation-ttl", "7"])
    assert (args.conversation_ttl_s, args.routing.max_conversations) == (7.0, 10_000)
    assert parse_args(["router", "--replica", "h:1"]).conversation_ttl_s is None
    # a cluster's router forgets as its replicas do, unless told otherwise
    replicas = (("conversation_ttl_s", 30.0),)
    assert ClusterConfig(engine_options=replicas).router_ttl_s == 30.0
    assert ClusterConfig(engine_options=replicas, conversation_ttl_s=5.0).router_ttl_s == 5.0
    assert ClusterConfig().router_ttl_s is None


# -- through the router -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(engine):
    """2 replicas, router TTL 60 s on a fake clock. One cache report at start (the replicas
    report: the tree keeps keyed holders), then none (3600 s): what the tree holds after that is
    the router's own doing."""
    config = ClusterConfig(MODEL, 2, "e2", engine_options=tuple(ENGINE_OPTIONS.items()),
                           health_period_s=0.2, cache_report_interval_s=3600.0,
                           conversation_ttl_s=TTL)
    with BackgroundCluster(config, loaded_model=engine.model) as c:
        clock = FakeClock()
        router = c.router
        c.call(lambda: [setattr(t, "clock", clock) for t in (router.conversations,
                                                              router.generated)])
        c.clock = clock
        assert wait_until(lambda: c.call(lambda: [r.reports for r in router.replicas])
                          == [True, True])
        yield c


def copies(cluster, cid):
    """{replica: its conversation id} of router conversation cid."""
    return cluster.call(lambda: dict(cluster.router.conversations[cid].cids))


def on_replica(cluster, index, replica_cid) -> bool:
    """Whether replica `index` still knows the conversation (its server or its engine; the
    engine lets go once the turn's pages are released)."""
    server = cluster.cluster.servers[index]
    return cluster.call(lambda: replica_cid in server.service.conversations) or \
        cluster.cluster.engines[index].has_conversation(replica_cid)


def ended_on_replica(cluster, index, replica_cid) -> bool:
    return wait_until(lambda: not on_replica(cluster, index, replica_cid))


def held_in_tree(cluster, index, replica_cid) -> bool:
    return cluster.call(lambda: replica_cid in cluster.router.tree.holders(index))


def forget_all(cluster) -> None:
    """Let every idle conversation of earlier tests expire."""
    cluster.clock.advance(TTL + 1)
    cluster.call(cluster.router.expire)


def table_stats(client):
    return json.loads(client.stats_response().stats_json)["router"]["conversation_table"]


def test_end_conversation_is_forwarded_and_forgotten(cluster):
    with connect(cluster.target, timeout=60) as client:
        before = table_stats(client)
        s = client.session(system=SYSTEM)
        s.send(TURNS[0], GREEDY)
        cid = s.conversation_id
        (home, rcid), = copies(cluster, cid).items()
        assert on_replica(cluster, home, rcid) and held_in_tree(cluster, home, rcid)
        assert client.end_conversation(cid)
        # out of the replica's server and of the tree by the time EndConversation returned
        server = cluster.cluster.servers[home]
        assert rcid not in cluster.call(lambda: list(server.service.conversations))
        assert not held_in_tree(cluster, home, rcid)
        assert ended_on_replica(cluster, home, rcid)
        assert cid not in cluster.call(lambda: list(cluster.router.conversations))
        with pytest.raises(NotFound):
            s.send(TURNS[1], GREEDY)
        assert not client.end_conversation(cid)
        after = table_stats(client)
        assert after["ended"] == before["ended"] + 1
        assert after["held"] == before["held"]


def test_end_during_a_turn_ends_it_after_the_turn(cluster, engine):
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    with engine.session(system=SYSTEM) as s:
        expected = s.send(TURNS[0], params)
    with connect(cluster.target, timeout=60) as client:
        s = client.session(system=SYSTEM)
        pieces, t = stream_in_background(s, TURNS[0], params)
        cid = s.conversation_id
        (home, rcid), = copies(cluster, cid).items()
        assert client.end_conversation(cid)           # as a replica: the turn goes on
        t.join(60)
        assert "".join(pieces) == expected.text      # the whole reply
        assert ended_on_replica(cluster, home, rcid)
        assert wait_until(lambda: not held_in_tree(cluster, home, rcid))
        assert cid not in cluster.call(lambda: list(cluster.router.conversations))  # not back
        with pytest.raises(NotFound):
            s.send(TURNS[1], GREEDY)


def test_idle_conversation_expires_after_ttl(cluster):
    router = cluster.router
    forget_all(cluster)
    with connect(cluster.target, timeout=60) as client:
        before = table_stats(client)
        assert before["ttl_s"] == TTL and before["max_conversations"] == 10_000
        old, new = client.session(system=SYSTEM), client.session(system="Answer like a pirate.")
        old.send(TURNS[0], GREEDY)
        cluster.clock.advance(TTL / 2)
        new.send(TURNS[0], GREEDY)
        (home, rcid), = copies(cluster, old.conversation_id).items()
        cluster.clock.advance(TTL / 2 + 1)           # old: idle past the TTL; new: not
        assert cluster.call(router.expire) == 1
        assert cluster.call(lambda: list(router.conversations)) == [new.conversation_id]
        # its copy is ended on the replica and leaves the tree (no cache report says so)
        assert ended_on_replica(cluster, home, rcid)
        assert wait_until(lambda: not held_in_tree(cluster, home, rcid))
        with pytest.raises(NotFound):
            old.send(TURNS[1], GREEDY)
        assert new.send(TURNS[1], GREEDY).finish_reason == "length"
        # past the TTL but before the expiry loop comes by: forgotten when looked up
        cluster.clock.advance(TTL + 1)
        with pytest.raises(NotFound):
            new.send(TURNS[2], GREEDY)
        after = table_stats(client)
        assert after["expired"] == before["expired"] + 2
        assert after["ended"] == before["ended"] and after["held"] == 0


def test_generate_ids_expire(cluster):
    with connect(cluster.target, timeout=60) as client:
        g = client.generate("raw text", GREEDY)
        kept = client.generate("more raw text", GREEDY)
        cluster.clock.advance(TTL + 1)
        cluster.call(cluster.router.expire)
        assert not client.end_conversation(g.conversation_id)
        assert not client.end_conversation(kept.conversation_id)
        generations = table_stats(client)["generations"]
        assert generations["expired"] >= 2 and generations["held"] == 0


def test_cap_forgets_least_recently_used_idle_conversation(cluster):
    router = cluster.router
    forget_all(cluster)
    cluster.call(lambda: setattr(router.conversations, "max_entries", 2))
    try:
        with connect(cluster.target, timeout=60) as client:
            before = table_stats(client)
            a, b, c = (client.session(system=f"System {i}.") for i in range(3))
            a.send(TURNS[0], GREEDY)
            b.send(TURNS[0], GREEDY)
            a.send(TURNS[1], GREEDY)                 # a used last: b is the oldest
            (home, rcid), = copies(cluster, b.conversation_id).items()
            c.send(TURNS[0], GREEDY)                 # a third: b goes
            held = cluster.call(lambda: list(router.conversations))
            assert held == [a.conversation_id, c.conversation_id]
            assert ended_on_replica(cluster, home, rcid)
            assert wait_until(lambda: not held_in_tree(cluster, home, rcid))
            with pytest.raises(NotFound):
                b.send(TURNS[1], GREEDY)
            assert a.send(TURNS[2], GREEDY).finish_reason == "length"
            after = table_stats(client)
            assert after["evicted"] == before["evicted"] + 1 and after["held"] == 2
            assert after["max_conversations"] == 2
            a.close()
            c.close()
    finally:
        cluster.call(lambda: setattr(router.conversations, "max_entries", 10_000))


def test_conversation_with_a_turn_in_flight_is_never_forgotten(cluster, engine):
    router = cluster.router
    params = SamplingParams(max_tokens=300, ignore_eos=True)
    with engine.session(system=SYSTEM) as s:
        expected = [s.send(TURNS[0], params), s.send(TURNS[1], GREEDY)]
    forget_all(cluster)
    with connect(cluster.target, timeout=60) as client:
        s = client.session(system=SYSTEM)
        pieces, t = stream_in_background(s, TURNS[0], params)
        cid = s.conversation_id
        cluster.clock.advance(10 * TTL)              # the turn started long "ago"
        assert cluster.call(router.expire) == 0
        cluster.call(lambda: setattr(router.conversations, "max_entries", 1))
        try:
            other = client.session(system="Answer like a pirate.")
            other.send(TURNS[0], GREEDY)             # over the cap: only idle ones may go
            assert cid in cluster.call(lambda: list(router.conversations))
            t.join(60)
            assert "".join(pieces) == expected[0].text
            # idle from the end of its turn, not from its start
            cluster.clock.advance(TTL / 2)
            assert cid in cluster.call(lambda: list(router.conversations))
            assert s.send(TURNS[1], GREEDY).token_ids == expected[1].token_ids
        finally:
            cluster.call(lambda: setattr(router.conversations, "max_entries", 10_000))
        assert cluster.call(lambda: router.router_stats()["conversation_table"]["in_flight"]) == 0
        s.close()
        other.close()


def test_forgotten_conversation_resumes_from_its_full_history(cluster, engine):
    """After the router forgot a conversation, the client sends the whole history (no
    conversation_id): it is routed as a new conversation and the replica encodes the history
    from its text. The reply is then what one engine gives that history, and equals the reply
    of a conversation never forgotten when the replies' text encodes back to their token ids
    (the one-token replies here; random:tiny's longer replies hold reserved tokens and broken
    UTF-8, which do not)."""
    router = cluster.router
    with engine.session(system=SYSTEM) as s:                  # never forgotten
        never = [s.send(TURNS[0], ONE), s.send(TURNS[1], ONE), s.send(TURNS[2], GREEDY)]
    with connect(cluster.target, timeout=60) as client:
        s = client.session(system=SYSTEM)
        first = [s.send(TURNS[0], ONE), s.send(TURNS[1], ONE)]
        assert [r.token_ids for r in first] == [r.token_ids for r in never[:2]]
        cluster.clock.advance(TTL + 1)
        cluster.call(router.expire)
        with pytest.raises(NotFound):
            s.send(TURNS[2], GREEDY)
        s.conversation_id = None                 # the client kept the history: send it all
        resumed = s.send(TURNS[2], GREEDY)
        assert resumed.token_ids == never[2].token_ids and resumed.text == never[2].text
        assert resumed.usage.prompt_tokens == never[2].usage.prompt_tokens
        assert s.conversation_id in cluster.call(lambda: list(router.conversations))
        assert s.send("One more.", GREEDY).finish_reason == "length"      # and it goes on

        # longer replies: the resent history is re-encoded from text, as on one engine
        s = client.session(system=SYSTEM)
        s.send(TURNS[0], GREEDY)
        cluster.clock.advance(TTL + 1)
        cluster.call(router.expire)
        history = list(s.history)
        s.conversation_id = None
        resumed = s.send(TURNS[1], GREEDY)
        with engine.session(history=history) as fresh:
            assert resumed.token_ids == fresh.send(TURNS[1], GREEDY).token_ids
        s.close()
