"""Prompt sharing on the engine (random:tiny, float32, greedy): outputs identical with sharing on
and off on every path (whole pages, divergence inside a page, shared prefix swapped to host or
dropped), one copy of a common system prompt, cache salts, cache-aware ordering."""

import threading

import numpy as np
import pytest

from pensieve_jax.engine.sampling import SamplingParams
from tests.engine.tiny_engine import make, settle

P = SamplingParams(max_tokens=6, ignore_eos=True)
PAGE_BYTES = 2 * 2 * 8 * 2 * 16 * 4       # tiny: 2 layers, page 8, 2 kv heads, dim 16, float32
SYSTEM = list(np.random.default_rng(0).integers(0, 256, 43))     # 5 full pages + 3 tokens


def user(seed, n=9):
    return list(np.random.default_rng(seed).integers(0, 256, n))


@pytest.fixture(scope="module")
def stateless():
    e = make("stateless", prefix_sharing=False)
    yield e
    e.shutdown()


def turns(engine, cid, prompts, salt=None):
    """Each prompt is a new user part; returns the outputs of a conversation's turns."""
    seq, outs = [], []
    for new in prompts:
        seq = seq + list(new)
        out = engine.submit(seq, P, conversation_id=cid, cache_salt=salt).result()
        outs.append(out)
        seq = seq + list(out.token_ids)
    return outs


def reference(stateless, prompts):
    return [o.token_ids for o in turns(stateless, None, prompts)]


def test_conversations_share_a_system_prompt_with_identical_outputs(stateless):
    eng = make()
    first = turns(eng, "a", [SYSTEM + user(1), user(2)])
    assert first[0].usage.cached_shared_tokens == 0
    settle(eng)
    got = turns(eng, "b", [SYSTEM + user(3), user(4)])
    assert got[0].usage.cached_shared_tokens == 43 == got[0].usage.cached_tokens   # 5 pages + 3
    assert [o.token_ids for o in got] == reference(stateless, [SYSTEM + user(3), user(4)])
    assert [o.token_ids for o in first] == reference(stateless, [SYSTEM + user(1), user(2)])
    stats = settle(eng)
    assert stats["sharing"]["shared_pages"] == 5 and stats["sharing"]["shared_hit_tokens"] == 43
    eng.shutdown()


@pytest.mark.parametrize("cut", [41, 44, 47])
def test_divergence_inside_a_page_copies_it(stateless, cut):
    """b shares a's first cut tokens: 5 whole pages, then part of page 5, copied on write;
    a's next turn still sees its own page unchanged."""
    eng = make()
    a_prompt = SYSTEM + user(5)
    a1 = turns(eng, "a", [a_prompt])[0]
    settle(eng)
    b_prompt = a_prompt[:cut] + [(a_prompt[cut] + 1) % 256] + user(6, 4)
    b1 = eng.submit(b_prompt, P, conversation_id="b").result()
    assert b1.usage.cached_tokens == cut and b1.usage.cached_shared_tokens == cut
    assert list(b1.token_ids) == stateless.generate(b_prompt, P)
    assert eng.stats()["copied_on_write_pages"] == 1
    a_seq = a_prompt + list(a1.token_ids) + user(7)
    a2 = eng.submit(a_seq, P, conversation_id="a").result()
    assert list(a2.token_ids) == stateless.generate(a_seq, P)
    assert a2.usage.cached_tokens == len(a_prompt) + len(a1.token_ids)
    eng.shutdown()


@pytest.mark.parametrize("host_pages", [0, 40])
def test_shared_prefix_swapped_out_or_dropped_comes_back_identical(stateless, host_pages):
    """Four conversations share the system prompt; a burst of unrelated ones pushes all of
    them off the device (to host, or dropped); their next turns equal the baseline."""
    eng = make(num_pages=20, host_cache_bytes=host_pages * PAGE_BYTES, swap_out_threshold=0.0,
               reserve_fraction=0.0)
    prompts = {f"s{i}": [SYSTEM + user(10 + i), user(20 + i)] for i in range(4)}
    outs = {cid: turns(eng, cid, p[:1])[0] for cid, p in prompts.items()}
    for i in range(3):
        turns(eng, f"other-{i}", [user(30 + i, 120)])
    stats = settle(eng)
    assert stats["released_shared_pages"] > 0
    if host_pages:
        assert stats["device_to_host_pages"] > 0
    else:
        assert stats["device_dropped_pages"] > 0
    for cid, p in prompts.items():
        seq = p[0] + list(outs[cid].token_ids) + p[1]
        got = eng.submit(seq, P, conversation_id=cid).result()
        assert list(got.token_ids) == stateless.generate(seq, P), cid
        assert list(outs[cid].token_ids) == stateless.generate(p[0], P)
    stats = settle(eng)
    if host_pages:
        assert stats["hit_tokens_by_tier"]["host"] > 0
    else:
        assert stats["recomputed_tokens"] > 0
    eng.shutdown()


