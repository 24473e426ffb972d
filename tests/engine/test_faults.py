"""Isolation of failure in the engine (issue 20): a step that fails fails only the turns it
touched; the other turns finish with the reference tokens, idle conversations keep their cache
(unless the failed step took the pools with it), and the engine goes on serving. Over the fake
runner, with a fault injected for one prompt."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pensieve_jax.engine.config import EngineConfig
from pensieve_jax.engine.engine import Engine
from pensieve_jax.engine.errors import TurnFailed
from pensieve_jax.engine.sampling import SamplingParams
from tests.engine.test_engine_over_fake_runner import CONFIG, MODEL
from tests.fake_runner import FakeRunner, reference

POISON = 7                    # a prompt starting with this token makes its step fail
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


class FaultyRunner(FakeRunner):
    """A FakeRunner whose step fails (at dispatch, or when its tokens are fetched) when it
    computes position 0 of a sequence starting with POISON."""

    def __init__(self, *args, fail_at: str = "dispatch", **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_at = fail_at
        self.faults = 0

    def _poisoned(self, s) -> bool:
        ids, pos = np.asarray(s.token_ids), np.asarray(s.positions)
        return bool(np.any((pos == 0) & (ids == POISON)))

    def dispatch(self, s, incoming=None, last=None, token_src=None):
        poisoned = self._poisoned(s)
        if poisoned and self.fail_at == "dispatch":
            self.faults += 1
            raise RuntimeError("injected fault: secret internals")
        handle = super().dispatch(s, incoming, last, token_src)
        return handle._replace(num_seqs=-handle.num_seqs) if poisoned else handle

    def fetch(self, handle):
        if handle.num_seqs < 0:
            self.faults += 1
            raise RuntimeError("injected device fault: secret internals")
        return super().fetch(handle)


def faulty_engine(fail_at: str, overlap: bool) -> tuple[Engine, list]:
    runners = []

    def make(n, ladder):
        runners.append(FaultyRunner(CONFIG, n, 4, max_num_seqs=4, max_batched_tokens=16,
                                    max_model_len=96, token_ladder=ladder, fail_at=fail_at))
        return runners[0]
    config = EngineConfig(page_size=4, num_pages=40, max_model_len=96, max_batched_tokens=16,
                          max_num_seqs=4, overlap=overlap)
    return Engine(MODEL, "float32", config, make_runner=make), runners


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("fail_at", ["dispatch", "fetch"])
def test_a_faulty_turn_fails_alone(fail_at, overlap):
    eng, runners = faulty_engine(fail_at, overlap)
    vocab = CONFIG.vocab_size
    with eng:
        idle = [20, 21, 22, 23, 24, 25]
        first = eng.submit(idle, PARAMS, conversation_id="idle").result()
        assert list(first.token_ids) == reference(idle, 12, vocab)
        prompts = {"a": [30, 31, 32], "b": [40, 41, 42, 43], "poison": [POISON, 50, 51]}
        gate = threading.Event()     # holds the engine thread: all three join the same step
        eng.thread.post(gate.wait)
        handles = {name: eng.submit(p, PARAMS, conversation_id=name)
                   for name, p in prompts.items()}
        gate.set()
        for name in ("a", "b"):
            out = handles[name].result()
            assert out.finish_reason == "length"
            assert list(out.token_ids) == reference(prompts[name], 12, vocab), name
        with pytest.raises(TurnFailed) as info:
            handles["poison"].result()
        assert info.value.request_id == handles["poison"].request_id
        assert "secret" not in str(info.value)
        assert runners[0].faults == 2          # with the others, then alone
        # the idle conversation's next turn: its cache is intact unless the pools were lost
        again = idle + list(first.token_ids) + [60, 61]
        out = eng.submit(again, PARAMS, conversation_id="idle").result()
        assert list(out.token_ids) == reference(again, 12, vocab)
        if fail_at == "dispatch":
            assert out.usage.cached_tokens == len(idle) + 12
        stats = eng.stats()
        assert stats["failed_steps"] >= 1 and stats["running"] == stats["waiting"] == 0
        # the engine goes on: a new turn of the failed conversation runs
        retry = [51, 52, 53]
        assert list(eng.submit(retry, PARAMS, conversation_id="poison").result().token_ids) \
            == reference(retry, 12, vocab)


def test_a_fault_alone_in_its_step_fails_at_once_and_others_queued_later_run():
    eng, runners = faulty_engine("dispatch", overlap=True)
    with eng:
        with pytest.raises(TurnFailed):
            eng.submit([POISON, 1, 2], PARAMS).result()
        assert runners[0].faults == 1          # alone in its step: no retry
        assert list(eng.submit([3, 4, 5], PARAMS).result().token_ids) == \
            reference([3, 4, 5], 12, CONFIG.vocab_size)
