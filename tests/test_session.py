"""The Session API: turns, streaming, stop strings, closing, threads and asyncio."""

import asyncio
import threading

import pytest

from pensieve_jax.engine import Engine
from pensieve_jax.sampling import SamplingParams
from pensieve_jax.session import IncrementalDetokenizer, SessionClosed
from pensieve_jax.tokenizer import Tokenizer

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
