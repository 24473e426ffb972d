"""Warm-up: a server opens its port with gRPC health NOT_SERVING while its engine compiles its
programs (engine.warm_up() on a background thread), then reports SERVING; turns sent meanwhile
wait for it. A router routes nothing to a warming replica, and `pensieve cluster` is ready only
once every replica is SERVING. The warm-ups here are fakes held on an Event (no timing), except
the `pensieve serve` subprocess at the end, which warms up its real engine."""

import asyncio
import concurrent.futures
import dataclasses
import os
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import serving.server
from pensieve_jax.engine.engine import Engine, EngineConfig
from serving.cluster import BackgroundCluster, ClusterConfig
from serving.errors import NotReady
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.router import RouterServer
from serving.server import BackgroundServer
from .conftest import ENGINE_OPTIONS, GREEDY, MODEL, collect, engine_like, sampling, user, \
    wait_until
from .served import Served

SERVICES = ("", "pensieve.v1.Pensieve")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# engines the tests build compile lazily (the fakes stand in for their warm-up)
LAZY = {"precompile": False} if "precompile" in {f.name for f in
                                                 dataclasses.fields(EngineConfig)} else {}


class FakeWarmUp:
    """engine.warm_up stand-in: blocks until release() (or raises `error` then)."""

    def __init__(self, error: BaseException | None = None):
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)
        self.calls = 0
        self.error = error

    def __call__(self, *_):
        self.calls += 1
        self.entered.release()
        assert self.gate.wait(60), "the test never released the warm-up"
        if self.error is not None:
            raise self.error

    def wait_entered(self, n: int = 1) -> None:
        for _ in range(n):
            assert self.entered.acquire(timeout=60), "warm_up() was not called"

    def release(self) -> None:
        self.gate.set()


def health(target: str) -> dict[str, int]:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {s: stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=5).status
                for s in SERVICES}


@pytest.fixture
def lazy_engine(engine):
    e = engine_like(engine, **LAZY)
    yield e
    e.shutdown()


def test_not_serving_while_warming_turns_wait_then_serving(lazy_engine):
    fake = lazy_engine.warm_up = FakeWarmUp()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    with BackgroundServer(lazy_engine, warm_up=True) as server, \
            grpc.insecure_channel(server.target) as channel:
        fake.wait_entered()
        assert health(server.target) == dict.fromkeys(SERVICES, NOT_SERVING)
        assert not server.server.ready
        stub = pb_grpc.PensieveStub(channel)
        assert stub.GetStats(pb.GetStatsRequest(), timeout=10).model    # answers meanwhile
        with pytest.raises(grpc.RpcError) as bad:           # a bad request fails at once
            list(stub.Chat(pb.ChatRequest(), timeout=10))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        turn = pool.submit(lambda: collect(stub.Chat(pb.ChatRequest(
            messages=[user("are you warm?")], sampling=sampling(GREEDY)), timeout=60)))
        assert wait_until(lambda: server.call(lambda: server.service.active_streams) == 1)
        assert not turn.done()                              # waits behind the warm-up
        fake.release()
        server.wait_ready(timeout=30)
        assert server.server.ready and server.server.warm_s is not None
        assert health(server.target) == dict.fromkeys(SERVICES, SERVING)
        cid, _, ids, last, _ = turn.result(timeout=60)
        assert cid and last.finish_reason == "length" and len(ids) == GREEDY.max_tokens
    assert fake.calls == 1
    pool.shutdown()


def test_a_failed_warm_up_ends_turns_unavailable(lazy_engine):
    fake = lazy_engine.warm_up = FakeWarmUp(RuntimeError("no compiler today"))
    fake.release()
    with BackgroundServer(lazy_engine, warm_up=True) as server, \
            grpc.insecure_channel(server.target) as channel:
        with pytest.raises(NotReady, match="no compiler today"):
            server.wait_ready(timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.PensieveStub(channel).Generate(pb.GenerateRequest(
                text="hi", sampling=sampling(GREEDY)), timeout=30))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "failed to warm up" in info.value.details()
        assert health(server.target) == dict.fromkeys(SERVICES, NOT_SERVING)


