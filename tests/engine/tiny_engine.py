"""random:tiny engines for the engine and cache tests (real programs, float32, CPU), and the
ways the tests drive them: a conversation turn by turn, many conversations at once (one thread
each), the greedy reference recomputed from scratch, waiting until the engine is idle.

    stateless = engine_fixture("stateless")                 # a module-scoped fixture
    eng = make(num_pages=16, host_cache_bytes=4 * PAGE_BYTES)   # stateful unless told otherwise
    outs = run_conversations(eng, {"c0": random_turns(0), "c1": random_turns(1)})
    assert tokens(outs) == tokens(run_conversations(stateless, same_turns))
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

import numpy as np
import pytest

from pensieve_jax.engine.engine import Engine
from pensieve_jax.engine.errors import TurnFailed
from pensieve_jax.engine.request import RequestHandle, TokenEvent
from pensieve_jax.engine.sampling import SamplingParams

OPTS = dict(max_model_len=128, page_size=8, max_batched_tokens=16, max_num_seqs=8)
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)
PAGE_BYTES = 2 * 2 * 8 * 2 * 16 * 4       # K and V, 2 layers, page 8, 2 kv heads, dim 16, float32


def make(policy: str = "stateful", **kw) -> Engine:
    """A random:tiny engine with OPTS and 64 pages; kw overrides any engine option."""
    return Engine.from_pretrained("random:tiny", cache_policy=policy, **{**OPTS, "num_pages": 64,
                                                                         **kw})


def engine_fixture(policy: str = "stateful", **kw):
    """A module-scoped pytest fixture: make(policy, **kw), shut down after the module's tests.

        stateless = engine_fixture("stateless")
    """
    @pytest.fixture(scope="module")
    def fixture():
        e = make(policy, **kw)
        yield e
        e.shutdown()
    return fixture


def greedy_by_recompute(engine: Engine, prompt, n: int) -> list[int]:
    """Reference: every token from a fresh full prefill of the whole sequence so far."""
    seq, out = list(prompt), []
    for _ in range(n):
        token = engine.generate(seq, SamplingParams(max_tokens=1, ignore_eos=True))[0]
        out.append(token)
        seq.append(token)
    return out


def conversation_turns(engine: Engine, turns, conversation_id: str, params=GREEDY) -> list:
    """Feed turns of new token ids into one conversation; returns outputs per turn."""
    seq, outs = [], []
    for new in turns:
        seq = seq + list(new)
        out = engine.submit(seq, params, conversation_id=conversation_id).result()
        outs.append(out)
        seq = seq + list(out.token_ids)
    return outs


def in_threads(fn: Callable, args: Sequence[tuple]) -> None:
    """fn(*a) for every a in args, each on a thread of its own, all at once; returns when every
    one has ended."""
    threads = [threading.Thread(target=fn, args=a) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_conversations(engine: Engine, turns: dict[str, list], params=GREEDY) -> dict[str, list]:
    """Every conversation at once (one thread each, its turns in order, as conversation_turns):
    {conversation id: outputs per turn}."""
    results: dict[str, list] = {}

    def run(cid: str) -> None:
        results[cid] = conversation_turns(engine, turns[cid], cid, params)
    in_threads(run, [(cid,) for cid in turns])
    return results


def tokens(results: dict[str, list]) -> dict[str, list]:
    """run_conversations' outputs as their token ids only."""
    return {cid: [o.token_ids for o in outs] for cid, outs in results.items()}


def settle(engine: Engine) -> dict:
    """Wait until the engine has nothing in flight (a finished turn's cache flush included);
    returns its stats then."""
    while (s := engine.stats())["running"] or s["waiting"]:
        time.sleep(0.005)
    return s


def random_turns(seed: int, n_turns: int = 3, lo: int = 3, hi: int = 20) -> list[list[int]]:
    """n_turns turns of random token ids (below 256), lo to hi - 1 ids each."""
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, 256, rng.integers(lo, hi))) for _ in range(n_turns)]


def fail_turns_after_reading_hi(engine: Engine, monkeypatch) -> None:
    """Every turn submitted to engine (until monkeypatch.undo()) streams the tokens 104 and 105
    ("h", "i") and then fails as a step failure fails it (TurnFailed)."""
    def failing_submit(prompt, params=None, conversation_id=None, cache_salt=None):
        handle = RequestHandle("rid", conversation_id)
        handle.put(TokenEvent((104,), None, "h"))
        handle.put(TokenEvent((105,), None, "i"))
        handle.put(TurnFailed("internal error (request id rid)", "rid"))
        return handle
    monkeypatch.setattr(engine, "submit", failing_submit)
