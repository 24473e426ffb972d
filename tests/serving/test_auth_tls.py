"""Authentication and TLS through the real gRPC server (issue 20): API keys on every call but
gRPC health, the transport's cap on a request's size, TLS round trips, and a router (a cluster)
that checks keys itself and passes each caller's key on to its replicas, so a conversation
belongs to its caller everywhere."""

import json
import os
import pathlib
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.auth import ApiKeys, bearer_metadata
from serving.client import connect
from serving.cluster import BackgroundCluster, ClusterConfig
from serving.errors import NotFound, Unavailable, UnauthenticatedError
from serving.limits import Limits
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.server import BackgroundServer
from serving.tls import ServerTls
from .conftest import ENGINE_OPTIONS, GREEDY, MODEL, collect, sampling, user

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEYS = ("key-alice", "key-bob")
ALICE, BOB = bearer_metadata(KEYS[0]), bearer_metadata(KEYS[1])
WRONG = bearer_metadata("key-mallory")


def make_certificate(directory) -> ServerTls:
    """A self-signed certificate for 127.0.0.1 and localhost (openssl), and its key."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return ServerTls(str(cert), str(key))


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> ServerTls:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def keyed(engine):
    """A server that takes only KEYS, and requests of at most 64 KiB."""
    with BackgroundServer(engine, api_keys=ApiKeys(KEYS),
                          limits=Limits(max_request_bytes=64 << 10)) as s:
        yield s


def rpcs(stub, reflection):
    """Each kind of call once: Chat, Generate (streams), EndConversation, GetStats (unary),
    server reflection (a bidirectional stream)."""
    return {
        "Chat": lambda md: collect(stub.Chat(pb.ChatRequest(
            messages=[user("hi")], sampling=sampling(GREEDY)), timeout=30, metadata=md)),
        "Generate": lambda md: collect(stub.Generate(pb.GenerateRequest(
            text="hi", sampling=sampling(GREEDY)), timeout=30, metadata=md)),
        "EndConversation": lambda md: stub.EndConversation(
            pb.EndConversationRequest(conversation_id="chat-nope"), timeout=30, metadata=md),
        "GetStats": lambda md: stub.GetStats(pb.GetStatsRequest(), timeout=30, metadata=md),
        "reflection": lambda md: list(reflection.ServerReflectionInfo(iter(
            [reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30,
            metadata=md)),
    }


def code_of(call, metadata) -> grpc.StatusCode:
    try:
        call(metadata)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", ["Chat", pytest.param("Generate", marks=pytest.mark.slow),
                                    "EndConversation", "GetStats", "reflection"])
def test_every_call_needs_a_key(keyed, method):
    with grpc.insecure_channel(keyed.target) as channel:
        call = rpcs(pb_grpc.PensieveStub(channel),
                    reflection_pb2_grpc.ServerReflectionStub(channel))[method]
        for metadata in (None, WRONG, (("authorization", KEYS[0]),),       # no "Bearer"
                         (("authorization", "Bearer "),)):
            assert code_of(call, metadata) == grpc.StatusCode.UNAUTHENTICATED, metadata
        right = code_of(call, ALICE)
        assert right == (grpc.StatusCode.NOT_FOUND if method == "EndConversation"
                         else grpc.StatusCode.OK)


def test_the_key_is_checked_before_the_request_is_read(keyed):
    """Unauthenticated garbage is refused UNAUTHENTICATED, not INVALID_ARGUMENT."""
    with grpc.insecure_channel(keyed.target) as channel:
        raw = channel.unary_stream("/pensieve.v1.Pensieve/Chat")
        with pytest.raises(grpc.RpcError) as e:
            list(raw(b"\xff\xfe not a protobuf", timeout=30))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_key(keyed):
    with grpc.insecure_channel(keyed.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="pensieve.v1.Pensieve"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_client_sends_its_key(keyed):
    with connect(keyed.target, timeout=60, api_key=KEYS[1]) as client:
        chat = client.session()
        assert len(chat.send("hello", GREEDY).token_ids) == GREEDY.max_tokens
        assert client.stats()["running"] == 0
        chat.close()
    with connect(keyed.target, timeout=60, api_key="key-mallory") as client:
        with pytest.raises(UnauthenticatedError):
            client.session().send("hello", GREEDY)


def test_a_message_over_the_cap_is_refused_before_it_is_parsed(keyed, server):
    """64 KiB cap: a 100 KB message is RESOURCE_EXHAUSTED at once; so is a 5 MB one on a server
    with the default cap (4 MiB), however long its text would take to tokenize."""
    for target, metadata, size in ((keyed.target, ALICE, 100_000),
                                   (server.target, None, 5_000_000)):
        with grpc.insecure_channel(target) as channel:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                collect(pb_grpc.PensieveStub(channel).Chat(pb.ChatRequest(
                    messages=[user("x" * size)], sampling=sampling(GREEDY)), timeout=30,
                    metadata=metadata))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() - start < 2.0
    assert keyed.service.active_streams == 0


# -- TLS -----------------------------------------------------------------------------------------

def test_tls_round_trip(engine, tls):
    with BackgroundServer(engine, tls=tls, api_keys=ApiKeys(KEYS)) as s:
        with connect(s.target, timeout=60, api_key=KEYS[0], tls_ca=tls.cert_file) as client:
            chat = client.session()
            assert len(chat.send("hello over TLS", GREEDY).token_ids) == GREEDY.max_tokens
            chat.close()
        with open(tls.cert_file, "rb") as f:        # the CA as bytes
            with connect(s.target, timeout=10, api_key=KEYS[0], tls_ca=f.read()) as client:
                assert "running" in client.stats()
        # a plaintext client cannot talk to it
        with connect(s.target, timeout=5, api_key=KEYS[0]) as client:
            with pytest.raises(Unavailable):
                client.stats()


def test_a_tls_client_refuses_a_plaintext_server(server, tls):
    with connect(server.target, timeout=5, tls_ca=tls.cert_file) as client:
        with pytest.raises(Unavailable):
            client.stats()


def test_tls_options_go_together(tls):
    assert ServerTls.from_options(None, None) is None
    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        ServerTls.from_options(tls.cert_file, None)
    with pytest.raises(ValueError, match="tls_key: no such file"):
        ServerTls.from_options(tls.cert_file, "/nonexistent/key.pem")
    with pytest.raises(ValueError, match="tls_cert: not a PEM file"):
        ServerTls.from_options(__file__, tls.key_file)


# -- a router (cluster) with keys ----------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_cluster(engine, tls):
    config = ClusterConfig(MODEL, replicas=2, policy="round-robin",
                           engine_options=tuple(ENGINE_OPTIONS.items()), health_period_s=0.2,
                           kv_move="transfer", api_keys=KEYS, tls=tls)
    with BackgroundCluster(config, loaded_model=engine.model) as cluster:
        yield cluster


def test_the_router_checks_keys_and_conversations_keep_their_owner(keyed_cluster, tls):
    target = keyed_cluster.target
    with connect(target, timeout=30, tls_ca=tls.cert_file) as nobody:
        with pytest.raises(UnauthenticatedError):
            nobody.session().send("hi", GREEDY)
    with connect(target, timeout=60, api_key=KEYS[0], tls_ca=tls.cert_file) as alice, \
            connect(target, timeout=60, api_key=KEYS[1], tls_ca=tls.cert_file) as bob:
        chat = alice.session(system="Be brief.")
        first = chat.send("Hello there", GREEDY)
        assert len(first.token_ids) == GREEDY.max_tokens
        cid = chat.conversation_id
        # bob cannot continue or end alice's conversation: as if it did not exist
        stolen = bob.session()
        stolen.conversation_id = cid
        stolen.history = list(chat.history)
        with pytest.raises(NotFound):
            stolen.send("me too", GREEDY)
        assert not bob.end_conversation(cid)
        # round-robin: turn 2 runs on the other replica, with alice's key passed on
        assert len(chat.send("And then?", GREEDY).token_ids) == GREEDY.max_tokens
        conv = keyed_cluster.call(lambda: keyed_cluster.router.conversations[cid])
        assert len(conv.cids) == 2 and conv.owner and conv.caller.auth == ALICE
        gen = alice.generate("Once upon", GREEDY)
        assert not bob.end_conversation(gen.conversation_id)
        assert alice.end_conversation(gen.conversation_id)
        assert alice.end_conversation(cid)
        # the router's port caps a request's size too (4 MiB by default)
        with pytest.raises(grpc.RpcError) as e:
            list(alice.stub.Chat(pb.ChatRequest(messages=[user("x" * 5_000_000)]), timeout=30,
                                 metadata=ALICE))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_replicas_behind_a_keyed_router_take_keys_and_loopback_only(keyed_cluster):
    """The router's replicas want the same keys (the router passes its caller's on) and listen
    on loopback; their conversations belong to the caller who started them there."""
    cluster = keyed_cluster.cluster
    assert all(t.startswith("127.0.0.1:") for t in cluster.targets + cluster.internal_targets)
    with connect(cluster.targets[0], timeout=30) as nobody:
        with pytest.raises(UnauthenticatedError):
            nobody.stats()
    with connect(keyed_cluster.target, timeout=60, api_key=KEYS[0],
                 tls_ca=keyed_cluster.cluster.config.tls.cert_file) as alice:
        chat = alice.session()
        chat.send("whose is this?", GREEDY)
        conv = keyed_cluster.call(lambda: keyed_cluster.router.conversations[
            chat.conversation_id])
        (index, replica_cid), = conv.cids.items()
    with connect(cluster.targets[index], timeout=30, api_key=KEYS[1]) as bob:
        assert not bob.end_conversation(replica_cid)        # alice's there too (issue 20)
    with connect(cluster.targets[index], timeout=30, api_key=KEYS[0]) as direct:
        assert direct.end_conversation(replica_cid)


def test_a_conversation_moved_by_transfer_keeps_its_owner(engine):
    """Draining a replica moves alice's conversation by MemPool transfer; the copy the other
    replica adopts is alice's: her next turn continues it from the moved KV."""
    config = ClusterConfig(MODEL, replicas=2, policy="affinity",
                           engine_options=tuple(ENGINE_OPTIONS.items()), health_period_s=0.2,
                           kv_move="transfer", api_keys=KEYS)
    with BackgroundCluster(config, loaded_model=engine.model) as cluster, \
            connect(cluster.target, timeout=60, api_key=KEYS[0]) as alice:
        with engine.session(system="Be brief.") as s:
            expected = [s.send(t, GREEDY).token_ids for t in ("One.", "Two.")]
        chat = alice.session(system="Be brief.")
        got = [chat.send("One.", GREEDY)]
        home = cluster.call(lambda: cluster.router.conversations[chat.conversation_id].home)
        assert cluster.drain_replica(home) == 1
        got.append(chat.send("Two.", GREEDY))
        assert [r.token_ids for r in got] == expected
        assert got[1].usage.cached_tokens > 0          # from the moved KV, not recomputed


