"""The engine on random:tiny: cached turns equal recomputation, batching, preemption, bad input."""

import time

import numpy as np
import pytest

from pensieve_jax.engine.engine import Engine
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.weights import ModelLoadError
from tests.engine.tiny_engine import (GREEDY, conversation_turns, engine_fixture,
                                      greedy_by_recompute, make, random_turns, run_conversations,
                                      settle, tokens)

engine = engine_fixture()
stateless = engine_fixture("stateless")


def test_cached_decode_equals_recompute_from_scratch(engine, stateless):
    prompt = list(np.random.default_rng(3).integers(0, 256, 37))   # 3 prefill chunks of <= 16
    out = engine.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True))
    assert len(out) == 12
    assert out == greedy_by_recompute(stateless, prompt, 12)


def test_multiturn_stateful_equals_stateless_while_others_run(engine, stateless):
    """Each conversation's outputs are identical with and without the cache, while other
    conversations share the batches; later turns hit the cache for the whole history."""
    turns = {f"conv-{i}": random_turns(i) for i in range(5)}
    cached, recomputed = run_conversations(engine, turns), run_conversations(stateless, turns)
    for cid in turns:
        full, base = cached[cid], recomputed[cid]
        assert [o.token_ids for o in full] == [o.token_ids for o in base]
        for k in range(1, 3):
            history = len(full[k - 1].prompt_token_ids) + len(full[k - 1].token_ids)
            new = len(full[k].prompt_token_ids) - history
            u = full[k].usage
            assert (u.cached_tokens, u.prefilled_tokens, u.recomputed_tokens) == (history, new, 0)
            b = base[k].usage
            assert (b.cached_tokens, b.prefilled_tokens, b.recomputed_tokens) == (0, new, history)


@pytest.mark.slow    # ~7 s; .ci/run runs it
def test_pool_exhaustion_still_finishes_every_request_correctly(stateless):
    """14 pages of 8 tokens for 8 concurrent conversations: eviction and preemption happen,
    outputs stay identical to the uncontended stateless engine."""
    tight = make(num_pages=16, max_num_seqs=8)
    turns = {f"c{i}": random_turns(100 + i, 2, 20, 40) for i in range(8)}
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    assert tokens(run_conversations(tight, turns, params)) == \
        tokens(run_conversations(stateless, turns, params))
    stats = tight.stats()
    assert stats["preemptions"] > 0 or stats["device_dropped_pages"] > 0
    assert stats["running"] == stats["waiting"] == 0
    tight.shutdown()


def test_history_requests_reuse_the_longest_cached_prefix(engine, stateless):
    """Stateless clients (no conversation id) still hit the cache; an edited history recomputes
    from the first differing token and gives the right tokens."""
    turns = random_turns(7)
    first = engine.submit(turns[0], GREEDY).result()
    history = turns[0] + list(first.token_ids) + turns[1]
    second = engine.submit(history, GREEDY).result()
    assert second.usage.cached_tokens == len(turns[0]) + len(first.token_ids)
    assert second.conversation_id == first.conversation_id          # adopted
    edited = list(history)
    edited[5] = (edited[5] + 1) % 256
    third = engine.submit(edited, GREEDY).result()
    assert third.usage.cached_tokens == 5
    assert list(third.token_ids) == stateless.generate(edited, GREEDY)


def test_same_seed_same_output_and_temperature_varies(engine):
    prompt = [5, 6, 7, 8]
    p = SamplingParams(max_tokens=10, temperature=1.0, seed=123, ignore_eos=True)
    assert engine.generate(prompt, p) == engine.generate(prompt, p)
    outs = {tuple(engine.generate(prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=s,
                                                          ignore_eos=True))) for s in range(4)}
    assert len(outs) > 1
    top1 = SamplingParams(max_tokens=10, temperature=1.0, top_k=1, seed=9, ignore_eos=True)
    assert engine.generate(prompt, top1) == engine.generate(prompt, GREEDY)


def test_batch_generate_matches_one_by_one(engine, stateless):
    prompts = [list(range(1, n)) for n in (4, 9, 15, 30)]
    together = engine.generate(prompts, GREEDY)
    assert together == [stateless.generate(p, GREEDY) for p in prompts]


def test_stop_token_ids_and_stop_strings(engine):
    prompt = [10, 11, 12]
    free = engine.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    cut = engine.submit(prompt, SamplingParams(max_tokens=8, ignore_eos=True,
                                               stop_token_ids=[free[3]])).result()
    assert cut.finish_reason == "stop"
    assert list(cut.token_ids) == free[:free.index(free[3]) + 1]
    long = engine.submit(prompt, SamplingParams(max_tokens=8, ignore_eos=True)).result()
    assert long.finish_reason == "length" and len(long.token_ids) == 8


def test_max_model_len_ends_with_length(engine):
    out = engine.submit(list(range(1, 120)), SamplingParams(max_tokens=50, ignore_eos=True)).result()
    assert out.finish_reason == "length" and len(out.prompt_token_ids) + len(out.token_ids) == 128


