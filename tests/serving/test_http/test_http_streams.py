"""Streams through the HTTP gateway: many at once, and a client that goes away mid-stream (its
turn is cancelled and frees its slot)."""

import time
from concurrent import futures

import httpx2 as httpx
import openai
import pytest

from ..conftest import settle, wait_until
from .conftest import MODEL, unique

pytestmark = pytest.mark.slow      # `.ci/run` runs it (make test stays under 10 min)

TOKENS = 16


def stream_chat(client, i):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": unique(f"stream {i}")}],
        max_tokens=TOKENS, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    return "".join(text), finish, usage


def test_16_concurrent_streams_complete(client):
    with futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: stream_chat(client, i), range(16)))
    assert len(results) == 16
    for text, finish, usage in results:
        assert finish == "length" and text
        assert usage.completion_tokens == TOKENS


def long_body(prompt):
    return {"model": MODEL, "prompt": prompt, "max_tokens": 900, "temperature": 0,
            "ignore_eos": True, "stream": True}


def test_a_client_that_disconnects_mid_stream_leaves_no_running_turn(gateway, engine):
    settle(engine)
    before = engine.stats()["completion_tokens"]
    with httpx.stream("POST", f"{gateway.url}/completions", json=long_body(unique("long")),
                      timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
        assert got
    # the response is closed: the turn is cancelled well before its 900 tokens (a cancelled
    # turn's tokens count in completion_tokens too)
    assert wait_until(lambda: engine.stats()["running"] == 0, timeout=5)
    assert 0 < engine.stats()["completion_tokens"] - before < 900


def test_a_client_that_gives_up_on_a_whole_reply_cancels_its_turn(gateway, engine):
    settle(engine)
    before = engine.stats()["completion_tokens"]
    body = {**long_body(unique("patience")), "stream": False}
    start = time.monotonic()
    try:
        httpx.post(f"{gateway.url}/completions", json=body, timeout=0.15)
        raise AssertionError("a 900-token reply came back within 0.15 s")
    except httpx.TimeoutException:
        pass
    assert wait_until(lambda: engine.stats()["running"] == 0, timeout=5)
    assert time.monotonic() - start < 6
    assert 0 < engine.stats()["completion_tokens"] - before < 900


def test_streams_still_work_after_disconnects(client):
    text, finish, usage = stream_chat(client, "after")
    assert finish == "length" and usage.completion_tokens == TOKENS
    assert isinstance(client, openai.OpenAI)
