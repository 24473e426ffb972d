"""The Session API: turns, streaming, stop strings, closing, threads and asyncio."""

import asyncio
import re
import threading

import pytest

from pensieve_jax.engine.engine import Engine
from pensieve_jax.engine.errors import TurnFailed
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.session import Chunk, IncrementalDetokenizer, SessionClosed
from pensieve_jax.tokenizer import Tokenizer
from tests.engine.tiny_engine import fail_turns_after_reading_hi

PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def engines():
    opts = dict(max_model_len=256, page_size=8, num_pages=128, max_batched_tokens=32)
    pair = {p: Engine.from_pretrained("random:tiny", cache_policy=p, **opts)
            for p in ("stateful", "stateless")}
    yield pair
    for e in pair.values():
        e.shutdown()


def chat(engine, texts, system=None, params=PARAMS):
    with engine.session(system=system) as s:
        return [s.send(t, params) for t in texts], s.history


def test_turns_reuse_history_and_match_stateless(engines):
    texts = ["hello there", "and now?", "last one"]
    full, history = chat(engines["stateful"], texts, system="be brief")
    base, _ = chat(engines["stateless"], texts, system="be brief")
    assert [r.token_ids for r in full] == [r.token_ids for r in base]
    assert [r.text for r in full] == [r.text for r in base]
    for k in (1, 2):
        prev = full[k - 1].usage
        assert full[k].usage.cached_tokens == prev.prompt_tokens + prev.completion_tokens
        assert full[k].usage.prefilled_tokens == full[k].usage.prompt_tokens - \
            full[k].usage.cached_tokens
        assert base[k].usage.cached_tokens == 0
    assert [m["role"] for m in history] == ["system", "user", "assistant"] * 1 + \
        ["user", "assistant"] * 2


def test_stream_pieces_join_to_the_reply(engines):
    s = engines["stateful"].session()
    pieces = list(s.stream("stream me", PARAMS))
    assert "".join(pieces) == s.last_reply.text
    assert s.last_reply.usage.completion_tokens == 8
    s.close()


