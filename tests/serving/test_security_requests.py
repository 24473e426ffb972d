"""Per-request robustness through the real gRPC server (issue 20): conversations belong to the
API key that created them; ids are unguessable; every field is validated before any expensive
work; an engine fault fails only its request; a cut-off turn's history holds exactly what the
client was sent; max_conversations caps what is kept; errors echo little of the input;
Generate runs chat messages."""

import re
import threading
import time

import grpc
import numpy as np
import pytest

from pensieve_jax.engine.sampling import SamplingParams
from serving.auth import ApiKeys, bearer_metadata
from serving.limits import Limits
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.server import BackgroundServer

from .conftest import GREEDY, LONG, collect, sampling, settle, user, wait_until

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
A, B = bearer_metadata("key-a"), bearer_metadata("key-b")


def status_of(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def chat(stub, messages, conversation_id="", params=GREEDY, **kw):
    return collect(stub.Chat(pb.ChatRequest(conversation_id=conversation_id, messages=messages,
                                            sampling=sampling(params)), **kw))


def generate_ids(stub, ids, params=GREEDY, **kw):
    return collect(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                                                    sampling=sampling(params)), **kw))


def end(stub, cid, **kw):
    return stub.EndConversation(pb.EndConversationRequest(conversation_id=cid), **kw)


@pytest.fixture(scope="module")
def keyed(engine):
    with BackgroundServer(engine, api_keys=ApiKeys(["key-a", "key-b"])) as server, \
            grpc.insecure_channel(server.target) as ch:
        yield server, pb_grpc.PensieveStub(ch)


# -- owners and ids ---------------------------------------------------------------------------

def test_a_chat_conversation_belongs_to_the_key_that_created_it(keyed):
    _, stub = keyed
    cid = chat(stub, [user("mine")], metadata=A)[0]
    code, foreign = status_of(lambda: chat(stub, [user("hi")], cid, metadata=B))
    ghost = "session-" + "0" * 32
    _, missing = status_of(lambda: chat(stub, [user("hi")], ghost, metadata=B))
    assert code == NOT_FOUND and foreign.replace(cid, "ID") == missing.replace(ghost, "ID")
    assert status_of(lambda: end(stub, cid, metadata=B))[0] == NOT_FOUND
    assert status_of(lambda: chat(stub, [user("hi")], cid))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert chat(stub, [user("still mine")], cid, metadata=A)[3].usage.cached_tokens > 0
    end(stub, cid, metadata=A)
    assert status_of(lambda: end(stub, cid, metadata=A))[0] == NOT_FOUND


def test_a_generate_conversation_belongs_to_the_key_that_ran_it(keyed):
    _, stub = keyed
    cid = generate_ids(stub, [5, 6, 7, 8], metadata=A)[0]
    assert cid
    assert status_of(lambda: end(stub, cid, metadata=B))[0] == NOT_FOUND
    end(stub, cid, metadata=A)
    assert status_of(lambda: end(stub, cid, metadata=A))[0] == NOT_FOUND


def test_one_keys_cached_prompt_never_hits_for_another_key(keyed):
    """With keys, each owner's prompts are cached under its own salt (serving.auth.scoped_salt):
    cached_tokens tells another tenant nothing, while the owner itself still hits."""
    _, stub = keyed
    prompt = list(range(40, 40 + 70))
    first = generate_ids(stub, prompt, metadata=A)
    again = generate_ids(stub, prompt + [3], metadata=A)
    other = generate_ids(stub, prompt + [3], metadata=B)
    assert again[3].usage.cached_tokens > 0
    assert other[3].usage.cached_tokens == 0
    for cid, key in {(first[0], A[0]), (again[0], A[0]), (other[0], B[0])}:
        try:                  # the second turn may have adopted the first's conversation
            end(stub, cid, metadata=(key,))
        except grpc.RpcError as e:
            assert e.code() == NOT_FOUND


def random_part(cid: str) -> str:
    return re.sub(r"^[a-z]+-", "", cid)


