"""MemPool: KV export/import between engines, the MemPool gRPC service between two replicas'
internal ports on loopback, a router moving a conversation by KV transfer, and prefill/decode disaggregation
(1 prefill + 1 decode replica) giving the single-engine outputs."""

import dataclasses
import json

import grpc
import numpy as np
import pytest

from pensieve_jax.kvcache.transfer import KVMismatch
from pensieve_jax.kvcache.errors import ConversationBusy
from pensieve_jax.session import Session
from serving.auth import CLUSTER_SECRET_METADATA
from serving.client import connect
from serving.cluster import BackgroundCluster, ClusterConfig
from serving.mempool import CostModel, GRPC_OPTIONS
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.protocol import messages_to_proto, sampling_to_proto
from serving.server import BackgroundServer
from .conftest import ENGINE_OPTIONS, GREEDY, LONG, MODEL, engine_like

SYSTEM = "Be brief."
TURNS = ["Hello there, who are you?", "Tell me more.", "And a third thing."]


@pytest.fixture(scope="module")
def reference(engine):
    with engine.session(system=SYSTEM) as s:
        return [s.send(t, GREEDY) for t in TURNS]


@pytest.fixture(scope="module")
def other(engine):
    e = engine_like(engine)
    yield e
    e.shutdown()


def continue_on(engine, cid, source: Session) -> Session:
    s = Session(engine)
    s.conversation_id = cid
    s.history, s._template_history = list(source.history), list(source._template_history)
    s.continue_from(source.token_ids)
    return s


# -- engine level -----------------------------------------------------------------------------

def test_export_import_continues_exactly(engine, other, reference):
    a = engine.session(system=SYSTEM)
    a.send(TURNS[0], GREEDY)
    kv = engine.export_kv(a.conversation_id)
    assert kv.first_page == 0 and kv.num_tokens == len(a.token_ids)
    assert kv.k.shape == (2, 1, 256, 2, 16) and kv.k.dtype == np.float32
    cid = other.import_kv("moved-1", kv.token_ids, kv.k, kv.v, kv.layout)
    b = continue_on(other, cid, a)
    r = b.send(TURNS[1], GREEDY)
    assert r.token_ids == reference[1].token_ids
    assert r.usage.cached_tokens == kv.num_tokens
    # the next turn's KV comes back by an incremental export (only the pages a lacks)
    again = other.export_kv(cid, start=kv.num_tokens)
    assert again.first_page == kv.num_tokens // 256 and again.num_tokens == len(b.token_ids)
    engine.import_kv(a.conversation_id, again.token_ids, again.k, again.v, again.layout,
                     again.first_page)
    a2 = continue_on(engine, a.conversation_id, b)
    r = a2.send(TURNS[2], GREEDY)
    assert r.token_ids == reference[2].token_ids and r.usage.cached_tokens == len(b.token_ids)
    a2.close(), b.close()


def test_import_refuses_mismatch_and_busy(engine, other):
    with engine.session() as s:
        s.send("hi", GREEDY)
        kv = engine.export_kv(s.conversation_id)
    with pytest.raises(KVMismatch):
        other.import_kv("x", kv.token_ids, kv.k, kv.v, kv.layout._replace(page_size=16))
    with pytest.raises(KVMismatch):
        other.import_kv("x", kv.token_ids, kv.k.astype(np.float16), kv.v, kv.layout)
    with pytest.raises(KVMismatch):
        other.import_kv("x", kv.token_ids + (1,) * 300, kv.k, kv.v, kv.layout)
    with pytest.raises(KVMismatch):      # extends a conversation that does not hold page 0
        other.import_kv("nope", kv.token_ids, kv.k[:, :0], kv.v[:, :0], kv.layout, 1)
    s = other.session()
    chunks = s.stream_chunks("go", LONG)
    next(chunks), next(chunks)            # the turn is running (tokens came out)
    with pytest.raises(ConversationBusy):
        other.export_kv(s.conversation_id)
    with pytest.raises(ConversationBusy):
        other.import_kv(s.conversation_id, kv.token_ids, kv.k, kv.v, kv.layout)
    chunks.close()
    s.close()


def test_match_right_after_a_turn_counts_the_whole_turn(engine):
    """The turn's reply arrives before its cache flush (the last token's KV, the next step)
    runs: Match waits for the flush instead of answering one token short (it used to, in
    about half of these)."""
    params = dataclasses.replace(GREEDY, max_tokens=3)
    for i in range(8):
        prompt = list(range(5 + i, 40 + i))
        out = engine.submit(prompt, params, conversation_id=f"match-{i}").result()
        ids = prompt + list(out.token_ids)
        own, _ = engine.match_kv(f"match-{i}", ids)
        assert own == len(ids)
        assert engine.end_conversation(f"match-{i}")


def test_cost_model_prefers_the_cheaper_way():
    m = CostModel(bandwidth_bps=1e9, overhead_s=0.01, prefill_tps=1000)
    assert m.choose(5000, 10 << 20).transfer            # 5 s of prefill vs 20 ms of transfer
    assert not m.choose(5, 10 << 10).transfer            # 5 ms of prefill vs 10 ms overhead
    m.observe_transfer(100 << 20, 1.0)
    assert m.bandwidth_bps < 1e9


# -- MemPool between two replicas ---------------------------------------------------------------

