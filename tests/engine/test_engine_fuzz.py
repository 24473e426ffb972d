"""Seeded fuzz of the real engine (scheduler, conversation store, prefix index, host tier,
swaps, both loops) over a runner without a device (tests/fake_runner.py), which checks every
row's whole context against its positions and makes each sampled token a function of it.

Random configurations (pool sizes, page size, host tier, eviction and restore policies,
sharing, stateless, batch limits, program ladders, overlap), random clients: multi-turn
conversations with shared system prompts, anonymous resends, cancellations, ended
conversations, stop tokens. Checked: every turn that was not cancelled gives the tokens
recomputing it from scratch gives; at every step, page reference counts equal their holders
and holders of a page share a cache salt, a conversation is busy iff it has a turn admitted;
at the end, ending every conversation frees every page.
"""

from __future__ import annotations

import random

import pytest

from pensieve_jax.engine.config import EngineConfig, page_bytes
from pensieve_jax.engine.engine import Engine
from pensieve_jax.engine.sampling import SamplingParams
from tests.engine.test_engine_over_fake_runner import CONFIG, MODEL
from tests.fake_runner import FakeRunner, reference

VOCAB = CONFIG.vocab_size


def random_config(rng: random.Random) -> EngineConfig:
    ps = rng.choice([2, 4, 8])
    max_model_len = rng.choice([48, 64, 96])
    min_pages = -(-max_model_len // ps)
    stateless = rng.random() < 0.15
    max_batched = rng.choice([4, 8, 16, 64])
    return EngineConfig(
        page_size=ps, num_pages=min_pages + rng.choice([0, 1, 4, min_pages]),
        max_model_len=max_model_len, max_batched_tokens=max_batched,
        max_num_seqs=rng.choice([1, 2, 4]),
        host_cache_bytes=rng.choice([0, 0, 3, 3 * min_pages]) * page_bytes(MODEL, EngineConfig(page_size=ps), "float32"),
        eviction_policy=rng.choice(["lru", "pensieve"]), chunk_tokens=ps * rng.choice([1, 2]),
        restore_policy=rng.choice(["load", "recompute"]),
        prefix_sharing=rng.random() < 0.8, cache_policy="stateless" if stateless else "stateful",
        reserve_fraction=rng.choice([0.0, 0.1]), fairness_steps=rng.choice([0, 2, 16]),
        overlap=rng.random() < 0.7, swap_out_threshold=rng.choice([0.0, 0.25, 0.6]),
        token_buckets=rng.choice([None, tuple(sorted({1, 3, 5, 8, max_batched}))]),
        precompile=False)


def check_pages(engine: Engine) -> None:
    """(engine thread, at each dispatch) Reference counts equal holders; holders of a page
    share a salt; busy iff a turn is admitted; KV computed for a prefix of the tokens; running
    turns are restored."""
    store, scheduler = engine.store, engine.scheduler
    convs = store.conversations
    device = {p: [] for p in range(engine.allocator.num_pages)}
    host = {p: [] for p in range(store.host.num_pages)} if store.host is not None else {}
    for conv in convs.values():
        for p in conv.pages:
            if p >= 0:
                device[p].append(conv.id)
        if conv.cow is not None:
            device[conv.cow[1]].append(conv.id)
        for h in conv.host_pages.values():
            host[h].append(conv.id)
        assert all(conv.pages[i] == -1 for i in conv.host_pages), f"{conv.id}: two tiers"
    for alloc, holders in ((engine.allocator, device), (store.host, host)):
        if alloc is None:
            continue
        for p, ids in holders.items():
            assert alloc.ref_count(p) == len(ids), f"page {p}: {alloc.ref_count(p)} refs, {ids}"
            assert len({convs[c].salt for c in ids}) <= 1, f"page {p} across salts: {ids}"
    admitted = {id(r.conversation): r for r in list(scheduler.running) + list(scheduler.waiting)
                if r.conversation is not None}
    for conv in convs.values():
        assert conv.busy == (id(conv) in admitted), f"{conv.id}: busy={conv.busy}"
        # KV computed for a prefix of the tokens (a cancelled turn's may end short of them);
        # only a busy conversation flushes
        assert conv.num_computed <= len(conv.token_ids) and (conv.busy or not conv.flushing)
    assert all(r.conversation is not None and r.restored for r in scheduler.running)


class CheckedRunner(FakeRunner):
    """The fake runner, checking the engine's pages before every step."""

    engine: Engine | None = None

    def dispatch(self, s, incoming=None, last=None, token_src=None):
        if self.engine is not None:
            check_pages(self.engine)
        return super().dispatch(s, incoming, last, token_src)


def run_fuzz(seed: int) -> None:
    rng = random.Random(seed)
    config = random_config(rng)
    runners = []

    def make_runner(num_pages, ladder):
        runners.append(CheckedRunner(CONFIG, num_pages, config.page_size, config.max_num_seqs,
                                     config.max_batched_tokens, config.max_model_len, ladder))
        return runners[-1]
    systems = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 12))] for _ in range(2)]
    with Engine(MODEL, "float32", config, make_runner=make_runner) as engine:
        runners[0].engine = engine
        clients = [{"id": f"s{seed}c{i}", "salt": rng.choice(["", "", "t1"]),
                    "seq": list(rng.choice(systems + [[]]))} for i in range(rng.randint(2, 5))]
        for _ in range(rng.randint(3, 6)):
            handles = []
            for c in clients:
                room = config.max_model_len - len(c["seq"]) - 2
                if room < 2:                          # full: start over
                    engine.end_conversation(c["id"])
                    c["seq"] = list(rng.choice(systems))
                    room = config.max_model_len - len(c["seq"]) - 2
                c["seq"] += [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, room // 2))]
                stops = (rng.randrange(VOCAB),) if rng.random() < 0.3 else ()
                params = SamplingParams(max_tokens=rng.randint(1, max(1, room // 2)),
                                        ignore_eos=True, stop_token_ids=stops)
                cid = None if rng.random() < 0.15 else c["id"]     # an anonymous resend
                handles.append((c, params, engine.submit(list(c["seq"]), params, cid,
                                                         cache_salt=c["salt"])))
            for c, _, h in handles:
                if rng.random() < 0.1:
                    h.cancel()
            for c, params, h in handles:
                out = h.result()
                want = reference(c["seq"], params.max_tokens, VOCAB, params.stop_token_ids)
                if out.finish_reason == "abort":
                    assert list(out.token_ids) == want[:len(out.token_ids)]
                else:
                    assert list(out.token_ids) == want, (seed, c["id"], out.finish_reason)
                c["seq"] += list(out.token_ids)
            if rng.random() < 0.2:
                engine.end_conversation(rng.choice(clients)["id"])
        for cid in engine.call(lambda: list(engine.store.conversations)):
            engine.end_conversation(cid)
        stats = engine.stats()
        engine.call(lambda: check_pages(engine))
    assert stats["pages"]["device"]["used"] == 0, stats["pages"]
    assert stats["pages"]["host"]["used"] == 0, stats["pages"]


@pytest.mark.parametrize("seed", range(40))
def test_fuzz(seed):
    run_fuzz(seed)