def test_chat_ids_are_unguessable(stub):
    ids = [chat(stub, [user(f"id {i}")])[0] for i in range(3)]
    assert len(set(ids)) == 3
    assert all(re.fullmatch(r"[0-9a-f]{32}", random_part(c)) for c in ids)   # 128 bits


def test_generate_ids_are_unguessable(stub):
    ids = [generate_ids(stub, [9, 10 + i, 11])[0] for i in range(3)]
    assert all(len(random_part(c)) >= 24 for c in ids)


# -- validation -------------------------------------------------------------------------------

BAD_SAMPLING = [
    (pb.SamplingParams(top_k=2**31), "top_k"), (pb.SamplingParams(top_k=2**32 - 1), "top_k"),
    (pb.SamplingParams(top_k=513), "top_k"), (pb.SamplingParams(temperature=float("inf")),
                                              "temperature"),
    (pb.SamplingParams(temperature=float("nan")), "temperature"),
    (pb.SamplingParams(temperature=1000.0), "temperature"),
    (pb.SamplingParams(top_p=float("nan")), "top_p"), (pb.SamplingParams(top_p=0.0), "top_p"),
    (pb.SamplingParams(max_tokens=1025), "max_tokens"),
    (pb.SamplingParams(max_tokens=2**32 - 1), "max_tokens"),
    (pb.SamplingParams(stop=["s"] * 17), "stop"), (pb.SamplingParams(stop=["s" * 5000]), "stop"),
    (pb.SamplingParams(stop_token_ids=[512]), "stop_token_ids"),
    (pb.SamplingParams(stop_token_ids=[-1]), "stop_token_ids"),
]


def test_bad_sampling_values_are_refused_and_the_server_goes_on(stub):
    before = generate_ids(stub, [40, 41, 42])[2]
    for params, field in BAD_SAMPLING:
        for call in (lambda: list(stub.Chat(pb.ChatRequest(messages=[user("hi")],
                                                           sampling=params))),
                     lambda: list(stub.Generate(pb.GenerateRequest(text="hi", sampling=params)))):
            code, details = status_of(call)
            assert code == INVALID and field in details and len(details) < 300, (params, details)
    assert generate_ids(stub, [40, 41, 42])[2] == before


def test_oversized_input_is_refused_in_milliseconds(server, stub):
    cid = chat(stub, [user("short")])[0]
    big = "x" * (3 << 20)                 # 3 MiB: under the transport limit, never tokenized
    calls = {
        "new chat": lambda: list(stub.Chat(pb.ChatRequest(messages=[user(big)]))),
        "chat history": lambda: list(stub.Chat(pb.ChatRequest(
            messages=[pb.Message(role="system", content=big), user("hi")]))),
        "next turn": lambda: list(stub.Chat(pb.ChatRequest(conversation_id=cid,
                                                           messages=[user(big)]))),
        "generate text": lambda: list(stub.Generate(pb.GenerateRequest(text=big))),
        "generate messages": lambda: list(stub.Generate(pb.GenerateRequest(
            messages=pb.Messages(messages=[user(big)])))),
        "many messages": lambda: list(stub.Chat(pb.ChatRequest(messages=[user("a")] * 5000))),
        "history ids": lambda: list(stub.Chat(pb.ChatRequest(
            messages=[user("a")], history_token_ids=[1] * 5000))),
        "salt": lambda: list(stub.Chat(pb.ChatRequest(messages=[user("a")],
                                                      cache_salt="s" * 5000))),
    }
    for name, call in calls.items():
        start = time.monotonic()
        code, details = status_of(call)
        took = time.monotonic() - start
        assert code == INVALID and len(details) < 300, (name, details)
        assert took < 1.0, (name, took)
    assert chat(stub, [user("fine")], cid)[3].usage.cached_tokens > 0


def test_errors_echo_at_most_about_100_characters(stub):
    huge = "c" * (1 << 20)
    for call in (lambda: chat(stub, [user("hi")], huge), lambda: end(stub, huge)):
        code, details = status_of(call)
        assert code == NOT_FOUND and len(details) < 300
    code, details = status_of(lambda: chat(stub, [pb.Message(role="r" * 100000, content="x"),
                                                  user("y")]))
    assert code == INVALID and "unknown role" in details and len(details) < 300