def test_without_warm_up_it_serves_at_once(lazy_engine):
    with BackgroundServer(lazy_engine) as server:
        server.wait_ready(timeout=1)
        assert server.server.ready
        assert health(server.target) == dict.fromkeys(SERVICES, SERVING)


def test_the_router_routes_to_a_replica_only_once_it_is_serving(engine, lazy_engine):
    fake = lazy_engine.warm_up = FakeWarmUp()
    warm, cold = BackgroundServer(engine), BackgroundServer(lazy_engine, warm_up=True)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    router = RouterServer([warm.target, cold.target], "round-robin", health_period_s=0.05)
    try:
        fake.wait_entered()
        on_loop(router.start())
        replicas = router.service.replicas
        assert replicas[0].healthy and not replicas[1].healthy    # checked before it serves
        with grpc.insecure_channel(router.target) as channel:
            stub = pb_grpc.PensieveStub(channel)

            def turns(n):
                for k in range(n):
                    collect(stub.Generate(pb.GenerateRequest(
                        token_ids=pb.TokenIds(ids=[5, 6, 7 + k]), sampling=sampling(GREEDY)),
                        timeout=60))
            turns(3)
            assert (replicas[0].routed, replicas[1].routed) == (3, 0)
            assert not replicas[1].healthy
            fake.release()
            assert wait_until(lambda: replicas[1].healthy, timeout=30)
            turns(2)
            assert replicas[1].routed >= 1
    finally:
        fake.release()
        on_loop(router.shutdown(0.5))
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        cold.stop()
        warm.stop()


def test_the_cluster_is_ready_once_every_replica_is_serving(engine, monkeypatch):
    fake = FakeWarmUp()
    monkeypatch.setattr(Engine, "warm_up", fake, raising=False)
    real = serving.server.warm_up_later
    monkeypatch.setattr(serving.server, "warm_up_later", lambda options: (real(options)[0], True))
    config = ClusterConfig(MODEL, replicas=2, policy="round-robin",
                           engine_options=tuple(ENGINE_OPTIONS.items()), health_period_s=0.2)
    started: list = []
    thread = threading.Thread(target=lambda: started.append(
        BackgroundCluster(config, loaded_model=engine.model)))
    thread.start()
    try:
        fake.wait_entered()                    # the first replica warms up (then the others)
        assert thread.is_alive() and not started  # and the cluster waits for it
        fake.release()
        thread.join(60)
        cluster = started[0]
        assert fake.calls == 2 and all(s.ready for s in cluster.cluster.servers)
        assert all(r.healthy for r in cluster.router.replicas)
        assert health(cluster.target) == dict.fromkeys(SERVICES, SERVING)
        with grpc.insecure_channel(cluster.target) as channel:
            *_, last, _ = collect(pb_grpc.PensieveStub(channel).Chat(pb.ChatRequest(
                messages=[user("hello cluster")], sampling=sampling(GREEDY)), timeout=60))
        assert last.finish_reason == "length"
    finally:
        fake.release()
        thread.join(60)
        for c in started:
            c.stop()


@pytest.mark.slow
def test_pensieve_serve_opens_its_port_then_reaches_serving(tmp_path):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PENSIEVE_JAX_CACHE": str(tmp_path)}
    env.pop("PENSIEVE_JAX_PRECOMPILE", None)
    served = Served(env, start_s=120)
    lines = served.lines
    try:
        # a turn sent at once is served (after the warm-up, if it is still running)
        with grpc.insecure_channel(served.target) as channel:
            *_, last, _ = collect(pb_grpc.PensieveStub(channel).Generate(pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=sampling(GREEDY)), timeout=300))
        assert last.finish_reason == "length"
        assert wait_until(lambda: health(served.target) == dict.fromkeys(SERVICES, SERVING),
                          timeout=120), "".join(lines)
        if LAZY:             # the engine warms up: the log says when, with compile seconds
            assert served.announced(r"pensieve: (warm) after \d+\.\d s", timeout=30), \
                "".join(lines)
    finally:
        status = served.stop(timeout=60)
    assert status == 0, "".join(lines)
    assert any("stopped" in line for line in lines), "".join(lines)
