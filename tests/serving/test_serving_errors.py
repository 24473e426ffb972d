"""Every error path as a gRPC status code with a clear message; the server keeps working after."""

import time

import grpc
import pytest

from pensieve_jax.engine.errors import EngineOverloaded
from serving.client import connect
from serving.errors import ConversationNotFound, TurnInProgress
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.server import BackgroundServer

from .conftest import GREEDY, LONG, collect, sampling, settle, user

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def status_of(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def chat(stub, messages, conversation_id="", params=GREEDY, **kw):
    return list(stub.Chat(pb.ChatRequest(conversation_id=conversation_id, messages=messages,
                                         sampling=sampling(params)), **kw))


def start_conversation(stub, text="hello"):
    return collect(stub.Chat(pb.ChatRequest(messages=[user(text)], sampling=sampling(GREEDY))))


@pytest.mark.parametrize("messages,match", [
    ([], "no messages"),
    ([pb.Message(role="wizard", content="hi"), user("hi")], "unknown role 'wizard'"),
    ([user("hi"), pb.Message(role="assistant", content="hello")], "must end with a user message"),
    ([user("   ")], "empty"),
    ([user("x" * 1100)], "max_model_len is 1024"),
])
def test_bad_chat_messages_are_invalid_argument(stub, messages, match):
    code, details = status_of(lambda: chat(stub, messages))
    assert code == INVALID and match in details


@pytest.mark.parametrize("params,match", [
    (pb.SamplingParams(max_tokens=0), "max_tokens"),
    (pb.SamplingParams(temperature=-1.0), "temperature"),
    (pb.SamplingParams(top_p=1.5), "top_p"),
    (pb.SamplingParams(stop=[""]), "stop"),
])
def test_bad_sampling_values_are_invalid_argument(stub, params, match):
    request = pb.ChatRequest(messages=[user("hi")], sampling=params)
    code, details = status_of(lambda: list(stub.Chat(request)))
    assert code == INVALID and match in details
    gen = pb.GenerateRequest(text="hi", sampling=params)
    code, details = status_of(lambda: list(stub.Generate(gen)))
    assert code == INVALID and match in details


@pytest.mark.parametrize("request_,match", [
    (pb.GenerateRequest(), "no prompt"),
    (pb.GenerateRequest(token_ids=pb.TokenIds()), "empty"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 100000])), "out of range"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 1024)), "max_model_len"),
])
def test_bad_generate_prompts_are_invalid_argument(stub, request_, match):
    code, details = status_of(lambda: list(stub.Generate(request_)))
    assert code == INVALID and match in details


def test_a_bad_turn_in_a_conversation_keeps_it_usable(stub):
    cid, *_ = start_conversation(stub)
    code, details = status_of(lambda: chat(stub, [pb.Message(role="robot", content="x"),
                                                  user("y")], cid))
    assert code == INVALID and "unknown role" in details
    *_, last, _ = collect(stub.Chat(pb.ChatRequest(conversation_id=cid, messages=[user("next")],
                                                   sampling=sampling(GREEDY))))
    assert last.usage.cached_tokens > 0


def test_a_turn_naming_another_cache_salt_is_invalid_and_the_conversation_goes_on(stub):
    """A conversation keeps the salt it began with (as through the router): the same salt or
    none continues it, another is refused without touching its cache."""
    first = collect(stub.Chat(pb.ChatRequest(messages=[user("hello")], sampling=sampling(GREEDY),
                                             cache_salt="tenant-a")))
    cid = first[0]
    for salt in ("tenant-b", "tenant-zz"):
        code, details = status_of(lambda: list(stub.Chat(pb.ChatRequest(
            conversation_id=cid, messages=[user("next")], sampling=sampling(GREEDY),
            cache_salt=salt))))
        assert code == INVALID and "cache_salt does not match" in details and salt not in details
    for salt in ("tenant-a", ""):
        *_, last, _ = collect(stub.Chat(pb.ChatRequest(
            conversation_id=cid, messages=[user("more")], sampling=sampling(GREEDY),
            cache_salt=salt)))
        assert last.usage.cached_tokens > 0


def test_unknown_and_ended_conversations_are_not_found(stub):
    code, details = status_of(lambda: chat(stub, [user("hi")], "no-such-conversation"))
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-conversation" in details
    code, _ = status_of(lambda: stub.EndConversation(
        pb.EndConversationRequest(conversation_id="no-such-conversation")))
    assert code == grpc.StatusCode.NOT_FOUND
    cid, *_ = start_conversation(stub)
    stub.EndConversation(pb.EndConversationRequest(conversation_id=cid))
    code, _ = status_of(lambda: chat(stub, [user("again")], cid))
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = status_of(lambda: stub.EndConversation(pb.EndConversationRequest()))
    assert code == INVALID and "conversation_id" in details


