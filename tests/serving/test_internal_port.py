"""The internal services never on the public port (issue 20): MemPool answers only on a server's
internal port (loopback by default), only to callers with the cluster secret, and pushes KV
only to configured peers; a router finds each replica's internal port from its address."""

import socket
import threading

import grpc
import pytest

from serving.auth import CLUSTER_SECRET_METADATA, ApiKeys, ClusterSecret
from serving.mempool import GRPC_OPTIONS
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.router import RouterService
from serving.router.links import ReplicaAddress
from serving.server import BackgroundServer
from serving.server.internal import InternalOptions
from .conftest import GREEDY, collect, sampling, user

SECRET = "internal-test-secret"
RIGHT = ((CLUSTER_SECRET_METADATA, SECRET),)
WRONG = ((CLUSTER_SECRET_METADATA, "guess"),)


@pytest.fixture(scope="module")
def replica(engine):
    with BackgroundServer(engine, cluster_secret=SECRET, api_keys=ApiKeys(["k"])) as s:
        yield s


def match(target, metadata):
    with grpc.insecure_channel(target, GRPC_OPTIONS) as channel:
        return pb_grpc.MemPoolStub(channel).Match(
            pb.MatchRequest(token_ids=[1, 2, 3]), timeout=10, metadata=metadata)


def refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def test_mempool_is_not_on_the_public_port(replica, server):
    key = (("authorization", "Bearer k"),)
    for target, metadata in ((replica.target, key), (replica.target, key + RIGHT),
                             (server.target, None)):
        with grpc.insecure_channel(target) as channel:
            pool = pb_grpc.MemPoolStub(channel)
            for call in (lambda: pool.Match(pb.MatchRequest(token_ids=[1]), timeout=10,
                                            metadata=metadata),
                         lambda: pool.CacheReport(pb.CacheReportRequest(), timeout=10,
                                                  metadata=metadata),
                         lambda: list(pool.Export(pb.ExportRequest(conversation_id="x"),
                                                  timeout=10, metadata=metadata)),
                         lambda: pool.Transfer(pb.TransferRequest(conversation_id="x",
                                                                  target="127.0.0.1:1"),
                                               timeout=10, metadata=metadata)):
                assert refused(call) == grpc.StatusCode.UNIMPLEMENTED


def test_the_internal_port_needs_the_cluster_secret(replica):
    assert replica.internal_target.startswith("127.0.0.1:")       # loopback by default
    assert replica.internal_target != replica.target
    assert refused(lambda: match(replica.internal_target, None)) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert refused(lambda: match(replica.internal_target, WRONG)) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert match(replica.internal_target, RIGHT).page_bytes > 0
    with grpc.insecure_channel(replica.internal_target, GRPC_OPTIONS) as channel:
        report = pb_grpc.MemPoolStub(channel).CacheReport(pb.CacheReportRequest(), timeout=10,
                                                         metadata=RIGHT)
        assert report.full and report.epoch
        # an API key is no way in
        assert refused(lambda: pb_grpc.MemPoolStub(channel).CacheReport(
            pb.CacheReportRequest(), timeout=10,
            metadata=(("authorization", "Bearer k"),))) == grpc.StatusCode.UNAUTHENTICATED


