"""The real engine, scheduler and KV cache over a runner without a device (tests/fake_runner.py):
every turn of many interleaved multi-turn conversations gives the tokens recomputing it from
scratch gives, through small device pools, a host tier, prompt sharing, both loops and both
cache policies; a cancelled turn leaves the others alone. No model, no JAX program: fast."""

from __future__ import annotations

import random

import pytest

from pensieve_jax.engine.config import EngineConfig, page_bytes
from pensieve_jax.engine.engine import Engine
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.model.config import PRESETS
from pensieve_jax.tokenizer import Tokenizer
from pensieve_jax.weights import LoadedModel
from tests.fake_runner import FakeRunner, reference

CONFIG = PRESETS["tiny"]
MODEL = LoadedModel(CONFIG, {}, Tokenizer.byte_level(CONFIG.vocab_size), "fake")
PAGE_BYTES = page_bytes(MODEL, EngineConfig(page_size=4), "float32")


def engine(num_pages=40, host_pages=0, **options) -> Engine:
    config = EngineConfig(page_size=4, num_pages=num_pages, max_model_len=96,
                          max_batched_tokens=16, max_num_seqs=4,
                          host_cache_bytes=host_pages * PAGE_BYTES, **options)
    return Engine(MODEL, "float32", config, make_runner=lambda n, ladder: FakeRunner(
        CONFIG, n, 4, max_num_seqs=4, max_batched_tokens=16, max_model_len=96,
        token_ladder=ladder))


def conversations(seed: int, count: int, turns: int, system: list[int]) -> list[list[list[int]]]:
    rng = random.Random(seed)
    return [[[rng.randrange(3, CONFIG.vocab_size) for _ in range(rng.randint(1, 9))]
             for _ in range(turns)] for _ in range(count)]


def run_conversations(eng: Engine, convs, system, max_tokens=5, cancel_every=0):
    """Each conversation's turns in order, all conversations interleaved (a turn of each in
    flight at once); checks every finished turn against the reference."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    seqs = [list(system) for _ in convs]
    checked = 0
    for turn in range(len(convs[0])):
        handles = []
        for i, conv in enumerate(convs):
            seqs[i] += conv[turn]
            handles.append(eng.submit(list(seqs[i]), params, conversation_id=f"c{i}"))
        cancelled = set()
        if cancel_every:
            for i in range(0, len(handles), cancel_every):
                eng.cancel(handles[i].request_id)
                cancelled.add(i)
        for i, h in enumerate(handles):
            out = h.result()
            if i in cancelled and out.finish_reason == "abort":
                seqs[i] += list(out.token_ids)   # the history as the client saw it
                continue
            expected = reference(seqs[i], max_tokens, CONFIG.vocab_size)
            assert list(out.token_ids) == expected, (i, turn)
            seqs[i] += expected
            checked += 1
    return checked


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("cache_policy", ["stateful", "stateless"])
def test_turns_equal_recomputing_from_scratch(overlap, cache_policy):
    system = list(range(10, 30))
    convs = conversations(1, 6, 4, system)
    with engine(overlap=overlap, cache_policy=cache_policy) as eng:
        assert run_conversations(eng, convs, system) == 24
        stats = eng.stats()
    if cache_policy == "stateful":
        assert stats["cached_tokens"] > 0            # later turns reused their history
    else:
        assert stats["cached_tokens"] == 0


@pytest.mark.parametrize("restore_policy", ["load", "recompute"])
def test_a_tight_pool_with_a_host_tier_swaps_and_still_matches(restore_policy):
    system = list(range(40, 52))
    convs = conversations(2, 8, 4, system)
    with engine(num_pages=26, host_pages=120, restore_policy=restore_policy) as eng:
        assert run_conversations(eng, convs, system, max_tokens=6) == 32
        stats = eng.stats()
    assert stats["swap"]["out_pages"] > 0          # idle conversations left the device
    if restore_policy == "load":                   # ... and came back from the host
        assert stats["swap"]["in_pages"] > 0 and stats["cached_host_tokens"] > 0
    else:                                          # ... or were computed again
        assert stats["recomputed_tokens"] > 0


def test_a_tight_pool_without_a_host_tier_drops_and_recomputes():
    system = list(range(60, 70))
    convs = conversations(3, 8, 3, system)
    with engine(num_pages=26) as eng:
        assert run_conversations(eng, convs, system) == 24


def test_cancelled_turns_leave_the_others_alone():
    system = list(range(80, 90))
    convs = conversations(4, 6, 3, system)
    with engine() as eng:
        assert run_conversations(eng, convs, system, max_tokens=8, cancel_every=3) >= 12
