"""The gateway's parts without a server: the response store, gRPC status -> HTTP errors,
request validation; and the store's bound through a gateway."""

import grpc
import openai
import pytest

from serving.http import BackgroundHttp
from serving.http.errors import ApiError, from_status, param_in
from serving.http.response_store import ResponseStore, StoredResponse
from serving.http.schemas import ChatCompletionRequest, ResponseRequest, parse

from .conftest import MODEL, unique


def entry(rid, conversation, owner="o"):
    return StoredResponse(rid, owner, conversation, None, (), {"id": rid})


def test_the_store_tracks_each_conversations_latest_and_drops_the_oldest():
    store = ResponseStore(max_responses=2)
    a1, a2, b1 = entry("a1", "A"), entry("a2", "A"), entry("b1", "B")
    assert store.put(a1) == []
    assert store.is_latest(a1)
    assert store.put(a2) == [] and not store.is_latest(a1) and store.is_latest(a2)
    assert store.get("a1", "o") is a1 and store.get("a1", "someone else") is None
    assert store.put(b1) == []          # a1 dropped, but it was not its conversation's latest
    assert store.get("a1", "o") is None and len(store) == 2
    assert store.put(entry("c1", "C")) == [a2]      # a2 was A's latest: end A
    store.advance("C")
    assert not store.is_latest(store.get("c1", "o"))
    assert store.delete(b1) is True and store.delete(b1) is False


@pytest.mark.parametrize("code, details, status", [
    (grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1], got 7.0", 400),
    (grpc.StatusCode.UNAUTHENTICATED, "invalid API key", 401),
    (grpc.StatusCode.NOT_FOUND, "no conversation 'x'", 404),
    (grpc.StatusCode.FAILED_PRECONDITION, "a turn is running", 409),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "3 requests in flight; the limit is 3", 429),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (5 vs. 4)", 413),
    (grpc.StatusCode.UNAVAILABLE, "shutting down", 503),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", 504),
    (grpc.StatusCode.INTERNAL, "KeyError: secret internals", 500),
])
def test_grpc_status_to_http(code, details, status):
    err = from_status(code, details, {"top_p": "top_p"})
    assert err.status == status
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    if status == 500:
        assert "secret" not in body["message"]
    if status == 400:
        assert body["param"] == "top_p"


def test_param_is_the_first_field_the_message_names():
    fields = {"max_tokens": "max_completion_tokens", "prompt": "messages", "top_p": "top_p"}
    assert param_in("prompt has 2000 tokens; max_model_len is 1024", fields) == "messages"
    assert param_in("max_tokens must be >= 1", fields) == "max_completion_tokens"
    assert param_in("no such thing", fields) is None


def test_validation_names_nested_fields_and_clips_echoed_input():
    with pytest.raises(ApiError) as info:
        parse(ChatCompletionRequest, {"model": "m", "messages": [
            {"role": "user", "content": "hi"}, {"role": "user", "content": 7}]})
    assert info.value.param == "messages[1].content"
    with pytest.raises(ApiError) as info:
        parse(ResponseRequest, {"model": "m", "input": [{"role": "user", "content": "x"}],
                                "temperature": "z" * 10_000})
    assert info.value.param == "temperature" and len(info.value.message) < 300
    with pytest.raises(ApiError) as info:
        parse(ResponseRequest, {"input": "x"})
    assert info.value.param == "model"


def test_responses_beyond_the_bound_are_forgotten(server):
    with BackgroundHttp(server.target, MODEL, max_responses=1) as http:
        client = openai.OpenAI(base_url=http.url, api_key="x", max_retries=0)
        first = client.responses.create(model=MODEL, input=unique("one"), max_output_tokens=2)
        client.responses.create(model=MODEL, input=unique("two"), max_output_tokens=2)
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model=MODEL, input="x", previous_response_id=first.id)
        assert len(http.gateway.context.store) == 1