def test_concurrent_sessions_from_threads(engines):
    results = {}

    def run(policy, i):
        results[(policy, i)] = [r.token_ids for r in chat(engines[policy], [f"user {i}", "more"])[0]]
    threads = [threading.Thread(target=run, args=(p, i)) for i in range(4)
               for p in ("stateful", "stateless")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert results[("stateful", i)] == results[("stateless", i)]


def test_asyncio_sessions(engines):
    async def main():
        sessions = [engines["stateful"].session() for _ in range(3)]
        replies = await asyncio.gather(*(s.asend(f"async {i}", PARAMS)
                                         for i, s in enumerate(sessions)))
        pieces = [p async for p in sessions[0].astream("again", PARAMS)]
        for s in sessions:
            s.close()
        return replies, pieces, sessions[0].last_reply
    replies, pieces, last = asyncio.run(main())
    assert all(r.usage.completion_tokens == 8 for r in replies)
    assert "".join(pieces) == last.text


def test_bad_input_and_closed_session_keep_other_caches(engines):
    engine = engines["stateful"]
    other = engine.session()
    other.send("keep my cache", PARAMS)
    s = engine.session()
    with pytest.raises(ValueError, match="empty"):
        s.send("   ")
    with pytest.raises(ValueError, match="max_model_len"):
        s.send("x" * 400)
    with pytest.raises(ValueError, match="temperature"):
        s.send("hi", SamplingParams(temperature=-1))
    s.close()
    with pytest.raises(SessionClosed, match="closed"):
        s.send("hi")
    reply = other.send("still cached?", PARAMS)
    prev = reply.usage.prompt_tokens - reply.usage.prefilled_tokens
    assert reply.usage.cached_tokens == prev > 0
    other.close()


def test_stop_string_ends_the_reply_and_is_not_shown(engines):
    engine = engines["stateful"]
    s = engine.session()
    free = s.send("find a stop", SamplingParams(max_tokens=12, ignore_eos=True))
    text = free.text
    assert len(text) >= 4, "the fixed-seed random model gives enough text for a stop string"
    stop = text[2:4]
    s2 = engine.session()
    pieces = list(s2.stream("find a stop", SamplingParams(max_tokens=12, ignore_eos=True,
                                                          stop=[stop])))
    assert s2.last_reply.finish_reason == "stop"
    assert s2.last_reply.text == text[:text.find(stop)]
    assert "".join(pieces) == s2.last_reply.text


def test_detokenizer_holds_back_partial_utf8():
    tok = Tokenizer.byte_level(512)
    ids = tok.encode("é🙂")          # 2 + 4 bytes, one token per byte
    d = IncrementalDetokenizer(tok)
    pieces = [d.add([i]) for i in ids]
    assert pieces == ["", "é", "", "", "", "🙂"]


def test_stopping_a_stream_early_cancels_and_keeps_the_partial_reply(engines):
    engine = engines["stateful"]
    s = engine.session()
    stream = s.stream("long answer please", SamplingParams(max_tokens=100, ignore_eos=True))
    first = next(stream)
    stream.close()                                  # the caller walks away
    assert s.last_reply.finish_reason == "abort"
    assert s.last_reply.text.startswith(first) and s.last_reply.usage.completion_tokens < 100
    assert s.history[-1] == {"role": "assistant", "content": s.last_reply.text}
    nxt = s.send("go on", PARAMS)                   # the conversation continues from there
    assert nxt.usage.cached_tokens > 0
    s.close()


def test_a_session_can_start_from_an_earlier_history(engines):
    history = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
               {"role": "assistant", "content": "a1"}]
    tok = engines["stateful"].tokenizer
    seeded = engines["stateful"].session(history=history)
    reply = seeded.send("q2", PARAMS)
    want = tok.apply_chat_template(history + [{"role": "user", "content": "q2"}])
    assert reply.usage.prompt_tokens == len(want)
    # a new conversation: whatever is cached is a prefix other sessions computed (sharing)
    assert reply.usage.cached_tokens == reply.usage.cached_shared_tokens
    base = engines["stateless"].session(history=history).send("q2", PARAMS)
    assert reply.token_ids == base.token_ids
    assert seeded.history == history + [{"role": "user", "content": "q2"},
                                        {"role": "assistant", "content": reply.text}]
    # a turn may be several messages ending with the user's
    nxt = seeded.send([{"role": "system", "content": "now shorter"},
                       {"role": "user", "content": "q3"}], PARAMS)
    assert nxt.usage.cached_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert seeded.history[-3]["content"] == "now shorter"
    seeded.close()
    with pytest.raises(ValueError, match="unknown role 'wizard'"):
        engines["stateful"].session(history=[{"role": "wizard", "content": "x"}])
    s = engines["stateful"].session()
    with pytest.raises(ValueError, match="end with a user message"):
        s.send([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    s.close()


def test_stream_chunks_carry_the_token_ids(engines):
    engine = engines["stateful"]
    s = engine.session()
    chunks = list(s.stream_chunks("chunk me", PARAMS))
    assert chunks[0] == Chunk("", ())                     # the engine accepted the turn
    assert "".join(c.text for c in chunks) == s.last_reply.text
    assert tuple(t for c in chunks for t in c.token_ids) == s.last_reply.token_ids
    free = s.last_reply.token_ids
    # a stop token ends the turn and is left out of the ids, as in Reply.token_ids
    stop = SamplingParams(max_tokens=8, ignore_eos=True, stop_token_ids=[free[2]])
    s2 = engine.session()
    chunks = list(s2.stream_chunks("chunk me", stop))
    assert s2.last_reply.finish_reason == "stop"
    assert tuple(t for c in chunks for t in c.token_ids) == free[:2] == s2.last_reply.token_ids
    s.close(), s2.close()


def test_cancel_from_another_thread_ends_the_stream_with_abort(engines):
    s = engines["stateful"].session()
    pieces = []
    for chunk in s.stream_chunks("keep going", SamplingParams(max_tokens=200, ignore_eos=True)):
        pieces.append(chunk)
        if len(pieces) == 3:
            threading.Thread(target=s.cancel).start()
    reply = s.last_reply
    assert reply.finish_reason == "abort" and len(reply.token_ids) < 200
    assert "".join(c.text for c in pieces) == reply.text
    assert tuple(t for c in pieces for t in c.token_ids) == reply.token_ids
    nxt = s.send("next", PARAMS)
    assert nxt.usage.cached_tokens >= reply.usage.prompt_tokens + len(reply.token_ids) - 1
    s.close()


def test_special_tokens_in_a_reply_keep_the_history_cached(engines):
    """The random model emits special tokens mid-reply (dropped from the text); the next turn
    still extends the exact token history instead of re-encoding the shown text."""
    engine = engines["stateful"]
    specials = set(range(256, 259))
    params = SamplingParams(max_tokens=100, ignore_eos=True)
    for text in ("long answer please", "try 0", "go on and on"):
        s = engine.session()
        first = s.send(text, params)
        if specials & set(first.token_ids):
            break
        s.close()
    else:
        pytest.fail("no reply with a special token")
    nxt = s.send("next", PARAMS)
    assert nxt.usage.cached_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    s.close()


def test_session_ids_are_unguessable(engines):
    ids = {engines["stateful"].session().conversation_id for _ in range(3)}
    assert len(ids) == 3 and all(re.fullmatch(r"session-[0-9a-f]{32}", i) for i in ids)


def test_truncate_reply_keeps_what_was_shown_and_the_next_turn_follows_it(engines):
    engine = engines["stateful"]
    tok = engine.tokenizer
    s = engine.session()
    full = s.send("hello", PARAMS)
    s.truncate_reply(3)
    kept = full.token_ids[:3]
    assert s.last_reply.token_ids == kept and s.last_reply.finish_reason == "abort"
    assert s.history[-1] == {"role": "assistant",
                             "content": tok.decode(kept, skip_special_tokens=True)}
    got = s.send("again", PARAMS)
    prompt1 = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert got.usage.cached_tokens >= len(prompt1) + 3
    with engine.session() as fresh:          # built from exactly the kept ids
        fresh.continue_from(prompt1 + list(kept), earlier=[
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": tok.decode(kept)}])
        assert fresh.send("again", PARAMS).token_ids == got.token_ids
    s.truncate_reply(100, "shown")           # every id kept: only the text changes
    assert s.history[-1]["content"] == "shown" and s.last_reply.token_ids == got.token_ids
    s.close()


def test_undo_turn_forgets_the_last_turn(engines):
    engine = engines["stateful"]
    with engine.session() as s, engine.session() as plain:
        plain.send("first", PARAMS)
        want = plain.send("third", PARAMS)
        s.send("first", PARAMS)
        history = list(s.history)
        s.send("second", PARAMS)
        assert s.turns == 2
        s.undo_turn()
        assert s.history == history and s.turns == 1
        assert s.send("third", PARAMS).token_ids == want.token_ids
        s.undo_turn()
        s.undo_turn()                        # only one turn back: nothing more
        assert s.history == history


def test_a_failed_turn_keeps_what_was_read(engines, monkeypatch):
    engine = engines["stateful"]
    s = engine.session()
    fail_turns_after_reading_hi(engine, monkeypatch)
    with pytest.raises(TurnFailed):
        s.send("fail please", PARAMS)
    assert s.turns == 1 and s.last_reply.finish_reason == "abort"
    assert s.last_reply.token_ids == (104, 105) and s.last_reply.text == "hi"
    assert s.history[-2:] == [{"role": "user", "content": "fail please"},
                              {"role": "assistant", "content": "hi"}]
    monkeypatch.undo()
    s.send("next", PARAMS)
    s.close()