# -- isolation of failure ---------------------------------------------------------------------

MAGIC = 499           # a prompt starting with this id makes its step fail


def test_an_engine_fault_fails_only_its_request(server, stub, engine, monkeypatch):
    params = SamplingParams(max_tokens=150, ignore_eos=True)
    prompts = {"a": list(range(60, 72)), "b": list(range(80, 95))}
    want = {}
    for name, ids in prompts.items():
        cid, _, want[name], *_ = generate_ids(stub, ids, params)
        end(stub, cid)
    idle_id, _, _, idle_last, _ = chat(stub, [user("keep my cache")])
    failed_before = engine.stats()["failed_steps"]
    real = engine.runner.dispatch

    def faulty(s, *args, **kwargs):
        if np.any((np.asarray(s.positions) == 0) & (np.asarray(s.token_ids) == MAGIC)):
            raise RuntimeError("injected fault: secret internals")
        return real(s, *args, **kwargs)
    monkeypatch.setattr(engine.runner, "dispatch", faulty)
    got, streams = {}, {}
    for name, ids in prompts.items():
        streams[name] = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                                                         sampling=sampling(params)))
        first = next(streams[name])        # running: the poisoned prefill joins its steps
        got[name] = list(first.token_ids)
    code, details = status_of(lambda: generate_ids(stub, [MAGIC, 3, 4, 5]))
    assert code == grpc.StatusCode.INTERNAL
    assert re.fullmatch(r"internal error \(request id [0-9a-f]+\)", details), details
    for name, call in streams.items():
        got[name] += [t for m in call for t in m.token_ids]
        assert got[name] == want[name], name
    assert engine.stats()["failed_steps"] > failed_before
    last = chat(stub, [user("and now?")], idle_id)[3]
    assert last.usage.cached_tokens >= idle_last.usage.prompt_tokens + \
        idle_last.usage.completion_tokens


# -- the history after a cut-off turn ---------------------------------------------------------

def record_sent(server, monkeypatch) -> list:
    """The ChatResponses the server's turns yielded and saw taken (sent), per call."""
    calls = []
    turns = server.service.turns
    real = turns.chat

    async def chat_recorded(request, owner=""):
        sent = []
        calls.append(sent)
        async for message in real(request, owner):
            yield message
            sent.append(message)
    monkeypatch.setattr(turns, "chat", chat_recorded)
    return calls


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_cut_off_turn_keeps_exactly_what_was_sent(server, stub, engine, monkeypatch, how):
    story = f"tell me a long story ({how})"
    sent_calls = record_sent(server, monkeypatch)
    for timeout in (None,) if how == "cancel" else (0.3, 0.15, 0.6, 0.08, 1.0):
        call = stub.Chat(pb.ChatRequest(messages=[user(story)], sampling=sampling(LONG)),
                         timeout=timeout)
        read = []
        with pytest.raises(grpc.RpcError) as info:
            for message in call:
                read.append(message)
                if how == "cancel" and sum(len(m.token_ids) for m in read) >= 5:
                    call.cancel()
        if len(read) >= 2:           # cut off after the turn was accepted and had streamed
            break
        sent_calls.clear()
    assert info.value.code() == (grpc.StatusCode.CANCELLED if how == "cancel" else
                                 grpc.StatusCode.DEADLINE_EXCEEDED)
    cid = read[0].conversation_id
    assert wait_until(lambda: not server.call(lambda: server.service.turn_running(cid)))
    sent = sent_calls[0][1:]                     # after the "accepted" message
    sent_ids = [t for m in sent for t in m.token_ids]
    read_ids = [t for m in read[1:] for t in m.token_ids]
    assert sent_ids[:len(read_ids)] == read_ids and sent_ids
    session = server.call(lambda: server.service.conversations[cid].session)
    assert list(session.last_reply.token_ids) == sent_ids
    assert session.history[-1] == {"role": "assistant", "content": "".join(m.text for m in sent)}
    assert session.last_reply.finish_reason == "abort"
    # the next turn == a fresh conversation built from exactly those ids
    _, _, next_ids, next_last, _ = chat(stub, [user("and then?")], cid)
    tok = engine.tokenizer
    prompt1 = tok.apply_chat_template([{"role": "user", "content": story}])
    fresh = collect(stub.Chat(pb.ChatRequest(
        messages=[user(story), pb.Message(role="assistant", content=tok.decode(sent_ids)),
                  user("and then?")], history_token_ids=prompt1 + sent_ids,
        sampling=sampling(GREEDY))))
    assert next_ids == fresh[2]
    assert next_last.usage.prompt_tokens == fresh[3].usage.prompt_tokens
    assert next_last.usage.cached_tokens >= len(prompt1) + len(sent_ids)
    settle(engine)


