"""One token history per conversation (issue 19): the engine's conversation store holds it, a
Session reads and changes it through Engine.history.token_ids / rewind and
keeps no copy. After every kind of turn and edit, the Session's history is the engine's, it is
exactly what the turn's tokens make, and the next turn gives the tokens of a recompute from
scratch (a stateless engine's)."""

import time

import pytest

from pensieve_jax.engine.engine import Engine
from pensieve_jax.engine.errors import TurnFailed
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.kvcache.errors import ConversationBusy
from tests.engine.tiny_engine import fail_turns_after_reading_hi

P = SamplingParams(max_tokens=8, ignore_eos=True)
LONG = SamplingParams(max_tokens=200, ignore_eos=True)
OPTS = dict(max_model_len=256, page_size=8, num_pages=128, max_batched_tokens=32)


@pytest.fixture(scope="module")
def engines():
    pair = {p: Engine.from_pretrained("random:tiny", cache_policy=p, **OPTS)
            for p in ("stateful", "stateless")}
    yield pair
    for e in pair.values():
        e.shutdown()


def int_runs(obj):
    """Every non-empty list or tuple of ints inside obj (through lists, tuples and dicts)."""
    if isinstance(obj, (list, tuple)):
        if obj and all(isinstance(x, int) and not isinstance(x, bool) for x in obj):
            yield obj
        else:
            for x in obj:
                yield from int_runs(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from int_runs(x)


def one_copy(session) -> list[int]:
    """The Session's history, checked to be the engine's, with no copy of it in the Session."""
    history = session.engine.history.token_ids(session.conversation_id)
    assert session.token_ids == history
    for run in int_runs(vars(session)):
        assert len(run) < 2 or list(run) != history[:len(run)], "the Session copies the history"
    return history


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def next_turn_recomputes(session, stateless, text: str = "next"):
    """The session's next turn: its prompt extends the history exactly (as the template renders
    it), its tokens are a full recompute's, and the history grows by exactly the two."""
    prompt = session.engine.tokenizer.encode_chat(session.template_history + user(text),
                                                  prefix_ids=session.token_ids)
    want = stateless.generate(prompt, P)
    reply = session.send(text, P)
    assert reply.usage.prompt_tokens == len(prompt)
    assert list(reply.token_ids) == want
    assert one_copy(session) == prompt + want          # "length": no stop token
    return reply


def wait_generated(engine, cid: str, n: int) -> None:
    """Until the running turn of cid has produced n tokens past its prompt's length n0."""
    deadline = time.monotonic() + 60
    while len(engine.history.token_ids(cid)) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(engine.history.token_ids(cid)) >= n


def test_a_turn_leaves_one_history_and_closing_ends_it(engines):
    eng, tok = engines["stateful"], engines["stateful"].tokenizer
    s = eng.session(system="be brief")
    reply = s.send("hello", P)
    prompt = tok.apply_chat_template([{"role": "system", "content": "be brief"}] + user("hello"))
    assert one_copy(s) == prompt + list(reply.token_ids)
    nxt = next_turn_recomputes(s, engines["stateless"])
    assert nxt.usage.cached_tokens == len(prompt) + len(reply.token_ids)
    cid = s.conversation_id
    s.close()
    assert s.token_ids == [] and eng.history.token_ids(cid) == []
    assert cid not in eng.call(lambda: set(eng.store.held))


def test_a_stateless_turn_keeps_the_history_without_its_kv(engines):
    eng = engines["stateless"]
    with eng.session() as s:
        reply = s.send("hello", P)
        assert one_copy(s) == eng.tokenizer.apply_chat_template(user("hello")) + \
            list(reply.token_ids)
        assert eng.computed_tokens(s.conversation_id) == ([], "")       # no KV kept
        assert next_turn_recomputes(s, eng).usage.cached_tokens == 0


def test_a_stop_string_reply_keeps_every_token_the_engine_ran(engines):
    eng = engines["stateful"]
    with eng.session() as free:
        text = free.send("find a stop", SamplingParams(max_tokens=12, ignore_eos=True)).text
    assert len(text) >= 4, "the fixed-seed random model gives enough text for a stop string"
    with eng.session() as s:
        reply = s.send("find a stop", SamplingParams(max_tokens=12, ignore_eos=True,
                                                     stop=[text[2:4]]))
        assert reply.finish_reason == "stop" and reply.text == text[:text.find(text[2:4])]
        # the tokens past the stop string's start stay in the history (the text is cut)
        prompt = eng.tokenizer.apply_chat_template(user("find a stop"))
        assert one_copy(s) == prompt + list(reply.token_ids)
        next_turn_recomputes(s, engines["stateless"])


def test_a_stop_token_stays_in_the_history(engines):
    eng = engines["stateful"]
    with eng.session() as free:
        ids = free.send("chunk me", P).token_ids
    with eng.session() as s:
        reply = s.send("chunk me", SamplingParams(max_tokens=8, ignore_eos=True,
                                                  stop_token_ids=[ids[2]]))
        assert reply.finish_reason == "stop" and reply.token_ids == ids[:2]
        prompt = eng.tokenizer.apply_chat_template(user("chunk me"))
        assert one_copy(s) == prompt + list(ids[:3])
        next_turn_recomputes(s, engines["stateless"])


def test_a_cancelled_turn_keeps_only_what_was_read(engines):
    eng = engines["stateful"]
    with eng.session() as s:
        prompt = eng.tokenizer.apply_chat_template(user("long answer please"))
        chunks = s.stream_chunks("long answer please", LONG)
        for _ in range(3):
            next(chunks)
        wait_generated(eng, s.conversation_id, len(prompt) + 20)   # the engine ran ahead
        chunks.close()                                   # the caller walks away
        reply = s.last_reply
        assert reply.finish_reason == "abort" and len(reply.token_ids) < 20
        assert reply.usage.completion_tokens > len(reply.token_ids)
        assert one_copy(s) == prompt + list(reply.token_ids)
        nxt = next_turn_recomputes(s, engines["stateless"])
        assert nxt.usage.cached_tokens >= len(prompt)    # the KV of what was kept stayed


def test_a_failed_turn_leaves_the_engine_holding_what_was_read(engines, monkeypatch):
    eng = engines["stateful"]
    s = eng.session()
    fail_turns_after_reading_hi(eng, monkeypatch)
    with pytest.raises(TurnFailed):
        s.send("fail please", P)
    monkeypatch.undo()
    prompt = eng.tokenizer.apply_chat_template(user("fail please"))
    assert one_copy(s) == prompt + [104, 105]
    next_turn_recomputes(s, engines["stateless"])
    s.close()


def test_truncate_reply_and_undo_turn_rewind_the_engines_history(engines):
    eng = engines["stateful"]
    with eng.session() as s:
        s.send("first", P)
        after_first = one_copy(s)
        second = s.send("second", P)
        after_second = one_copy(s)
        s.truncate_reply(3)
        assert one_copy(s) == after_second[:len(after_second) - len(second.token_ids) + 3]
        s.undo_turn()
        assert one_copy(s) == after_first
        third = next_turn_recomputes(s, engines["stateless"], "third")
        assert third.usage.cached_tokens >= len(after_first)
        after_third = one_copy(s)
        s.truncate_reply(0)                            # the whole reply goes: the prompt stays
        assert one_copy(s) == after_third[:third.usage.prompt_tokens]
        next_turn_recomputes(s, engines["stateless"], "fourth")


def test_continue_from_sets_the_engines_history(engines):
    eng, tok = engines["stateful"], engines["stateful"].tokenizer
    earlier = user("q1") + [{"role": "assistant", "content": "a1"}]
    ids = tok.apply_chat_template(earlier, add_generation_prompt=False)
    with eng.session() as s:
        s.continue_from(ids, earlier=earlier)
        assert one_copy(s) == ids and s.history == earlier
        assert eng.computed_tokens(s.conversation_id) == ([], "")   # nothing computed yet
        next_turn_recomputes(s, engines["stateless"])


def test_eviction_and_the_ttl_keep_an_open_sessions_history(engines):
    """Dropping the KV (the recompute tier) and conversation_ttl_s's expiry (store.expire, as
    the engine thread runs it) leave an open Session's history; a conversation no Session
    holds is forgotten by the TTL."""
    eng = engines["stateful"]
    with eng.session() as s:
        s.send("hello", P)
        history, cid = one_copy(s), s.conversation_id
        eng.call(lambda: eng.store.drop_kv(eng.store.conversations[cid]))
        assert one_copy(s) == history and eng.computed_tokens(cid) == ([], "")
        next_turn_recomputes(s, engines["stateless"])
        history = one_copy(s)
        assert eng.computed_tokens(cid)[0]                          # KV again
        eng.submit([5, 6, 7], P, conversation_id="plain").result()
        time.sleep(0.01)
        eng.call(lambda: eng.store.expire(0.001))
        assert not eng.has_conversation("plain")
        assert one_copy(s) == history and eng.computed_tokens(cid) == ([], "")
        next_turn_recomputes(s, engines["stateless"], "after the ttl")


def test_history_rewind_checks_input_keeps_the_shared_kv_and_refuses_a_running_turn(
        engines):
    eng = engines["stateful"]
    assert eng.history.token_ids("never-seen") == []
    for kwargs, field in [(dict(conversation_id="", token_ids=[1]), "conversation_id"),
                          (dict(conversation_id="x", token_ids=[10 ** 9]), "token_ids"),
                          (dict(conversation_id="x", token_ids="text"), "token_ids"),
                          (dict(conversation_id="x", token_ids=[1] * 257), "max_model_len"),
                          (dict(conversation_id="x", keep=-1), "keep"),
                          (dict(conversation_id="x", token_ids=[1], keep=1), "keep")]:
        with pytest.raises(ValueError, match=field):
            eng.history.rewind(**kwargs)
    assert not eng.has_conversation("x")
    prompt = list(range(3, 40))
    for _ in range(3):      # right after the turn: its cache flush may still be due
        out = eng.submit(prompt, P, conversation_id="rw").result()
        history = eng.history.token_ids("rw")
        assert history == prompt + list(out.token_ids)
        assert eng.history.rewind("rw", history[:21]) == 21
        assert eng.computed_tokens("rw") == (history[:21], "")
    assert eng.history.rewind("rw", keep=5, wait=False) is None   # applied before reads
    assert eng.history.token_ids("rw") == history[:5]
    assert eng.history.rewind("rw", [9] + history[1:5]) == 0
    with pytest.raises(ValueError, match="cache_salt"):
        eng.history.rewind("rw", [1], cache_salt="another")
    handle = eng.submit(prompt, LONG, conversation_id="busy")
    wait_generated(eng, "busy", len(prompt) + 2)
    with pytest.raises(ConversationBusy):
        eng.history.rewind("busy", [1, 2])
    handle.cancel()
    handle.result()
    assert eng.history.rewind("busy", prompt) == len(prompt)
    for cid in ("rw", "busy"):
        assert eng.end_conversation(cid)
