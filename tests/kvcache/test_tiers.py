"""The multi-tier cache: device pages, host pages and dropped prefixes, each path against the
stateless baseline (greedy float32), with pools small enough to force every path."""

import pytest

from pensieve_jax.kvcache.pages import PageAllocator
from pensieve_jax.model.config import PRESETS
from pensieve_jax.kvcache.conversations import ConversationStore
from pensieve_jax.engine.config import SWAP_IN_MODES
from pensieve_jax.kvcache.eviction import LRUPolicy, PensievePolicy, make_policy
from pensieve_jax.engine.request import Request
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.tiny_engine import (PAGE_BYTES, conversation_turns, engine_fixture, make,
                                      random_turns, run_conversations, settle, tokens)

P = SamplingParams(max_tokens=8, ignore_eos=True)
stateless = engine_fixture("stateless")


def tier_of(engine, conversation_id):
    c = engine.store.conversations[conversation_id]
    return {"device": sum(p >= 0 for p in c.pages), "host": len(c.host_pages),
            "dropped": c.dropped}


def second_turn(engine, stateless, name, first_turn, new_tokens):
    seq = first_turn + new_tokens
    got = engine.submit(seq, P, conversation_id=name).result()
    assert list(got.token_ids) == stateless.generate(seq, P)
    return got


@pytest.mark.parametrize("swap_in", SWAP_IN_MODES)
def test_host_tier_round_trip(stateless, swap_in):
    eng = make(num_pages=20, host_cache_bytes=40 * PAGE_BYTES, swap_out_threshold=0.0,
               swap_in=swap_in)
    a = random_turns(1, 2, 30, 31)
    first = conversation_turns(eng, a[:1], "A", P)[0]
    history = a[0] + list(first.token_ids)
    for i in range(3):          # other conversations push A's pages off the device
        conversation_turns(eng, random_turns(10 + i, 1, 60, 61), f"other-{i}", P)
    settle(eng)
    tiers = tier_of(eng, "A")
    assert tiers["host"] > 0 and tiers["dropped"] == 0
    got = second_turn(eng, stateless, "A", history, a[1])
    assert got.usage.cached_tokens == len(history)
    assert got.usage.cached_host_tokens > 0 and got.usage.recomputed_tokens == 0
    stats = eng.stats()
    assert stats["swap"]["out_pages"] > 0 and stats["swap"]["in_pages"] > 0
    assert stats["hit_tokens_by_tier"]["host"] > 0
    layered = stats["swap"]["in_layered_pages"]
    assert layered == (stats["swap"]["in_pages"] if swap_in == "layered" else 0)
    eng.shutdown()


@pytest.mark.parametrize("host_pages,swap_in", [
    pytest.param(0, "next_step", marks=pytest.mark.slow),   # ~10 s; .ci/run runs it
    (3, "next_step"), (3, "layered")])
def test_dropped_front_is_recomputed_with_the_new_prompt(stateless, host_pages, swap_in):
    """host 0: front dropped, rest on device; host 3: front dropped, middle on host."""
    eng = make(num_pages=16, host_cache_bytes=host_pages * PAGE_BYTES, swap_out_threshold=0.0,
               chunk_tokens=16, reserve_fraction=0.0, swap_in=swap_in)
    a = random_turns(2, 2, 40, 41)
    first = conversation_turns(eng, a[:1], "A", P)[0]
    history = a[0] + list(first.token_ids)
    conversation_turns(eng, random_turns(20, 1, 100, 101), "B", P)   # needs 14 of 16 pages
    settle(eng)
    tiers = tier_of(eng, "A")       # A gave up 2 chunks of 2 pages, front first
    if host_pages:                  # chunk 1 went to host, was dropped to fit chunk 2 there
        assert tiers == {"dropped": 2, "host": 2, "device": 2}
    else:
        assert tiers == {"dropped": 4, "host": 0, "device": 2}
    got = second_turn(eng, stateless, "A", history, a[1])
    dropped_tokens = tiers["dropped"] * 8
    assert got.usage.recomputed_tokens == dropped_tokens
    assert got.usage.cached_tokens == len(history) - dropped_tokens
    eng.shutdown()


@pytest.mark.parametrize("policy,host_pages,swap_in", [
    ("pensieve", 200, "next_step"),
    *(pytest.param(*p, marks=pytest.mark.slow) for p in [
        ("lru", 200, "next_step"), ("pensieve", 24, "next_step"), ("pensieve", 200, "layered")])])
