"""Streams: cancellation and disconnects free their slot, many conversations at once, the client
library against the in-process Session, graceful shutdown, conversation expiry."""

import threading
import time

import grpc
import pytest

from serving.client import connect
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.server import BackgroundServer

from .conftest import GREEDY, LONG, collect, sampling, settle, user


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def turn(stub, text, conversation_id="", params=GREEDY):
    return collect(stub.Chat(pb.ChatRequest(conversation_id=conversation_id, messages=[user(text)],
                                            sampling=sampling(params))))


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
def test_a_stopped_stream_frees_its_slot_and_keeps_delivered_tokens(server, engine, how):
    channel = grpc.insecure_channel(server.target)      # its own: "disconnect" closes it
    stub = pb_grpc.PensieveStub(channel)
    cid, _, _, first, _ = turn(stub, "hello")
    call = stub.Chat(pb.ChatRequest(conversation_id=cid, messages=[user("a long answer please")],
                                    sampling=sampling(LONG)))
    delivered = []
    for message in call:
        delivered.extend(message.token_ids)
        if len(delivered) >= 5:
            break
    if how == "cancel":
        call.cancel()
    else:
        channel.close()
    start = time.monotonic()
    assert wait_for(lambda: (s := engine.stats())["running"] == s["waiting"] == 0 and
                    server.service.active_streams == 0)
    assert time.monotonic() - start < 1.0
    with connect(server.target) as client:      # the conversation goes on after what it got
        s = client.session()
        s.conversation_id = cid
        reply = s.send("and then?", GREEDY)
    history = first.usage.prompt_tokens + first.usage.completion_tokens
    assert reply.usage.cached_tokens >= history + len(delivered)
    # computed: the new turn's 30 template tokens and the reply's last token (an aborted turn
    # has no cache flush)
    assert reply.usage.prompt_tokens - reply.usage.cached_tokens <= 31
    channel.close()


def test_a_stopped_generate_stream_keeps_its_tokens_for_prefix_reuse(stub, engine):
    prompt = list(range(40, 60))
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                            sampling=sampling(LONG)))
    got = []
    for message in call:
        got.extend(message.token_ids)
        if len(got) >= 4:
            break
    call.cancel()
    settle(engine)
    _, _, ids, last, _ = collect(stub.Generate(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt + got + [7]), sampling=sampling(GREEDY))))
    assert last.usage.cached_tokens == len(prompt) + len(got)
    assert ids == engine.generate(prompt + got + [7], GREEDY)


def test_32_concurrent_conversations_match_each_run_alone(server, engine):
    texts = [[f"conversation {i} starts", f"turn two of {i}"] for i in range(32)]
    remote, ids, errors = {}, set(), []
    client = connect(server.target)

    def run(i):
        try:
            with client.session(system=f"you are bot {i % 3}") as s:
                remote[i] = [s.send(t, GREEDY) for t in texts[i]]
                ids.add(s.conversation_id)
        except Exception as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    assert not errors
    for i in range(32):
        with engine.session(system=f"you are bot {i % 3}") as s:
            alone = [s.send(t, GREEDY) for t in texts[i]]
        assert [r.token_ids for r in remote[i]] == [r.token_ids for r in alone]
        assert [r.text for r in remote[i]] == [r.text for r in alone]
        assert remote[i][1].usage.cached_tokens == \
            remote[i][0].usage.prompt_tokens + remote[i][0].usage.completion_tokens
    assert len(ids) == 32      # and each was closed: the server no longer holds any of them
    assert not ids & server.call(lambda: set(server.service.conversations))
    assert settle(engine)["running"] == 0


def test_remote_session_mirrors_the_local_one(server, engine):
    history = [{"role": "user", "content": "earlier question"},
               {"role": "assistant", "content": "earlier answer"}]
    texts = ["first", "second", "third"]
    with connect(server.target) as client, client.session(system="be brief",
                                                          history=history) as remote:
        local = engine.session(system="be brief", history=history)
        for text in texts:
            r, l = remote.send(text, GREEDY), local.send(text, GREEDY)
            assert (r.text, r.token_ids, r.finish_reason) == (l.text, l.token_ids, l.finish_reason)
            for field in ("prompt_tokens", "cached_tokens", "prefilled_tokens",
                          "recomputed_tokens", "completion_tokens"):
                assert getattr(r.usage, field) == getattr(l.usage, field), field
        pieces = list(remote.stream("streamed", GREEDY))
        local_pieces = list(local.stream("streamed", GREEDY))
        assert "".join(pieces) == remote.last_reply.text == local.last_reply.text
        assert pieces == local_pieces
        assert remote.history == local.history
        local.close()
        gen = client.generate([5, 6, 7, 8], GREEDY)
        assert list(gen.token_ids) == engine.generate([5, 6, 7, 8], GREEDY)
        assert gen.conversation_id.startswith("anon")


def test_chat_with_a_whole_history_starts_a_conversation_like_a_seeded_session(stub, engine):
    history = [pb.Message(role="system", content="sys"), user("q1"),
               pb.Message(role="assistant", content="a1"), user("q2")]
    cid, text, ids, last, messages = collect(stub.Chat(pb.ChatRequest(
        messages=history, sampling=sampling(GREEDY))))
    assert messages[0].conversation_id == cid and not messages[0].text    # accepted first
    assert all(m.conversation_id == cid for m in messages)
    assert [bool(m.finish_reason) for m in messages] == [False] * (len(messages) - 1) + [True]
    local = engine.session(history=[{"role": m.role, "content": m.content} for m in history[:-1]])
    reply = local.send("q2", GREEDY)
    assert (text, ids) == (reply.text, list(reply.token_ids))
    local.close()
    *_, nxt, _ = turn(stub, "q3", cid)
    assert nxt.usage.cached_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


def test_graceful_shutdown_finishes_or_cancels_streams_cleanly(engine):
    server = BackgroundServer(engine)
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.PensieveStub(channel)
    long_call = stub.Chat(pb.ChatRequest(messages=[user("never ending")], sampling=sampling(LONG)))
    next(long_call)
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 0.5})
    stopper.start()
    messages = list(long_call)                       # ends cleanly: status OK, a final message
    assert messages[-1].finish_reason == "abort"
    assert 0 < messages[-1].usage.completion_tokens < LONG.max_tokens
    stopper.join()
    with pytest.raises(grpc.RpcError) as info:
        turn(stub, "too late")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert settle(engine)["running"] == 0
    channel.close()


def test_idle_conversations_expire_on_the_server_and_in_the_engine(limited_engine):
    with BackgroundServer(limited_engine) as server, connect(server.target) as client:
        s = client.session()
        s.send("remember me", GREEDY)
        assert client.stats_response().server_conversations == 1
        assert wait_for(lambda: client.stats_response().server_conversations == 0 and
                        client.stats()["conversations"] == 0, timeout=5.0)
        assert client.stats()["pages"]["device"]["used"] == 0
        with pytest.raises(LookupError, match="expired"):
            s.send("still there?", GREEDY)