@pytest.mark.slow    # ~7 s; .ci/run runs it
def test_concurrent_conversations_all_paths_identical(stateless):
    """Twelve conversations, four system prompts, a pool too small for all: sharing, copy on
    write, swaps and recompute mixed in the same batches; every output equals the baseline."""
    eng = make(num_pages=40, host_cache_bytes=30 * PAGE_BYTES, max_num_seqs=6)
    systems = [SYSTEM[:20 + 7 * k] for k in range(4)]
    plans = {f"c{i}": [systems[i % 4] + user(100 + i), user(200 + i)] for i in range(12)}
    got = {}

    def run(cid):
        got[cid] = [o.token_ids for o in turns(eng, cid, plans[cid])]
    threads = [threading.Thread(target=run, args=(cid,)) for cid in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for cid, p in plans.items():
        assert got[cid] == reference(stateless, p), cid
    stats = settle(eng)
    assert stats["sharing"]["shared_hit_tokens"] > 0 and stats["copied_on_write_pages"] > 0
    assert stats["device_to_host_pages"] > 0, stats
    eng.shutdown()


@pytest.mark.slow
def test_one_copy_of_a_long_system_prompt():
    """8 conversations over a 2k-token system prompt: about one copy of it in the pool."""
    system = list(np.random.default_rng(1).integers(0, 256, 2048))
    used = {}
    for sharing in (True, False):
        eng = make(prefix_sharing=sharing, num_pages=1200, max_model_len=2304, page_size=16,
                   max_batched_tokens=512)
        for i in range(8):
            eng.submit(system + user(300 + i), SamplingParams(max_tokens=2, ignore_eos=True),
                       conversation_id=f"c{i}").result()
        used[sharing] = settle(eng)["pages"]["device"]["used"]
        eng.shutdown()
    one_copy = 2048 // 16
    assert used[True] < 1.2 * one_copy and used[False] > 7 * one_copy


def test_cache_salts_never_share():
    eng = make()
    prompt = SYSTEM + user(40)
    eng.submit(prompt, P, conversation_id="a", cache_salt="tenant-1").result()
    settle(eng)
    other = eng.submit(prompt, P, conversation_id="b", cache_salt="tenant-2").result()
    same = eng.submit(prompt, P, conversation_id="c", cache_salt="tenant-1").result()
    assert other.usage.cached_tokens == 0 and same.usage.cached_shared_tokens == 51
    with pytest.raises(ValueError, match="another cache_salt"):
        eng.submit(prompt, P, conversation_id="a", cache_salt="tenant-2").result()
    with pytest.raises(TypeError, match="cache_salt"):
        eng.submit(prompt, P, cache_salt=3)
    eng.shutdown()


def test_sharing_off_keeps_private_copies(stateless):
    eng = make(prefix_sharing=False)
    turns(eng, "a", [SYSTEM + user(1)])
    settle(eng)
    got = turns(eng, "b", [SYSTEM + user(3)])[0]
    assert got.usage.cached_tokens == 0
    assert list(got.token_ids) == stateless.generate(SYSTEM + user(3), P)
    assert settle(eng)["sharing"] == {"shared_pages": 0, "enabled": False, "shared_hit_tokens": 0,
                                      "hit_ratio": 0.0}
    eng.shutdown()


def test_waiting_turns_with_cached_prompts_go_first_within_the_fairness_bound():
    from pensieve_jax.kvcache.pages import PageAllocator
    from pensieve_jax.kvcache.conversations import ConversationStore
    from pensieve_jax.engine.request import Request
    from pensieve_jax.engine.batching import order_waiting
    from pensieve_jax.engine.scheduler import Scheduler, SchedulerConfig

    store = ConversationStore(PageAllocator(64), 8)
    warm = store.get_or_create("warm", SYSTEM)
    warm.token_ids = list(SYSTEM)
    store.reserve(warm, len(SYSTEM))
    warm.num_computed = len(SYSTEM)
    store.release(warm, keep_kv=True)

    def req(name, prompt):
        return Request(name, prompt, P, 0, name, None)
    for bound, want in ((16, ["hit", "miss-1", "miss-2"]), (0, ["miss-1", "miss-2", "hit"])):
        sched = Scheduler(SchedulerConfig(max_batched_tokens=1, fairness_steps=bound), store)
        for r in (req("miss-1", user(1, 30)), req("miss-2", user(2, 30)),
                  req("hit", SYSTEM + user(3))):
            sched.add(r)
        sched.waiting = order_waiting(sched.waiting, store, sched.config)
        assert [r.id for r in sched.waiting] == want


def test_anonymous_requests_diverging_after_a_shared_prefix_keep_their_own_caches(stateless):
    """Stateless clients (no conversation id) with one system prompt: the second does not take
    over (and cut short) the first's conversation; each one's next turn hits its whole history."""
    eng = make()
    a1 = eng.submit(SYSTEM + user(60), P).result()
    settle(eng)
    b1 = eng.submit(SYSTEM + user(61), P).result()
    assert b1.conversation_id != a1.conversation_id and b1.usage.cached_shared_tokens == 43
    settle(eng)
    for first, u in ((a1, 60), (b1, 61)):
        seq = SYSTEM + user(u) + list(first.token_ids) + user(u + 10)
        nxt = eng.submit(seq, P).result()
        assert nxt.conversation_id == first.conversation_id
        assert nxt.usage.cached_tokens == len(SYSTEM) + 9 + len(first.token_ids)
        assert list(nxt.token_ids) == stateless.generate(seq, P)
    eng.shutdown()