def test_ten_times_oversubscribed_all_paths_in_one_batch(stateless, policy, host_pages, swap_in):
    """20 conversations, device room for ~2: every conversation finishes with the baseline's
    tokens. With a roomy host tier turns come back from host memory; with a small one the
    host tier overflows into recomputation, never an error."""
    eng = make(num_pages=24, host_cache_bytes=host_pages * PAGE_BYTES, eviction_policy=policy,
               max_num_seqs=6, swap_in=swap_in)
    turns = {f"c{i}": random_turns(300 + i, 2, 20, 40) for i in range(20)}
    assert tokens(run_conversations(eng, turns, P)) == \
        tokens(run_conversations(stateless, turns, P))
    stats = settle(eng)
    assert stats["device_to_host_pages"] > 0 and stats["eviction_policy"] == policy
    if host_pages > 100:
        assert stats["swap"]["in_pages"] > 0 and stats["hit_tokens_by_tier"]["host"] > 0
    else:
        assert stats["host_dropped_pages"] > 0 and stats["recomputed_tokens"] > 0
    eng.shutdown()


def test_usage_adds_up_for_every_turn_with_preemptions_and_every_tier(stateless):
    """Each prompt token of a finished turn is counted once: cached (device, host or shared) +
    prefilled (new to the conversation) + recomputed (history whose KV it lost), also when the
    turn was preempted and restored again: work lost to a preemption is counted nowhere (it
    used to be counted again as recomputed, past prompt_tokens). 8 conversations of 3 turns in
    16 pages and a 6-page host tier: preemptions, swaps out and back, dropped prefixes, and
    one more turn alone of a conversation with pages on the host."""
    eng = make(num_pages=16, max_num_seqs=8, host_cache_bytes=6 * PAGE_BYTES,
               swap_out_threshold=0.0)
    turns = {f"u{i}": random_turns(500 + i, 3, 12, 30) for i in range(8)}
    history, prompt_tokens = {c: [] for c in turns}, 0
    for k in range(3):
        handles = {c: eng.submit(history[c] + new[k], P, conversation_id=c)
                   for c, new in turns.items()}
        for c, handle in handles.items():
            out, seq = handle.result(), history[c] + turns[c][k]
            assert list(out.token_ids) == stateless.generate(seq, P), (c, k)
            u = out.usage
            assert u.prompt_tokens == len(seq)
            prompt_tokens += len(seq)
            assert u.cached_tokens + u.prefilled_tokens + u.recomputed_tokens == len(seq), (c, k, u)
            assert u.prefilled_tokens == len(turns[c][k]), (c, k, u)
            assert u.cached_host_tokens <= u.cached_tokens, (c, k, u)
            assert u.cached_shared_tokens <= u.cached_tokens, (c, k, u)
            history[c] = seq + list(out.token_ids)
    settle(eng)
    # which pages are on the host now depends on how the threads interleaved: one more turn,
    # alone, of a conversation with pages there, so that a swap-in happens in every run
    c = max(turns, key=lambda c: tier_of(eng, c)["host"])
    assert tier_of(eng, c)["host"] > 0, {c: tier_of(eng, c) for c in turns}
    seq = history[c] + [7, 8, 9]
    out = eng.submit(seq, P, conversation_id=c).result()
    assert list(out.token_ids) == stateless.generate(seq, P)
    u, prompt_tokens = out.usage, prompt_tokens + len(seq)
    assert u.cached_tokens + u.prefilled_tokens + u.recomputed_tokens == len(seq), u
    assert 0 < u.cached_host_tokens <= u.cached_tokens, u
    stats = settle(eng)
    assert stats["preemptions"] > 0 and stats["swap"]["in_pages"] > 0
    assert stats["host_dropped_pages"] > 0 and stats["recomputed_tokens"] > 0
    assert stats["finished"] == 25 and stats["prompt_tokens"] == prompt_tokens
    assert stats["prompt_tokens"] == stats["hit_tokens"] + stats["miss_tokens"]
    eng.shutdown()


@pytest.mark.slow
def test_ahead_of_time_swap_out_keeps_free_pages():
    eng = make(num_pages=32, host_cache_bytes=64 * PAGE_BYTES, swap_out_threshold=0.5)
    for i in range(3):
        conversation_turns(eng, random_turns(40 + i, 1, 40, 41), f"idle-{i}", P)
    stats = settle(eng)
    assert stats["pages"]["device"]["free"] >= 16
    assert stats["pages"]["host"]["used"] > 0
    eng.shutdown()


def test_pensieve_policy_values():
    policy = PensievePolicy(PRESETS["llama3-8b"])
    # front chunks are cheaper to rebuild than later ones; long-idle conversations go first
    assert policy.score(0, 32, 10.0, 0) < policy.score(4096, 32, 10.0, 0)
    assert policy.score(1024, 32, 100.0, 0) < policy.score(1024, 32, 1.0, 0)
    lru = LRUPolicy()
    assert lru.score(0, 32, 0, last_used=5.0) < lru.score(0, 32, 0, last_used=6.0)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("fifo", PRESETS["tiny"])


