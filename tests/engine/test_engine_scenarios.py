"""Step-exact scenarios of the real engine (tests/engine/driver.py), each a bug that once was:
races between a turn's end and a cancel, rows past max_num_seqs, copy-on-write deadlocks,
usage after a preemption, ending a conversation whose cache flush was preempted."""

from __future__ import annotations

import pytest

from pensieve_jax.engine.sampling import SamplingParams
from tests.engine.driver import ONE, Driver
from tests.fake_runner import reference


@pytest.fixture
def driver_of():
    made = []

    def make(**options) -> Driver:
        made.append(Driver(**options))
        return made[-1]
    yield make
    for d in made:
        d.close()


def test_a_cancel_racing_the_end_of_a_turn_leaves_its_conversation_usable(driver_of):
    """The client cancels just after the final event (the turn still flushes its cache): the
    turn used to leave the scheduler while its conversation stayed busy, so the next turn
    waited forever."""
    d = driver_of()
    first = d.request("r1", [1, 2, 3, 4, 5], conversation_id="c")
    d.submit(first)
    d.step()
    assert d.delivered("r1") == ("output", "length") and first.conversation.flushing
    d.abort("r1")
    second = d.request("r2", first.prompt + first.output + [7], conversation_id="c")
    d.submit(second)
    d.run()
    assert d.delivered("r2") == ("output", "length") and not d.scheduler.has_work()
    assert second.cached == 6 and not second.conversation.busy


def test_a_turn_with_two_ranges_does_not_push_the_step_past_max_num_seqs(driver_of):
    """A returning turn recomputing a dropped front runs two ranges; rows are the step
    program's sequences: with one left, the front range runs alone and the new tokens follow
    in the next step."""
    d = driver_of(num_pages=8, host_pages=1, chunk_pages=1, max_num_seqs=1, max_model_len=32,
                  max_batched_tokens=64, swap_out_threshold=0.0)
    a = d.request("a", list(range(1, 16)))
    d.submit(a)
    d.run(3)
    conv = a.conversation
    assert not conv.busy and conv.num_computed == 16
    assert d.store.make_room(7)            # pages 0, 1 dropped, page 2 on host, page 3 stays
    d.engine.steps.settle_copies()
    assert conv.dropped == 2 and list(conv.host_pages) == [2] and conv.pages[3] >= 0
    back = d.request("back", conv.token_ids + [9], conversation_id="a")
    other = d.request("other", [5, 6, 7], SamplingParams(max_tokens=3), conversation_id="z")
    d.submit(back)
    d.submit(other)
    d.step()                               # back restores (loading), other runs
    assert back.loading and [r.request.id for r in d.last_rows] == ["other"]
    d.step()                               # one row fits (the program's one sequence)
    assert [(r.request.id, r.front) for r in d.last_rows] == [("back", True)]
    d.step()
    assert [(r.request.id, r.front) for r in d.last_rows] == [("back", False)]
    d.run()
    assert d.delivered("back") == d.delivered("other") == ("output", "length")


def test_a_sequence_as_long_as_the_pool_restores_without_its_copy_on_write(driver_of):
    """Pool = one max_model_len sequence; a new conversation shares 3 whole pages and 1 token
    of the 4th (copy on write): with the source page held it needs a 5th page, so it used to
    wait forever with nothing running. Now it computes that page's tokens instead."""
    d = driver_of(page_size=4, num_pages=4, max_model_len=16)
    a = d.request("a", list(range(1, 16)))
    d.submit(a)
    d.run(3)
    assert a.conversation.num_computed == 16 and not a.conversation.busy
    b = d.request("b", a.conversation.token_ids[:13] + [39, 38])
    d.submit(b)
    d.run(5)
    assert d.delivered("b") == ("output", "length")
    assert b.output == reference(b.prompt, 1, 512)


def test_a_turn_cancelled_before_its_copy_on_write_does_not_pin_the_source_page(driver_of):
    """A turn admitted with a page to copy on write, cancelled before it ran, left its idle
    conversation holding a reference eviction never takes back: with a pool of one
    max_model_len sequence, a long prompt then waited forever."""
    d = driver_of(page_size=4, num_pages=6, max_model_len=24)
    a = d.request("a", list(range(1, 16)))
    d.submit(a)
    d.run(3)
    x = d.request("x", list(range(20, 26)), SamplingParams(max_tokens=5))
    d.submit(x)
    d.step()
    b = d.request("b", a.conversation.token_ids[:13] + [39, 38])
    d.submit(b)
    d.step()                          # b shares a's pages, no room yet for its copy
    assert b.conversation.cow is not None and b in d.scheduler.waiting
    d.abort("b")
    d.run()
    assert d.delivered("x") == ("output", "length")
    y = d.request("y", list(range(1, 24))[::-1])      # needs all 6 pages
    d.submit(y)
    d.run()
    assert d.delivered("y") == ("output", "length")


def test_a_preempted_turn_counts_each_prompt_token_once(driver_of):
    """y prefills its 8 prompt tokens and samples 2, is preempted for x's pages, then computes
    them all again: its usage is that of the run that finished (8 prefilled), not 8 prefilled +
    8 recomputed."""
    d = driver_of(page_size=4, num_pages=6, max_model_len=24, max_batched_tokens=16)
    x = d.request("x", list(range(1, 11)), SamplingParams(max_tokens=8))
    y = d.request("y", list(range(11, 19)), SamplingParams(max_tokens=4))
    d.submit(x)
    d.submit(y)
    d.run(3)
    assert y.prefilled == 8 and len(y.output) == 2 and d.scheduler.num_preemptions == 0
    d.run()
    assert d.scheduler.num_preemptions == 1 and d.delivered("y") == ("output", "length")
    u = d.handles["y"].usage
    assert (u.prompt_tokens, u.cached_tokens, u.prefilled_tokens, u.recomputed_tokens) == \
        (8, 0, 8, 0)


def test_ending_a_conversation_whose_cache_flush_is_preempted_removes_it(driver_of):
    """end_conversation while the turn flushes its cache defers the removal to the store's
    release; when the flush is preempted instead, the scheduler releases the conversation
    itself, and the removal must still happen."""
    d = driver_of(page_size=4, num_pages=6, max_model_len=24, max_batched_tokens=32)
    x = d.request("x", list(range(1, 11)), SamplingParams(max_tokens=8))
    c = d.request("c", list(range(11, 23)), ONE)
    d.submit(x)
    d.submit(c)
    d.step()
    assert c.conversation.flushing
    assert d.end("c")
    d.run()
    assert d.scheduler.num_preemptions == 1 and not x.conversation.busy
    assert "c" not in d.store.conversations and not d.store.closing
