"""The Responses API of the HTTP gateway with the real `openai` client: previous_response_id
continues the kept conversation (cache hits), forks resend the history, GET/DELETE, owners,
streaming events."""

import openai
import pytest

from .conftest import MODEL, chat, unique

pytestmark = pytest.mark.slow      # `.ci/run` runs it (make test stays under 10 min)

GREEDY = dict(model=MODEL, temperature=0, max_output_tokens=8,
              extra_body={"ignore_eos": True})


def test_previous_response_id_continues_on_the_kept_cache(client, server):
    first = client.responses.create(input=unique("Name a data structure."),
                                    instructions="Answer briefly.", **GREEDY)
    assert first.id.startswith("resp_") and len(first.id) >= 5 + 32
    assert first.status == "incomplete"           # cut by max_output_tokens (ignore_eos)
    assert first.usage.output_tokens == 8 and first.output_text
    second = client.responses.create(input="Another one?", previous_response_id=first.id,
                                     **GREEDY)
    assert second.previous_response_id == first.id
    cached = second.usage.input_tokens_details.cached_tokens
    assert cached >= first.usage.input_tokens      # turn 1's prompt (and reply) reused
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert client.responses.retrieve(second.id).output_text == second.output_text


def test_a_fork_resends_the_history_as_a_stateless_client_would(client):
    question = unique("Count to three.")
    first = client.responses.create(input=question, instructions="Be exact.", **GREEDY)
    client.responses.create(input="Go on.", previous_response_id=first.id, **GREEDY)
    # first is no longer its conversation's latest turn: this one forks from it, resending
    # its history as text, so it answers what a chat completion of that history answers
    fork = client.responses.create(input="Go on.", previous_response_id=first.id, **GREEDY)
    history = [{"role": "system", "content": "Be exact."},
               {"role": "user", "content": question},
               {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "Go on."}]
    text, usage = chat(client, history)
    assert fork.output_text == text
    assert fork.usage.input_tokens == usage.prompt_tokens
    # and the fork is a conversation of its own, continued on its kept cache
    third = client.responses.create(input="More.", previous_response_id=fork.id, **GREEDY)
    assert third.usage.input_tokens_details.cached_tokens >= fork.usage.input_tokens


def test_unknown_or_deleted_response_ids_are_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(input="hi", previous_response_id="resp_nope", **GREEDY)
    assert info.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nope")
    r = client.responses.create(input=unique("hello"), **GREEDY)
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(input="again", previous_response_id=r.id, **GREEDY)


def test_responses_belong_to_the_key_that_made_them(gateway):
    alice = openai.OpenAI(base_url=gateway.url, api_key="alice", max_retries=0)
    bob = openai.OpenAI(base_url=gateway.url, api_key="bob", max_retries=0)
    r = alice.responses.create(input=unique("a secret"), **GREEDY)
    assert alice.responses.retrieve(r.id).id == r.id
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.create(input="tell me", previous_response_id=r.id, **GREEDY)


def test_store_false_is_not_kept(client, engine):
    r = client.responses.create(input=unique("forget me"), store=False, **GREEDY)
    assert r.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_streamed_events_and_text_equal_the_whole_response(client):
    question = unique("Describe a cache.")
    first = client.responses.create(input=question, **GREEDY)
    again = client.responses.create(input=question, **GREEDY)      # another conversation
    assert again.output_text == first.output_text
    whole = client.responses.create(input="Shorter.", previous_response_id=first.id,
                                    **GREEDY)
    events = list(client.responses.create(input="Shorter.", previous_response_id=again.id,
                                          stream=True, **GREEDY))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    final = events[-1].response
    assert client.responses.retrieve(final.id).output_text == text
