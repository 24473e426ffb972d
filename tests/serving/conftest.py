"""Shared fixtures: one random:tiny engine and an in-process gRPC server over it (loopback).

Shapes are kept to few compile buckets (page_size 256, so a sequence of max_model_len 1024 always
fits the minimum page bucket; max_batched_tokens 32, max_num_seqs 8) so the tests stay fast.
max_model_len is large so that a LONG turn runs for seconds, for cancellation and deadlines.
"""

import threading
import time

import grpc
import pytest

from pensieve_jax.engine.engine import Engine, EngineConfig
from pensieve_jax.engine.sampling import SamplingParams
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.server import BackgroundServer

MODEL = "random:tiny"
ENGINE_OPTIONS = dict(max_model_len=1024, page_size=256, num_pages=64, max_batched_tokens=32,
                      max_num_seqs=8)
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
LONG = SamplingParams(max_tokens=900, ignore_eos=True)      # a turn that runs for a while


@pytest.fixture(scope="session")
def engine():
    e = Engine.from_pretrained(MODEL, **ENGINE_OPTIONS)
    yield e
    e.shutdown()


def engine_like(engine, **options) -> Engine:
    """Another engine on the same loaded weights, with other options."""
    return Engine(engine.model, "float32", EngineConfig(**{**ENGINE_OPTIONS, **options}))


@pytest.fixture(scope="session")
def limited_engine(engine):
    """Admission limit 1 and a conversation TTL of 1 s."""
    e = engine_like(engine, max_queued_requests=1, conversation_ttl_s=1.0)
    yield e
    e.shutdown()


@pytest.fixture(scope="session")
def server(engine):
    with BackgroundServer(engine) as s:
        yield s


@pytest.fixture(scope="session")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


@pytest.fixture(scope="session")
def stub(channel):
    return pb_grpc.PensieveStub(channel)


def settle(engine, timeout=20.0):
    """Wait until the engine has nothing in flight; returns its stats."""
    deadline = time.monotonic() + timeout
    while ((s := engine.stats())["running"] or s["waiting"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return s


def sampling(params: SamplingParams) -> pb.SamplingParams:
    from serving.protocol import sampling_to_proto
    return sampling_to_proto(params)


def user(text: str) -> pb.Message:
    return pb.Message(role="user", content=text)


def collect(responses):
    """(conversation_id, text, token_ids, last message) of a finished Chat/Generate stream."""
    messages = list(responses)
    return (messages[-1].conversation_id, "".join(m.text for m in messages),
            [t for m in messages for t in m.token_ids], messages[-1], messages)


def wait_until(predicate, timeout=5.0):
    """predicate()'s first truthy value within timeout seconds, else its last value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            return value
        time.sleep(0.01)
    return value


def stream_in_background(session, text, params, timeout=30.0):
    """Stream a turn of `session` on a thread: (the pieces so far, the thread), once the first
    piece has arrived."""
    pieces, started = [], threading.Event()

    def run():
        for piece in session.stream(text, params):
            pieces.append(piece)
            started.set()
    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(timeout)
    return pieces, thread