def test_steady_workload_does_not_recompile():
    eng = make()
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    def workload():
        for i in range(3):
            conversation_turns(eng, random_turns(50 + i, 2, 4, 8), f"steady-{i}", params)
            eng.end_conversation(f"steady-{i}")
    workload()
    compiled = eng.stats()["compilations"]
    workload()
    assert eng.stats()["compilations"] == compiled
    eng.shutdown()


def test_end_conversation_frees_its_pages(engine):
    conversation_turns(engine, random_turns(9, 1), "to-end")
    before = settle(engine)["pages"]["device"]["free"]
    assert engine.end_conversation("to-end") is True
    assert engine.stats()["pages"]["device"]["free"] > before
    assert engine.end_conversation("to-end") is False


@pytest.mark.parametrize("prompt,error,match", [
    ([], ValueError, "empty"),
    ("hello", TypeError, "token ids"),
    ([1, 100000], ValueError, "out of range"),
    ([1] * 128, ValueError, "max_model_len is 128"),
])
def test_bad_input_is_a_clear_error_and_keeps_other_caches(engine, prompt, error, match):
    conversation_turns(engine, random_turns(11, 1), "bystander")
    before = settle(engine)
    with pytest.raises(error, match=match):
        engine.submit(prompt, GREEDY)
    after = engine.stats()
    assert after["cached_tokens_resident"] == before["cached_tokens_resident"]
    assert after["pages"] == before["pages"]


def test_a_second_turn_while_one_runs_is_rejected(engine):
    seq = list(range(1, 20))
    a = engine.submit(seq, SamplingParams(max_tokens=30, ignore_eos=True), conversation_id="busy")
    b = engine.submit(seq, GREEDY, conversation_id="busy")
    with pytest.raises(RuntimeError, match="turn in progress"):
        b.result()
    assert len(a.result().token_ids) == 30


@pytest.mark.parametrize("kwargs,match", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"seed": -1}, "seed"), ({"stop": [""]}, "stop"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_engine_options():
    with pytest.raises(TypeError, match="unknown engine options"):
        Engine.from_pretrained("random:tiny", page_sise=16)
    with pytest.raises(ValueError, match="power of two"):
        Engine.from_pretrained("random:tiny", page_size=12)
    with pytest.raises(ValueError, match="cache_policy"):
        Engine.from_pretrained("random:tiny", cache_policy="sometimes")
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        Engine.from_pretrained("random:tiny", num_pages=2, page_size=8, max_model_len=128)
    with pytest.raises(ModelLoadError, match="unknown model source 'no-such-model'"):
        Engine.from_pretrained("no-such-model")


def test_queue_limit_and_conversation_ttl():
    eng = make(max_queued_requests=2, conversation_ttl_s=2.0)
    a = eng.submit([1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True), "ttl-a")
    b = eng.submit([4, 5, 6], SamplingParams(max_tokens=40, ignore_eos=True))
    from pensieve_jax.engine.errors import EngineOverloaded
    with pytest.raises(EngineOverloaded, match="max_queued_requests"):
        eng.submit([7], GREEDY)
    a.result(), b.result()
    assert eng.has_conversation("ttl-a")
    assert eng.submit([7, 8], GREEDY).result().finish_reason == "length"   # room again
    deadline = time.time() + 10
    while eng.has_conversation("ttl-a") and time.time() < deadline:
        time.sleep(0.05)
    assert not eng.has_conversation("ttl-a")
    while eng.stats()["conversations"] and time.time() < deadline:
        time.sleep(0.05)
    assert settle(eng)["pages"]["device"]["used"] == 0
    eng.shutdown()


@pytest.mark.slow
def test_pallas_attention_engine_gives_the_same_tokens(engine):
    """The engine with the Pallas kernel (interpret mode on CPU) against the XLA path."""
    eng = make(attention="pallas")
    turns = random_turns(21, 2, 5, 12)
    got = [o.token_ids for o in conversation_turns(eng, turns, "pallas-conv")]
    want = [o.token_ids for o in conversation_turns(engine, turns, "xla-conv")]
    assert got == want
    eng.shutdown()


def test_a_stalled_scheduler_fails_the_turn_clearly_and_keeps_idle_caches():
    """If the scheduler ever returns nothing to run while turns wait (a bug), the engine fails
    those turns with a clear error instead of spinning forever; idle conversations keep
    their caches and the engine serves the next turn."""
    eng = make()
    first = conversation_turns(eng, [[1, 2, 3, 4, 5]], "kept")[0]
    settle(eng)
    schedule = eng.scheduler.schedule
    eng.scheduler.schedule = lambda: []
    with pytest.raises(RuntimeError, match="no progress"):
        eng.submit([9, 9, 9], GREEDY, conversation_id="stuck").result()
    eng.scheduler.schedule = schedule
    history = [1, 2, 3, 4, 5] + list(first.token_ids) + [7]
    again = eng.submit(history, GREEDY, conversation_id="kept").result()
    assert again.usage.cached_tokens == len(history) - 1
    eng.shutdown()