# -- max_conversations ------------------------------------------------------------------------

def test_max_conversations_ends_the_least_recently_used_idle_one(engine):
    with BackgroundServer(engine, limits=Limits(max_conversations=2)) as server, \
            grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.PensieveStub(ch)
        first, second = chat(stub, [user("one")])[0], chat(stub, [user("two")])[0]
        chat(stub, [user("one again")], first)              # second is now the oldest
        third = chat(stub, [user("three")])[0]
        assert status_of(lambda: chat(stub, [user("hi")], second))[0] == NOT_FOUND
        assert chat(stub, [user("one more")], first)[3].usage.cached_tokens > 0
        assert stub.GetStats(pb.GetStatsRequest()).server_conversations == 2
        assert wait_until(lambda: not engine.has_conversation(second))
        # every one busy: a new one is refused
        busy = {}
        for cid in (first, third):
            busy[cid] = stub.Chat(pb.ChatRequest(conversation_id=cid, messages=[user("long")],
                                                 sampling=sampling(LONG)))
            next(busy[cid])
        code, details = status_of(lambda: chat(stub, [user("no room")]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_conversations" in details
        assert status_of(lambda: generate_ids(stub, [1, 2, 3]))[0] == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in busy.values():
            call.cancel()
        assert wait_until(lambda: not any(server.call(lambda: server.service.turn_running(c))
                                          for c in busy))
        cid = generate_ids(stub, [1, 2, 3])[0]    # a Generate conversation counts too
        assert wait_until(lambda: stub.GetStats(pb.GetStatsRequest()).server_conversations == 1)
        end(stub, cid)
    settle(engine)


# -- Generate with chat messages --------------------------------------------------------------

def test_generate_runs_chat_messages_like_a_stateless_chat(stub, engine):
    hello = [user("hello there")]
    via_chat = chat(stub, hello)
    via_generate = collect(stub.Generate(pb.GenerateRequest(
        messages=pb.Messages(messages=hello), sampling=sampling(GREEDY))))
    assert via_generate[2] == via_chat[2] and via_generate[1] == via_chat[1]
    history = hello + [pb.Message(role="assistant", content=via_generate[1]), user("more")]
    again = collect(stub.Generate(pb.GenerateRequest(messages=pb.Messages(messages=history),
                                                     sampling=sampling(GREEDY))))
    first_prompt = len(engine.tokenizer.apply_chat_template([{"role": "user",
                                                              "content": "hello there"}]))
    assert again[3].usage.cached_tokens >= first_prompt       # the cached conversation
    for messages, match in (([user("a"), pb.Message(role="assistant", content="b")], "end with"),
                            ([pb.Message(role="wizard", content="a")], "unknown role"),
                            ([], "empty")):
        request = pb.GenerateRequest(messages=pb.Messages(messages=messages))
        code, details = status_of(lambda: list(stub.Generate(request)))
        assert code == INVALID and match in details, details


def test_concurrent_streams_survive_a_burst_of_bad_requests(stub):
    want = generate_ids(stub, [70, 71, 72], SamplingParams(max_tokens=60, ignore_eos=True))[2]
    got = []
    thread = threading.Thread(target=lambda: got.append(generate_ids(
        stub, [70, 71, 72], SamplingParams(max_tokens=60, ignore_eos=True))[2]))
    thread.start()
    for params, _ in BAD_SAMPLING:
        status_of(lambda: list(stub.Generate(pb.GenerateRequest(text="x", sampling=params))))
    thread.join(60)
    assert got == [want]
