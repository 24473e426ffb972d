"""The real model through the stateful engine: cached turns give the same tokens as the
stateless baseline, with several conversations sharing the batches."""

import threading

import pytest

from pensieve_jax.engine.engine import Engine, EngineConfig
from pensieve_jax.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow   # long: `make test-all` runs it (not `make test`)

CHATS = [
    ["What is the capital of France?", "What is a famous landmark there?", "How tall is it?"],
    ["Name a primary color.", "Name another one.", "Which one is warmer?"],
    ["Write a haiku about rain.", "Now one about sun."],
]


def test_stateful_equals_stateless_on_the_real_model(smollm2):
    params = SamplingParams(max_tokens=24, temperature=0.0)
    replies = {}

    def run(engine, policy, i):
        with engine.session() as s:
            replies[(policy, i)] = [s.send(t, params) for t in CHATS[i]]

    engines = {p: Engine(smollm2, "float32", EngineConfig(max_model_len=512, num_pages=96,
                                                          max_batched_tokens=64, cache_policy=p))
               for p in ("stateful", "stateless")}
    threads = [threading.Thread(target=run, args=(e, p, i)) for p, e in engines.items()
               for i in range(len(CHATS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, chat in enumerate(CHATS):
        full, base = replies[("stateful", i)], replies[("stateless", i)]
        assert [r.token_ids for r in full] == [r.token_ids for r in base]
        for k in range(1, len(chat)):
            prev = full[k - 1].usage
            assert full[k].usage.cached_tokens == prev.prompt_tokens + prev.completion_tokens
            assert base[k].usage.cached_tokens == 0
    assert "Paris" in replies[("stateful", 0)][0].text
    for e in engines.values():
        e.shutdown()
