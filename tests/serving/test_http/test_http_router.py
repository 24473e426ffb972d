"""The same HTTP API in front of a router (2 in-process replicas): the same replies as in front
of one server, resent histories and previous_response_id routed to the replica holding them."""

import openai
import pytest

from serving.cluster import BackgroundCluster, ClusterConfig
from serving.http import BackgroundHttp

from ..conftest import ENGINE_OPTIONS
from ..conftest import MODEL as ENGINE_MODEL
from .conftest import MODEL, chat, unique

pytestmark = pytest.mark.slow      # `.ci/run` runs it (make test stays under 10 min)


@pytest.fixture(scope="module")
def routed(engine):
    config = ClusterConfig(ENGINE_MODEL, 2, "e2", engine_options=tuple(ENGINE_OPTIONS.items()),
                           health_period_s=0.2)
    with BackgroundCluster(config, loaded_model=engine.model) as cluster, \
            BackgroundHttp(cluster.target, MODEL) as http:
        yield openai.OpenAI(base_url=http.url, api_key="x", max_retries=0, timeout=60)


def test_chat_through_the_router_equals_one_server(routed, client):
    history = [{"role": "user", "content": unique("Routed hello")}]
    reply, first = chat(routed, history)
    assert reply == chat(client, history)[0]
    streamed = "".join(c.choices[0].delta.content or "" for c in routed.chat.completions.create(
        model=MODEL, messages=history, temperature=0, max_tokens=8, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == reply
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "More?"}]
    second_text, second = chat(routed, history)
    assert second.prompt_tokens_details.cached_tokens >= first.prompt_tokens
    assert second_text == chat(client, history)[0]


def test_responses_through_the_router_continue_on_the_kept_cache(routed):
    first = routed.responses.create(model=MODEL, input=unique("Routed state"),
                                    max_output_tokens=8, temperature=0)
    second = routed.responses.create(model=MODEL, input="Next.", previous_response_id=first.id,
                                     max_output_tokens=8, temperature=0)
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    routed.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        routed.responses.retrieve(second.id)
