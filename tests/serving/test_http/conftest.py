"""Fixtures of the HTTP gateway tests: a gateway (BackgroundHttp, loopback) over the session's
in-process gRPC server (tests/serving/conftest.py), and the real `openai` client against it."""

import uuid

import openai
import pytest

from serving.http import BackgroundHttp

MODEL = "tiny-test"


@pytest.fixture(scope="session")
def gateway(server):
    with BackgroundHttp(server.target, MODEL) as http:
        yield http


@pytest.fixture(scope="session")
def client(gateway):
    return openai.OpenAI(base_url=gateway.url, api_key="unused", max_retries=0, timeout=60)


def unique(text: str) -> str:
    """text made unique to the test run, so no earlier test's cache serves it."""
    return f"{text} [{uuid.uuid4().hex[:8]}]"


def chat(client, messages, max_tokens=8, **kw):
    """A greedy chat completion of max_tokens tokens (ignore_eos): (text, usage)."""
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                       max_tokens=max_tokens, extra_body={"ignore_eos": True},
                                       **kw)
    assert r.choices[0].finish_reason == "length"
    return r.choices[0].message.content, r.usage
