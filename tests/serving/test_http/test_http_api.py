"""The OpenAI API of the HTTP gateway, with the real `openai` client, against the in-process gRPC
server: models, chat completions and completions (whole and streamed), cache reuse of a
resent history, health and metrics."""

import httpx2 as httpx
import openai
import pytest

from serving.http import BackgroundHttp
from serving.server import BackgroundServer
from ..conftest import engine_like
from .conftest import MODEL, chat, unique


def test_models_list(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_stream_text_equals_whole_text(client):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": unique("Tell me about caches")}]
    whole, usage = chat(client, messages, max_tokens=12)
    assert usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + 12
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert text == whole and whole
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # the same prompt again: served from the cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_completions_text_and_token_ids_stream_equals_whole(client):
    prompt = unique("Once upon a time")
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == whole.choices[0].text
    ids = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=4,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert ids.usage.prompt_tokens == 4 and ids.usage.completion_tokens == 4


def test_resent_history_hits_the_cache_and_matches_a_cacheless_run(engine, client):
    history = [{"role": "system", "content": "You answer in riddles."},
               {"role": "user", "content": unique("What is a page table?")}]
    reply, first = chat(client, history)
    history += [{"role": "assistant", "content": reply},
                {"role": "user", "content": "And a prefix tree?"}]
    second_text, second = chat(client, history)
    assert second.prompt_tokens_details.cached_tokens >= first.prompt_tokens  # the whole turn 1
    assert second.pensieve["prefilled_tokens"] + second.pensieve["recomputed_tokens"] + \
        second.prompt_tokens_details.cached_tokens == second.prompt_tokens
    fresh_engine = engine_like(engine)          # same weights, an empty cache
    try:
        with BackgroundServer(fresh_engine) as server, \
                BackgroundHttp(server.target, MODEL) as http:
            fresh = openai.OpenAI(base_url=http.url, api_key="x", max_retries=0)
            fresh_text, fresh_usage = chat(fresh, history)
    finally:
        fresh_engine.shutdown()
    assert fresh_usage.prompt_tokens_details.cached_tokens == 0
    assert fresh_usage.prompt_tokens == second.prompt_tokens
    assert fresh_text == second_text


@pytest.mark.parametrize("field, value, param", [
    ("temperature", "hot", "temperature"),
    ("temperature", -1.0, "temperature"),
    ("top_p", 1.5, "top_p"),
    ("max_tokens", 0, "max_tokens"),
    ("max_tokens", True, "max_tokens"),
    ("seed", -3, "seed"),
    ("n", 2, "n"),
    ("logprobs", True, "logprobs"),
    ("stop", ["a", "b", "c", "d", "e"], "stop"),
    ("messages", [{"role": "wizard", "content": "hi"}], "messages[0].role"),
    ("messages", [{"role": "user", "content": 5}], "messages[0].content"),
    ("messages", [{"role": "user", "content": [{"type": "image_url"}]}],
     "messages[0].content[0].type"),
    ("messages", [], "messages"),
    ("messages", [{"role": "user", "content": "x" * 5000}], "messages"),   # > max_model_len
])
def test_bad_fields_are_400_naming_the_field(gateway, field, value, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], field: value}
    r = httpx.post(f"{gateway.url}/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_bad_fields_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", temperature="warm")
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="other",
                                       messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"


def test_unknown_fields_are_ignored_and_bad_json_is_400(gateway):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "frobnicate": {"x": 1}}
    assert httpx.post(f"{gateway.url}/completions", json=body, timeout=30).status_code == 200
    r = httpx.post(f"{gateway.url}/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{gateway.url}/completions", content=b'{"model": "tiny-test", '
                   b'"prompt": "hi", "temperature": NaN}', timeout=30)
    assert r.status_code == 400


def test_health_and_metrics(gateway, client):
    base = gateway.url.removesuffix("/v1")
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    client.models.list()
    text = httpx.get(f"{base}/metrics").text
    assert 'pensieve_http_requests_total{route="/v1/models",status="200"}' in text
