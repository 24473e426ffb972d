"""What the gateway refuses before any gRPC call: a wrong or missing key (401), an oversized body
(413, before parsing); and what the target refuses, mapped to HTTP (400/404)."""

import httpx2 as httpx
import openai
import pytest

from serving.auth import ApiKeys
from serving.http import BackgroundHttp

from .conftest import MODEL

SMALL_LIMIT = 64 << 10


@pytest.fixture(scope="module")
def keyed(server):
    with BackgroundHttp(server.target, MODEL, api_keys=ApiKeys(["k"])) as http:
        yield http


@pytest.fixture(scope="module")
def small(server):
    with BackgroundHttp(server.target, MODEL, max_request_bytes=SMALL_LIMIT) as http:
        yield http


def test_wrong_or_missing_key_is_401(keyed):
    wrong = openai.OpenAI(base_url=keyed.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    r = httpx.post(f"{keyed.url}/responses", json={"model": MODEL, "input": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    right = openai.OpenAI(base_url=keyed.url, api_key="k", max_retries=0)
    assert [m.id for m in right.models.list()] == [MODEL]
    reply = right.chat.completions.create(model=MODEL, max_tokens=2,
                                          messages=[{"role": "user", "content": "x"}])
    assert reply.usage.completion_tokens >= 1
    base = keyed.url.removesuffix("/v1")
    assert httpx.get(f"{base}/health").status_code == 200       # health needs no key
    assert httpx.get(f"{base}/metrics").status_code == 401


def test_oversized_body_is_413_before_parsing(small):
    big = b'{"model": "' + b"x" * (SMALL_LIMIT + 10) + b'"}'
    r = httpx.post(f"{small.url}/chat/completions", content=big,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():                       # no Content-Length: counted as it streams in
        for _ in range(SMALL_LIMIT // 1024 + 2):
            yield b" " * 1024
    r = httpx.post(f"{small.url}/completions", content=chunked())
    assert r.status_code == 413
    client = openai.OpenAI(base_url=small.url, api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=[
            {"role": "user", "content": "y" * SMALL_LIMIT}])
    assert info.value.status_code == 413
    ok = client.chat.completions.create(model=MODEL, max_tokens=2,
                                        messages=[{"role": "user", "content": "small"}])
    assert ok.choices[0].message.content is not None
