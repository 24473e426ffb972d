"""End to end: `python -m serving serve` as a subprocess on a free loopback port, driven through
the generated stubs (and `python -m serving chat`), against the in-process engine."""

import json
import os
import signal
import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc

from .conftest import GREEDY, LONG, MODEL, collect, sampling, user
from .served import ROOT, Served

SYSTEM = "You are a test."
TEXTS = ["hello there", "tell me more", "and finally?"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The subprocesses share a JAX compilation cache, so a second server compiles less."""
    cache = tmp_path_factory.mktemp("jax-cache")
    return {**os.environ, "PYTHONIOENCODING": "utf-8", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def served(env):
    s = Served(env, "--metrics-port", "0")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served.target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield pb_grpc.PensieveStub(channel)


def test_three_turn_conversation_streams_reuses_the_cache_and_matches_in_process(stub, engine):
    local = engine.session(system=SYSTEM)
    cid, previous = "", None
    for k, text in enumerate(TEXTS):
        messages = ([pb.Message(role="system", content=SYSTEM)] if k == 0 else []) + [user(text)]
        responses = list(stub.Chat(pb.ChatRequest(conversation_id=cid, messages=messages,
                                                  sampling=sampling(GREEDY))))
        # order: accepted (id, no text), the pieces, then one last message with the usage
        first, *pieces, last = responses
        assert first.conversation_id and not first.text and not first.finish_reason
        cid = first.conversation_id
        assert all(r.conversation_id == cid for r in responses)
        assert not any(r.finish_reason or r.HasField("usage") for r in [first, *pieces])
        assert last.finish_reason == "length" and last.HasField("usage")
        text_out = "".join(r.text for r in responses)
        ids = [t for r in responses for t in r.token_ids]
        u = last.usage
        assert u.completion_tokens == len(ids) == GREEDY.max_tokens
        assert u.prompt_tokens == u.cached_tokens + u.prefilled_tokens + u.recomputed_tokens
        assert 0 < u.ttft_s <= u.total_s
        if previous is None:
            assert u.cached_tokens == 0
        else:       # the whole history is cached: only the new turn is prefilled
            assert u.cached_tokens == previous.prompt_tokens + previous.completion_tokens
            assert u.recomputed_tokens == 0
        previous = u
        reply = local.send(text, GREEDY)
        assert (text_out, ids) == (reply.text, list(reply.token_ids))
        assert u.prompt_tokens == reply.usage.prompt_tokens
    local.close()
    stub.EndConversation(pb.EndConversationRequest(conversation_id=cid))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Chat(pb.ChatRequest(conversation_id=cid, messages=[user("gone?")])))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_generate_reuses_the_longest_cached_prefix(stub, engine):
    prompt = list(range(100, 130))
    cid, _, ids, last, _ = collect(stub.Generate(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt), sampling=sampling(GREEDY))))
    assert ids == engine.generate(prompt, GREEDY) and last.usage.cached_tokens == 0
    follow = prompt + ids + [1, 2, 3]
    cid2, _, ids2, last2, _ = collect(stub.Generate(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=follow), sampling=sampling(GREEDY))))
    assert cid2 == cid and last2.usage.cached_tokens == len(prompt) + len(ids)
    assert ids2 == engine.generate(follow, GREEDY)
    _, text, ids3, _, _ = collect(stub.Generate(pb.GenerateRequest(
        text="raw text, no template", sampling=sampling(GREEDY))))
    raw = engine.generate(engine.tokenizer.encode("raw text, no template"), GREEDY)
    assert ids3 == raw and text == engine.tokenizer.decode(raw, skip_special_tokens=True)


def test_stats_health_and_reflection(served, stub):
    stats = stub.GetStats(pb.GetStatsRequest())
    full = json.loads(stats.stats_json)
    assert stats.model == MODEL and stats.pages_total == full["pages"]["device"]["total"]
    assert stats.hit_tokens == full["hit_tokens"] > 0 and full["max_model_len"] == 1024
    with grpc.insecure_channel(served.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "pensieve.v1.Pensieve"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(reflect.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="pensieve.v1.Pensieve"),
        ])))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"pensieve.v1.Pensieve", "grpc.health.v1.Health"} <= names
        assert answers[1].file_descriptor_response.file_descriptor_proto


def test_prometheus_metrics(served, stub):
    collect(stub.Chat(pb.ChatRequest(messages=[user("count me")], sampling=sampling(GREEDY))))
    with pytest.raises(grpc.RpcError):
        list(stub.Chat(pb.ChatRequest()))
    body = urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics",
                                  timeout=10).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body) for s in family.samples}
    assert samples[("pensieve_requests_total", (("code", "OK"), ("method", "Chat")))] >= 1
    assert samples[("pensieve_requests_total",
                    (("code", "INVALID_ARGUMENT"), ("method", "Chat")))] >= 1
    assert samples[("pensieve_tokens_total", (("kind", "completion"),))] >= GREEDY.max_tokens
    assert samples[("pensieve_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("pensieve_time_per_output_token_seconds_count", ())] >= 1
    assert samples[("pensieve_kv_pages", (("state", "used"), ("tier", "device")))] >= 0
    assert ("pensieve_cache_hit_tokens_total", (("tier", "device"),)) in samples
    assert samples[("pensieve_active_streams", ())] == 0


def test_chat_command_streams_replies(served, engine):
    params = type(GREEDY)(max_tokens=8)
    done = subprocess.run([sys.executable, "-m", "serving", "chat", "--target", served.target,
                           "--max-tokens", "8", "--system", SYSTEM],
                          input="hi\nwhat next?\n".encode(), capture_output=True, cwd=ROOT,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"}, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    with engine.session(system=SYSTEM) as local:
        want = "".join(local.send(t, params).text + "\n" for t in ("hi", "what next?"))
    assert done.stdout.decode() == want


def test_sigterm_finishes_streams_and_exits_cleanly(env):
    served = Served(env, "--grace", "0.3")
    with grpc.insecure_channel(served.target) as channel:
        call = pb_grpc.PensieveStub(channel).Chat(pb.ChatRequest(
            messages=[user("go on forever")], sampling=sampling(LONG)))
        next(call), next(call)
        served.proc.send_signal(signal.SIGTERM)
        rest = list(call)                    # status OK: the stream ends with its last message
        assert rest[-1].finish_reason == "abort"
    assert served.stop(signal_it=False) == 0
    assert any("stopped" in line for line in served.lines), "".join(served.lines)
