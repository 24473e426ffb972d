"""`python -m serving serve ... --http-port 0` as a subprocess, driven with the real `openai`
client: the OpenAI API served next to gRPC from the same engine, with an API key."""

import os

import httpx2 as httpx
import openai
import pytest

from ..served import Served
from .conftest import unique

pytestmark = pytest.mark.slow      # `.ci/run` runs it (make test stays under 10 min)

NAME = "tiny-cli"
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def served():
    server = Served({**os.environ, "PYTHONIOENCODING": "utf-8"}, "--http-port", "0",
                    "--served-model-name", NAME, "--api-key", KEY, start_s=120)
    try:
        url = server.announced(r"OpenAI API on (http://\S+/v1)", timeout=30)
        if url is None:
            raise RuntimeError("no OpenAI API announced:\n" + "".join(server.lines))
        yield url
    finally:
        server.stop(timeout=30)


def test_the_openai_api_of_a_served_process(served):
    client = openai.OpenAI(base_url=served, api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [NAME]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served, api_key="wrong", max_retries=0).models.list()

    greedy = dict(model=NAME, temperature=0, max_tokens=8, extra_body={"ignore_eos": True})
    history = [{"role": "user", "content": unique("Hello over HTTP")}]
    whole = client.chat.completions.create(messages=history, **greedy)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        messages=history, stream=True, **greedy) if c.choices)
    assert streamed == whole.choices[0].message.content
    history += [{"role": "assistant", "content": whole.choices[0].message.content},
                {"role": "user", "content": "And again?"}]
    second = client.chat.completions.create(messages=history, **greedy)
    assert second.usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens

    first = client.responses.create(model=NAME, input=unique("A stateful turn"),
                                    max_output_tokens=8, temperature=0)
    after = client.responses.create(model=NAME, input="Next.", previous_response_id=first.id,
                                    max_output_tokens=8, temperature=0)
    assert after.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=NAME, input="x", previous_response_id="resp_unknown")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(messages=history, model=NAME, top_p=7.0)
    assert info.value.body["param"] == "top_p"
    assert httpx.get(served.removesuffix("/v1") + "/health").status_code == 200
