"""The bounded program set: everything compiles before the first request, nothing after.

A warm engine replays a mixed multi-turn workload that reaches every path that runs jitted
code (prefills of many lengths, decodes of many batch sizes, prompt sharing, preemption, the
host tier with swaps both ways and in-step layered loads, dropped prefixes recomputed, sampling,
cancellation, KV export and import) and must compile nothing: neither the engine's own count
nor an independent listener on every XLA compile in the process may move.
"""

import threading

import jax
import numpy as np
import pytest

from pensieve_jax.engine.engine import Engine
from pensieve_jax.engine.config import EngineConfig
from pensieve_jax.runner.programs import ProgramSet, token_buckets
from pensieve_jax.engine.sampling import SamplingParams

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Every XLA compile in this process while counting (any thread, any function)."""

    def __init__(self):
        self.names: list[str] = []
        self.on = False
        jax.monitoring.register_event_duration_secs_listener(self._event)

    def _event(self, event, seconds, **kw):
        if self.on and event == COMPILE_EVENT:
            self.names.append(kw.get("fun_name", "?"))


def test_token_ladder_is_fine_at_the_low_end_and_ends_at_the_budget():
    assert token_buckets(512) == (8, 16, 32, 48, 64, 80, 96, 128, 256, 512)
    assert token_buckets(16) == (8, 16)
    assert token_buckets(100) == (8, 16, 32, 48, 64, 80, 96, 100)
    assert token_buckets(4) == (4,)
    assert token_buckets(512, single=True)[:3] == (1, 8, 16)    # one decode alone (CPU)
    assert token_buckets(1, single=True) == (1,)


def test_program_set_covers_every_step_up_to_the_budget():
    programs = ProgramSet(token_buckets(512), max_num_seqs=64, pages_per_seq=256)
    assert len(programs.shapes) == 10
    for n in range(1, 513):
        shape = programs.shape_for(n)
        assert shape.tokens >= n and shape.seqs == min(shape.tokens, 64)
        smaller = [t for t in programs.token_buckets if t < shape.tokens]
        assert not smaller or smaller[-1] < n          # the smallest program that fits
    with pytest.raises(ValueError, match="max_batched_tokens"):
        programs.shape_for(513)


def test_bad_token_buckets_are_refused():
    with pytest.raises(ValueError, match="increasing"):
        EngineConfig(token_buckets=(16, 8))
    with pytest.raises(ValueError, match="max_batched_tokens"):
        EngineConfig(max_batched_tokens=64, token_buckets=(8, 32))


def _turns(rng, n, lo, hi):
    return [list(map(int, rng.integers(0, 256, int(rng.integers(lo, hi))))) for _ in range(n)]


@pytest.mark.slow   # 47 s: .ci/run runs it after `make test`
def test_a_warm_engine_compiles_nothing_while_serving_a_mixed_workload():
    counter = CompileCounter()
    page_bytes = 2 * 2 * 8 * 2 * 16 * 4        # random:tiny, page_size 8, float32
    engine = Engine.from_pretrained(
        "random:tiny", precompile=True, max_model_len=128, page_size=8, max_batched_tokens=48,
        max_num_seqs=6, num_pages=40, host_cache_bytes=24 * page_bytes, swap_in="layered",
        chunk_tokens=8, restore_policy="auto")
    programs = engine.stats()["programs"]
    assert engine.ready and programs["warm"]
    assert [s["tokens"] for s in programs["shapes"]] == [1, 8, 16, 32, 48] * 2   # + layered; 1: CPU
    assert programs["compilations_after_ready"] == 0
    counter.on = True

    rng = np.random.default_rng(0)
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    sampled = SamplingParams(max_tokens=5, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    system = list(range(1, 20))                 # a shared prefix: prompt sharing

    def conversation(i):
        seq = []
        for j, new in enumerate(_turns(np.random.default_rng(i), 4, 2, 30)):
            seq = (system if j == 0 else seq) + new
            params = sampled if (i + j) % 3 == 0 else greedy
            out = engine.submit(seq, params, conversation_id=f"c{i}").result()
            seq = seq + list(out.token_ids)

    threads = [threading.Thread(target=conversation, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    handle = engine.submit(_turns(rng, 1, 40, 41)[0], SamplingParams(max_tokens=50,
                                                                     ignore_eos=True))
    handle.cancel()
    for t in threads:
        t.join()
    # a long prompt in chunks, while idle conversations' pages go to host and come back
    engine.submit(_turns(rng, 1, 100, 101)[0], greedy).result()
    for i in range(3):
        seq = engine.call(lambda: list(engine.store.conversations[f"c{i}"].token_ids))
        engine.submit(seq + [5, 6], greedy, conversation_id=f"c{i}").result()
    exported = engine.export_kv("c4")
    engine.import_kv("copy-of-c4", exported.token_ids, exported.k, exported.v, exported.layout)
    engine.submit(list(exported.token_ids) + [7], greedy, conversation_id="copy-of-c4").result()
    engine.end_conversation("c5")
    stats = engine.stats()
    counter.on = False
    engine.close()

    swap = stats["swap"]
    assert stats["preemptions"] + swap["out_pages"] > 0, "the pool never ran short"
    assert swap["in_pages"] > 0 and swap["in_layered_pages"] > 0, swap
    assert stats["sharing"]["shared_hit_tokens"] > 0
    assert stats["programs"]["compilations_after_ready"] == 0, stats["programs"]
    assert counter.names == [], counter.names
    assert stats["programs"]["real_tokens"] > 0
    assert stats["programs"]["padded_tokens"] >= stats["programs"]["real_tokens"]


@pytest.mark.slow
def test_a_compile_after_ready_is_counted_and_logged(caplog):
    """Guard for the guard: a program outside the set (forced here) does not go unnoticed."""
    engine = Engine.from_pretrained("random:tiny", precompile=True, max_model_len=64,
                                    page_size=8, max_batched_tokens=8, max_num_seqs=2,
                                    num_pages=16)
    engine.runner.programs = ProgramSet((16,), 2, 8)     # a bucket the warm-up never saw
    engine.generate(list(range(1, 13)), SamplingParams(max_tokens=1))
    programs = engine.stats()["programs"]
    engine.close()
    assert programs["compilations_after_ready"] >= 1 and programs["step_programs_after_ready"] == 1
    assert any("after the engine was ready" in r.getMessage() for r in caplog.records)