# -- `pensieve serve` with keys, TLS and the HTTP API --------------------------------------------

def serve_process(tmp_path, *extra):
    """A `python -m serving serve` process and the addresses it printed, once it serves."""
    options = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE_OPTIONS.items()]
    env = {k: v for k, v in os.environ.items() if k != "PENSIEVE_API_KEY"}
    env.update(PYTHONIOENCODING="utf-8", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.Popen([sys.executable, "-m", "serving", "serve", "--model", MODEL,
                             "--port", "0", *options, *extra], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines, found = [], {}
    for line in proc.stdout:
        lines.append(line)
        for name, pattern in (("internal", r"internal services on (\S+)"),
                              ("grpc", r"serving \S+ on (\S+)"),
                              ("http", r"OpenAI API on (\S+)")):
            if m := re.search(pattern, line):
                found[name] = m.group(1)
        if "grpc" in found and ("http" in found or "--http-port" not in extra):
            return proc, found
    proc.wait()
    raise RuntimeError("the server did not start:\n" + "".join(lines))


def stop_process(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow          # ~50 s on 2 CPU cores: the server warms up, two chat processes
def test_pensieve_serve_and_chat_with_a_key_over_tls(engine, tls, tmp_path):
    proc, found = serve_process(tmp_path, "--api-key", "k1", "--tls-cert", tls.cert_file,
                                "--tls-key", tls.key_file)
    try:
        assert found["internal"].startswith("127.0.0.1:") and found["internal"] != found["grpc"]

        def chat(*extra):
            return subprocess.run([sys.executable, "-m", "serving", "chat", "--target",
                                   found["grpc"], "--max-tokens", "8", "--tls-ca", tls.cert_file,
                                   *extra], input="hi\n", capture_output=True, text=True,
                                  cwd=ROOT, timeout=60,
                                  env={**os.environ, "PYTHONIOENCODING": "utf-8"})
        done = chat("--api-key", "k1")
        assert done.returncode == 0, done.stderr
        with engine.session() as local:
            assert done.stdout == local.send("hi", type(GREEDY)(max_tokens=8)).text + "\n"
        denied = chat("--api-key", "nope")
        assert "UNAUTHENTICATED" in denied.stderr and denied.stdout.strip() == ""
    finally:
        assert stop_process(proc) == 0


@pytest.mark.slow
def test_pensieve_serve_http_api_with_a_key_over_tls(tls, tmp_path):
    proc, found = serve_process(tmp_path, "--api-key", "k1", "--tls-cert", tls.cert_file,
                                "--tls-key", tls.key_file, "--http-port", "0",
                                "--served-model-name", "tiny-test")
    try:
        assert found["http"].startswith("https://127.0.0.1:") and found["http"].endswith("/v1")
        context = ssl.create_default_context(cafile=tls.cert_file)

        def models(key):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            request = urllib.request.Request(found["http"] + "/models", headers=headers)
            try:
                with urllib.request.urlopen(request, context=context, timeout=30) as reply:
                    return reply.status, json.loads(reply.read())
            except urllib.error.HTTPError as e:
                return e.code, None
        status, body = models("k1")
        assert status == 200 and [m["id"] for m in body["data"]] == ["tiny-test"]
        assert models(None)[0] == 401 and models("nope")[0] == 401
    finally:
        assert stop_process(proc) == 0