def test_second_turn_while_one_runs_is_failed_precondition(stub, engine):
    cid, *_ = start_conversation(stub)
    running = stub.Chat(pb.ChatRequest(conversation_id=cid, messages=[user("long one")],
                                       sampling=sampling(LONG)))
    assert next(running).conversation_id == cid          # accepted: the turn is queued
    code, details = status_of(lambda: chat(stub, [user("too soon")], cid))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "turn in progress" in details
    running.cancel()
    settle(engine)
    *_, last, _ = collect(stub.Chat(pb.ChatRequest(conversation_id=cid, messages=[user("now")],
                                                   sampling=sampling(GREEDY))))
    assert last.finish_reason == "length"


def test_full_admission_queue_is_resource_exhausted(limited_engine):
    with BackgroundServer(limited_engine) as server, grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.PensieveStub(ch)
        first = stub.Chat(pb.ChatRequest(messages=[user("take the slot")], sampling=sampling(LONG)))
        next(first)
        code, details = status_of(lambda: chat(stub, [user("no room")]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queued_requests" in details
        code, _ = status_of(lambda: list(stub.Generate(pb.GenerateRequest(text="no room"))))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with connect(server.target) as client, pytest.raises(EngineOverloaded):
            client.session().send("no room either", GREEDY)
        first.cancel()
        settle(limited_engine)
        assert len(chat(stub, [user("room again")])) > 1


def test_deadline_exceeded_cancels_the_turn_and_keeps_its_tokens(stub, engine):
    cid, _, ids0, last0, _ = start_conversation(stub)
    seen = []
    with pytest.raises(grpc.RpcError) as info:
        for m in stub.Chat(pb.ChatRequest(conversation_id=cid, messages=[user("go on and on")],
                                          sampling=sampling(LONG)), timeout=0.5):
            seen.extend(m.token_ids)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    start = time.monotonic()
    stats = settle(engine)
    assert stats["running"] == stats["waiting"] == 0 and time.monotonic() - start < 2
    # the next turn continues after the cut-off reply: its history is cached
    *_, last, _ = collect(stub.Chat(pb.ChatRequest(conversation_id=cid, messages=[user("next")],
                                                   sampling=sampling(GREEDY))))
    prev_total = last0.usage.prompt_tokens + last0.usage.completion_tokens
    assert last.usage.cached_tokens > prev_total + len(seen) // 2


def test_client_library_raises_the_in_process_exception_types(server, engine):
    with connect(server.target) as client:
        s = client.session()
        with pytest.raises(ValueError, match="temperature"):
            s.send("hi", _bad_params())
        with pytest.raises(ValueError, match="max_model_len"):
            s.send("x" * 1100)
        s.send("hello", GREEDY)
        s.close()
        ghost = client.session()
        ghost.conversation_id = "never-was"
        with pytest.raises(ConversationNotFound):
            ghost.send("hi", GREEDY)
        assert client.end_conversation("never-was") is False
        busy = client.session()
        busy.send("first", GREEDY)
        pieces = busy.stream("long", LONG)
        next(pieces)
        twin = client.session()
        twin.conversation_id = busy.conversation_id
        with pytest.raises(TurnInProgress):
            twin.send("clash", GREEDY)
        pieces.close()
        assert busy.last_reply.finish_reason == "abort"
        with pytest.raises(TimeoutError), connect(server.target, timeout=0.3) as hasty:
            hasty.session().send("slow", LONG)
    settle(engine)


def test_a_remote_session_resumes_a_forgotten_conversation_from_its_history(server, engine):
    """The server forgot the conversation (ended elsewhere, expired, or a router let it go): the
    session sends the turn again with its whole history as a new conversation, and the reply
    is the one the same history gives on a fresh session. Without resume it raises."""
    with connect(server.target) as client:
        s = client.session(system="Be brief.", resume=True)
        s.send("hello", GREEDY)
        history = list(s.history)
        old_id = s.conversation_id
        assert client.end_conversation(old_id)
        got = s.send("and then?", GREEDY)
        assert s.conversation_id not in (None, old_id)
        with engine.session(history=history) as fresh:
            want = fresh.send("and then?", GREEDY)
        assert got.token_ids == want.token_ids
        assert s.history == history + [{"role": "user", "content": "and then?"},
                                       {"role": "assistant", "content": got.text}]
        strict = client.session()
        strict.send("hello", GREEDY)
        assert client.end_conversation(strict.conversation_id)
        with pytest.raises(ConversationNotFound):
            strict.send("again", GREEDY)
        s.close()
    settle(engine)


def _bad_params():
    """SamplingParams validates on construction; bypass it to send a bad value over the wire."""
    p = object.__new__(type(GREEDY))
    for k, v in vars(GREEDY).items():
        object.__setattr__(p, k, v)
    object.__setattr__(p, "temperature", -1.0)
    return p