@pytest.mark.parametrize("restore_policy", ["recompute", "auto"])
def test_load_or_recompute_host_pages(stateless, restore_policy):
    """'recompute': pages in host memory are recomputed instead of loaded; 'auto' decides per
    page from the measured bandwidth and prefill speed. Outputs equal the baseline either way."""
    eng = make(num_pages=20, host_cache_bytes=40 * PAGE_BYTES, swap_out_threshold=0.0,
               restore_policy=restore_policy)
    a = random_turns(1, 2, 30, 31)
    first = conversation_turns(eng, a[:1], "A", P)[0]
    history = a[0] + list(first.token_ids)
    for i in range(3):
        conversation_turns(eng, random_turns(10 + i, 1, 60, 61), f"other-{i}", P)
    settle(eng)
    assert tier_of(eng, "A")["host"] > 0
    got = second_turn(eng, stateless, "A", history, a[1])
    stats = settle(eng)
    assert stats["swap"]["h2d_bytes_per_s"] is None or stats["swap"]["h2d_bytes_per_s"] > 0
    if restore_policy == "recompute":
        assert stats["recomputed_not_loaded_pages"] > 0 and got.usage.recomputed_tokens > 0
        assert got.usage.cached_host_tokens == 0
    else:
        assert stats["swap"]["h2d_bytes_per_s"] > 0 and stats["swap"]["prefill_s_per_token"] > 0
        loaded = stats["swap"]["in_pages"]
        assert loaded + stats["recomputed_not_loaded_pages"] > 0
    eng.shutdown()


def store_with_idle_on_host():
    """A store of 16 device pages (page 8) whose only conversation, "idle", holds 24 tokens in
    3 host pages."""
    store = ConversationStore(PageAllocator(16), 8, PageAllocator(8))
    idle = store.get_or_create("idle", [])
    idle.token_ids = list(range(24))
    store.reserve(idle, 24)
    idle.num_computed = 24
    store.release(idle, keep_kv=True)
    assert store.make_room(16) and len(idle.host_pages) == 3    # all of idle's pages go to host
    return store


def test_a_turn_whose_pages_are_loading_does_not_block_others():
    """Swap-ins land one step after they start: the loading turn gets no rows in the step it
    was admitted, others do; after landing it runs."""
    store = store_with_idle_on_host()
    sched = Scheduler(SchedulerConfig(max_batched_tokens=64), store)
    back = Request("back", list(range(24)) + [1, 2], P, 0, "idle", None)
    other = Request("other", [5, 6, 7], P, 0, "other", None)
    sched.add(back)
    sched.add(other)
    rows = sched.schedule()
    assert [r.request.id for r in rows] == ["other"] and back in sched.running and back.loading
    assert len(store.take_transfers()[2]) == 3
    sched.landed()
    assert "back" in [r.request.id for r in sched.schedule()]


def test_a_turn_whose_pages_load_within_the_step_runs_in_that_step():
    """swap_in="layered": the pages are written into the pools inside the step, before any
    layer reads them, so the returning turn runs in the step that restores it."""
    store = store_with_idle_on_host()
    sched = Scheduler(SchedulerConfig(max_batched_tokens=64, swap_in_same_step=True), store)
    back = Request("back", list(range(24)) + [1, 2], P, 0, "idle", None)
    other = Request("other", [5, 6, 7], P, 0, "other", None)
    sched.add(back)
    sched.add(other)
    rows = sched.schedule()
    assert [r.request.id for r in rows] == ["back", "other"] and not back.loading
    assert len(store.take_transfers()[2]) == 3


def test_a_restored_turn_sent_back_to_wait_runs_once_its_pages_land():
    """A returning turn whose pages were staged but that found no room this step waits; when
    its pages land it must not stay 'loading' forever (the engine used to spin, no rows)."""
    store = store_with_idle_on_host()
    sched = Scheduler(SchedulerConfig(max_batched_tokens=64, reserve_pages=12), store)
    other = Request("other", [5, 6, 7], P, 0, "other", None)
    sched.add(other)
    assert [r.request.id for r in sched.schedule()] == ["other"]
    back = Request("back", list(range(24)) + [1, 2], P, 0, "idle", None)
    sched.add(back)
    rows = sched.schedule()          # restored (3 pages staged), but the reserve keeps it out
    assert "back" not in [r.request.id for r in rows] and back in sched.waiting
    assert len(store.take_transfers()[2]) == 3
    sched.landed()
    sched.finish(other)
    store.release(other.conversation, keep_kv=True)
    assert "back" in [r.request.id for r in sched.schedule()]