def test_without_a_configured_secret_nobody_gets_in(server):
    """No --cluster-secret: a random one, shown nowhere; an empty secret is no secret."""
    secret = server.server.cluster_secret
    assert secret.generated and len(secret.value) >= 32 and secret.value not in repr(secret)
    for metadata in (None, ((CLUSTER_SECRET_METADATA, ""),), WRONG):
        assert refused(lambda: match(server.internal_target, metadata)) in \
            (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert ClusterSecret("").generated and ClusterSecret.from_options(
        None, env={"PENSIEVE_CLUSTER_SECRET": "s"}).value == "s"


def test_transfer_only_to_configured_peers(replica):
    """A Transfer to an address not in --peer is refused before anything connects there (the
    secret would go with it)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.05)
    stranger = f"127.0.0.1:{listener.getsockname()[1]}"
    connected, done = threading.Event(), threading.Event()

    def watch():
        while not done.is_set():
            try:
                listener.accept()
                connected.set()
            except OSError:
                pass
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with grpc.insecure_channel(replica.target) as public:
            *_, last, _ = collect(pb_grpc.PensieveStub(public).Chat(pb.ChatRequest(
                messages=[user("hi")], sampling=sampling(GREEDY)), timeout=60,
                metadata=(("authorization", "Bearer k"),)))
        with grpc.insecure_channel(replica.internal_target, GRPC_OPTIONS) as channel:
            pool = pb_grpc.MemPoolStub(channel)
            for target in (stranger, replica.target, "localhost:1", "x" * 5000):
                with pytest.raises(grpc.RpcError) as e:
                    pool.Transfer(pb.TransferRequest(conversation_id=last.conversation_id,
                                                     target=target), timeout=10, metadata=RIGHT)
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "not a configured peer" in e.value.details()
                assert len(e.value.details()) < 300               # the target is clipped
    finally:
        done.set()
        watcher.join()
        listener.close()
    assert not connected.is_set()


def test_configured_peers(engine):
    options = InternalOptions(peers=("127.0.0.1:7001", "10.0.0.2:7001"))
    with BackgroundServer(engine, internal=options, cluster_secret=SECRET) as s:
        assert s.call(lambda: set(s.server.mempool.peers)) == set(options.peers)
        assert s.replica_address == f"{s.target},internal={s.internal_target}"


def test_replica_addresses():
    assert ReplicaAddress.parse("h:1") == ("h:1", None)
    assert ReplicaAddress.parse("h:1,internal=2") == ("h:1", "h:2")
    assert ReplicaAddress.parse("h:1, internal=g:3") == ("h:1", "g:3")
    assert str(ReplicaAddress.parse("h:1,internal=2")) == "h:1,internal=h:2"
    for bad in ("h", "h:1,internal=", "h:1,secret=3", "h:x"):
        with pytest.raises(ValueError):
            ReplicaAddress.parse(bad)


def test_a_replica_without_internal_address_is_routed_without_mempool():
    router = RouterService(["127.0.0.1:1", "127.0.0.1:2,internal=3"], "e2")
    stats = router.router_stats()["replicas"]
    assert [r["internal"] for r in stats] == [None, "127.0.0.1:3"]
    assert [router.cache.report_mode(r) for r in router.replicas] == \
        ["off", "off"]                       # no tokenizer: the tree is keyed on bytes
    from pensieve_jax.tokenizer import Tokenizer
    router = RouterService(["127.0.0.1:1", "127.0.0.1:2,internal=3"], "e2",
                           Tokenizer.byte_level(512))
    assert [router.cache.report_mode(r) for r in router.replicas] == \
        ["no internal address", "pending"]


@pytest.mark.slow          # two `pensieve serve` processes warm up: ~30 s on 2 cores
def test_a_subprocess_cluster_wires_keys_secret_and_peers(engine):
    """`pensieve cluster --subprocess`: the replica processes get the keys (a private file),
    the cluster secret (the environment) and each other as peers; a drained replica's
    conversation moves by transfer to the other process and continues exactly, as its owner's."""
    from serving.client import connect
    from serving.cluster import BackgroundCluster, ClusterConfig
    from serving.errors import UnauthenticatedError
    from .conftest import ENGINE_OPTIONS, MODEL
    config = ClusterConfig(MODEL, replicas=2, policy="affinity", subprocess=True,
                           engine_options=tuple(ENGINE_OPTIONS.items()), health_period_s=0.2,
                           cache_report_interval_s=0.1, kv_move="transfer", api_keys=("k",))
    with engine.session(system="Be brief.") as s:
        expected = [s.send(t, GREEDY).token_ids for t in ("One.", "Two.")]
    with BackgroundCluster(config) as cluster, \
            connect(cluster.target, timeout=120, api_key="k") as client:
        assert all(t.startswith("127.0.0.1:") for t in cluster.cluster.internal_targets)
        with connect(cluster.cluster.targets[0], timeout=30) as nobody:
            with pytest.raises(UnauthenticatedError):
                nobody.stats()
        chat = client.session(system="Be brief.")
        got = [chat.send("One.", GREEDY)]
        router = cluster.router
        home = cluster.call(lambda: router.conversations[chat.conversation_id].home)
        assert cluster.drain_replica(home) == 1
        got.append(chat.send("Two.", GREEDY))
        assert [r.token_ids for r in got] == expected
        assert got[1].usage.cached_tokens > 0
        modes = cluster.call(lambda: [router.cache.report_mode(r) for r in router.replicas])
        assert modes[1 - home] == "reporting"