SECRET = "test-cluster-secret"
INTERNAL = ((CLUSTER_SECRET_METADATA, SECRET),)       # what internal calls carry


def test_transfer_between_two_replicas(engine, other, reference):
    """MemPool on the replicas' internal ports (behind the cluster secret): Match, Export, and a
    Transfer a -> b (b is a's configured peer) that b then continues exactly."""
    with BackgroundServer(engine, cluster_secret=SECRET) as a, \
            BackgroundServer(other, cluster_secret=SECRET) as b, \
            grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(b.target) as cb, \
            grpc.insecure_channel(a.internal_target, GRPC_OPTIONS) as ia, \
            grpc.insecure_channel(b.internal_target, GRPC_OPTIONS) as ib:
        a.call(lambda: a.server.internal.allow_peers([b.internal_target]))
        chat_a, chat_b = pb_grpc.PensieveStub(ca), pb_grpc.PensieveStub(cb)
        pool_a, pool_b = pb_grpc.MemPoolStub(ia), pb_grpc.MemPoolStub(ib)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}]
        out = list(chat_a.Chat(pb.ChatRequest(messages=messages_to_proto(messages),
                                              sampling=sampling_to_proto(GREEDY)), timeout=60))
        cid = out[-1].conversation_id
        ids = a.call(lambda: list(a.service.conversations[cid].session.token_ids))
        m = pool_a.Match(pb.MatchRequest(conversation_id=cid, token_ids=ids + [5]), timeout=30,
                         metadata=INTERNAL)
        assert m.conversation_tokens == len(ids) and m.page_bytes == engine.kv_layout().page_bytes
        exported = list(pool_a.Export(pb.ExportRequest(conversation_id=cid, chunk_bytes=1),
                                      timeout=30, metadata=INTERNAL))
        assert exported[0].num_pages == 1 and list(exported[0].token_ids) == ids
        moved = pool_a.Transfer(pb.TransferRequest(conversation_id=cid, target=b.internal_target,
                                                   adopt=True), timeout=60, metadata=INTERNAL)
        assert moved.num_tokens == len(ids) and moved.bytes == m.page_bytes
        assert pool_b.Match(pb.MatchRequest(conversation_id=moved.target_conversation_id,
                                            token_ids=ids), timeout=30,
                            metadata=INTERNAL).conversation_tokens == len(ids)
        template = [*messages, {"role": "assistant", "content": engine.tokenizer.decode(
            reference[0].token_ids)}]
        turn = template + [{"role": "user", "content": TURNS[1]}]
        out = list(chat_b.Chat(pb.ChatRequest(
            conversation_id=moved.target_conversation_id, messages=messages_to_proto(turn),
            sampling=sampling_to_proto(GREEDY), history_token_ids=ids), timeout=60))
        got = [t for r in out for t in r.token_ids]
        assert tuple(got) == reference[1].token_ids
        assert out[-1].usage.cached_tokens == len(ids)
        with pytest.raises(grpc.RpcError) as e:
            pool_a.Export(pb.ExportRequest(conversation_id="nope"), timeout=30,
                          metadata=INTERNAL).next()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            pool_b.Import(iter([]), timeout=30, metadata=INTERNAL)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- through the router -------------------------------------------------------------------------

def cluster_of(engine, **config):
    config = ClusterConfig(MODEL, engine_options=tuple(ENGINE_OPTIONS.items()),
                           health_period_s=0.2, **config)
    return BackgroundCluster(config, loaded_model=engine.model)


def test_router_moves_a_conversation_by_kv_transfer(engine, reference):
    with cluster_of(engine, replicas=2, policy="affinity", kv_move="transfer") as cluster, \
            connect(cluster.target, timeout=60) as client:
        s = client.session(system=SYSTEM)
        got = [s.send(TURNS[0], GREEDY)]
        router = cluster.router
        home = cluster.call(lambda: router.conversations[s.conversation_id].home)
        moved = cluster.drain_replica(home)        # graceful: its KV moves, then it stops
        assert moved == 1
        got += [s.send(t, GREEDY) for t in TURNS[1:]]
        assert [r.token_ids for r in got] == [r.token_ids for r in reference]
        assert got[1].usage.cached_tokens > 0
        assert cluster.call(lambda: router.conversations[s.conversation_id].home) != home
        stats = cluster.call(router.router_stats)
        assert stats["kv_moves"]["transfers"] == 1 and stats["kv_moves"]["bytes"] > 0


def test_disaggregated_cluster_equals_single_engine(engine, reference):
    with cluster_of(engine, replicas=0, prefill=1, decode=1, kv_move="transfer") as cluster, \
            connect(cluster.target, timeout=60) as client:
        s = client.session(system=SYSTEM)
        got = [s.send(t, GREEDY) for t in TURNS]
        assert [r.token_ids for r in got] == [r.token_ids for r in reference]
        assert [r.text for r in got] == [r.text for r in reference]
        assert all(r.usage.cached_tokens >= r.usage.prompt_tokens - 1 for r in got)
        stats = json.loads(client.stats_response().stats_json)
        disagg = stats["router"]["disaggregation"]
        assert disagg["prefills"] == 3 and disagg["to_decode"]["transfers"] == 3
        assert disagg["to_prefill"]["transfers"] >= 1           # KV flowed back for turn 2+
        roles = [r["role"] for r in stats["replicas"]]
        assert roles == ["prefill", "decode"]
        s.close()
