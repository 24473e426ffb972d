"""The overlapped engine loop (EngineConfig.overlap): step N+1 is planned and dispatched while
step N runs, N is postprocessed after. It must give the synchronous loop's tokens, stop
handling, cancellation and preemption.

Two kinds of tests:
- the real engine on a simulated device (`FakeDevice` stands in for the runner's programs):
  each KV slot holds a hash chained from the slot before it and its token, a row's sampled
  token is a hash of every slot of its context, so a row that reads a page someone else has
  overwritten, or a token fed from the wrong step, samples another token than the from-scratch
  reference. Programs run when dispatched (the device's order), tokens come back when fetched.
  Many seeded workloads (threads, shared prompts, stop tokens and strings, cancels, ended
  conversations, tiny pools, a host tier) run in seconds, overlapped and not;
- random:tiny through the real programs, float32: overlap on == overlap off == stateless.
"""

from __future__ import annotations

import random
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from pensieve_jax.engine.engine import Engine
from pensieve_jax.runner.model_runner import ModelRunner
from pensieve_jax.runner.page_programs import PAGE_CHUNK
from pensieve_jax.runner.step_program import StepHandle, StepInput
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.weights import load_model
from tests.engine.tiny_engine import in_threads, make, settle

HASH = 1 << 24          # slot values stay exact in the float32 host tier
LOW, HIGH = 97, 105     # sampled tokens are bytes 'a'..'h' (stop strings can match)


def _mix(a: int, b: int) -> int:
    return (a * 1000003 + b * 7919 + 12345) % HASH


def slot_chain(tokens) -> list[int]:
    out, h = [], 1
    for t in tokens:
        h = _mix(h, int(t))
        out.append(h)
    return out


def next_token(slots) -> int:
    h = 7
    for s in slots:
        h = _mix(h, int(s))
    return LOW + h % (HIGH - LOW + 1)


class FakeDevice:
    """The runner's step and page programs over a simulated pool [pages, page_size] of slot
    hashes, patched into an engine's runner."""

    def __init__(self, engine: Engine):
        runner = engine.runner
        self.ps, self.num_pages = runner.page_size, runner.num_pages
        self.slots = runner.programs.max_num_seqs
        self.pool = np.zeros((self.num_pages, self.ps), np.float32)
        self.dispatched = self.fed = 0
        for name in ("dispatch", "fetch", "step", "copy_pages", "gather_pages", "stage_pages",
                     "scatter_staged", "scatter_pages", "reset_kv"):
            setattr(runner, name, getattr(self, name))

    def reset_kv(self):
        self.pool[:] = 0

    def dispatch(self, s: StepInput, incoming=None, last: StepHandle | None = None,
                 token_src=None) -> StepHandle:
        self.dispatched += 1
        if incoming is not None:                      # "layered": written before any read
            self.scatter_pages(incoming.k, incoming.v, incoming.page_ids)
        tokens = np.asarray(s.token_ids, np.int64).copy()
        if token_src is not None:
            src = np.asarray(token_src)
            assert len(src) == len(tokens) and last is not None
            fed = src >= 0
            self.fed += int(fed.sum())
            tokens[fed] = np.asarray(last.tokens)[src[fed]]
        out = np.zeros(self.slots, np.int32)
        for i, kv_len in enumerate(s.kv_lens):
            a, b = int(s.cu_q_lens[i]), int(s.cu_q_lens[i + 1])
            table = s.page_table[i]
            for t in range(a, b):
                pos = int(s.positions[t])
                prev = 1 if pos == 0 else int(self.pool[table[(pos - 1) // self.ps],
                                                       (pos - 1) % self.ps])
                self.pool[table[pos // self.ps], pos % self.ps] = _mix(prev, int(tokens[t]))
            context = [self.pool[table[p // self.ps], p % self.ps] for p in range(int(kv_len))]
            out[i] = next_token(context)
        return StepHandle(out, len(s.kv_lens))

    def fetch(self, handle: StepHandle) -> np.ndarray:
        return np.asarray(handle.tokens)[:handle.num_seqs]

    def step(self, s, incoming=None):
        return self.fetch(self.dispatch(s, incoming))

    def copy_pages(self, pairs):
        sources = [self.pool[src].copy() for src, _ in pairs]
        for (_, dst), content in zip(pairs, sources):
            self.pool[dst] = content

    def _chunk(self, pages: np.ndarray) -> jnp.ndarray:          # [n, ps] -> k-like chunk
        return jnp.asarray(pages[None, :, :, None, None])

    def gather_pages(self, ids):
        chunks = []
        for i in range(0, len(ids), PAGE_CHUNK):
            part = self.pool[list(ids[i:i + PAGE_CHUNK])]
            chunks.append((self._chunk(part), self._chunk(part)))
        return chunks

    def stage_pages(self, k, v):
        return [(jnp.asarray(k[:, i:i + PAGE_CHUNK]), jnp.asarray(v[:, i:i + PAGE_CHUNK]))
                for i in range(0, k.shape[1], PAGE_CHUNK)]

    def scatter_staged(self, staged, ids):
        for n, (k, _) in enumerate(staged):
            for j, page in enumerate(ids[n * PAGE_CHUNK:(n + 1) * PAGE_CHUNK]):
                if page >= 0:
                    self.pool[page] = np.asarray(k)[0, j, :, 0, 0]

    def scatter_pages(self, k, v, ids):
        self.scatter_staged(self.stage_pages(k, v), ids)


def reference(engine: Engine, prompt, params: SamplingParams) -> list[int]:
    """A turn's tokens computed from scratch (the engine's stop rules)."""
    seq, out = list(prompt), []
    stops = engine.tokenizer.stop_token_ids
    while True:
        token = next_token(slot_chain(seq))
        out.append(token)
        seq.append(token)
        if token in params.stop_token_ids or (not params.ignore_eos and token in stops):
            return out
        if params.stop:
            text = engine.tokenizer.decode(out, skip_special_tokens=True)
            if any(s in text for s in params.stop):
                return out
        if len(out) >= params.max_tokens or len(seq) >= engine.max_model_len:
            return out


def fake_engine(overlap: bool, **options) -> tuple[Engine, FakeDevice]:
    opts = dict(max_model_len=64, page_size=4, max_batched_tokens=16, max_num_seqs=4,
                num_pages=40, precompile=False, overlap=overlap)
    opts.update(options)
    engine = Engine.from_pretrained("random:tiny", **opts)
    return engine, FakeDevice(engine)


def run_workload(engine: Engine, seed: int, clients: int = 6, turns: int = 4) -> dict:
    """Clients in threads: multi-turn conversations (named or anonymous, from shared system
    prompts), stop tokens, stop strings, cancels, ended conversations. Every finished turn must
    equal the reference; a cancelled one a prefix of it."""
    systems = [[random.Random(seed * 10 + i).randrange(1, 90) for _ in range(9)]
               for i in range(2)]
    errors: list[str] = []
    tally = {"finished": 0, "aborted": 0}
    lock = threading.Lock()

    def client(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        name = None if rng.random() < 0.3 else f"s{seed}-c{c}"
        history: list[int] = []
        for turn in range(turns):
            new = [rng.randrange(1, 90) for _ in range(rng.choice([1, 3, 6, 13]))]
            prompt = (list(rng.choice(systems)) if not history else history) + new
            if len(prompt) >= engine.max_model_len - 2:
                break
            kind = rng.random()
            params = SamplingParams(
                max_tokens=rng.choice([1, 2, 5, 9]), ignore_eos=True,
                stop_token_ids=(rng.randrange(LOW, HIGH + 1),) if kind < 0.3 else (),
                stop=("ab", "hh", "cd") if 0.3 <= kind < 0.5 else ())
            cancel_after = rng.choice([1, 2]) if rng.random() < 0.15 else None
            handle = engine.submit(prompt, params, conversation_id=name)
            got = []
            for event in handle:
                got.extend(event.token_ids)
                if cancel_after is not None and len(got) >= cancel_after:
                    handle.cancel()
                    cancel_after = None
            out = handle.result()
            want = reference(engine, prompt, params)
            with lock:
                if out.finish_reason == "abort":
                    tally["aborted"] += 1
                    if list(out.token_ids) != want[:len(out.token_ids)]:
                        errors.append(f"{name} turn {turn}: aborted {out.token_ids} != {want}")
                else:
                    tally["finished"] += 1
                    if list(out.token_ids) != want:
                        errors.append(f"{name} turn {turn}: {list(out.token_ids)} != {want}")
                if list(got) != list(out.token_ids):
                    errors.append(f"{name} turn {turn}: streamed {got} != {out.token_ids}")
            history = prompt + list(out.token_ids)
            if name is not None and rng.random() < 0.1:
                engine.end_conversation(name)
                history = []

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "turns never finished (engine loop died?)"
    assert not errors, errors[:5]
    return tally


CONFIGS = {
    "roomy": dict(),
    "tight": dict(num_pages=17, max_num_seqs=4),                  # preemption, eviction
    "stateless": dict(cache_policy="stateless", num_pages=24),
    # the simulated steps are so fast that "auto" would recompute rather than load
    "host": dict(num_pages=20, host_cache_bytes=12 * 2 * 2 * 4 * 2 * 16 * 4, chunk_tokens=4,
                 restore_policy="load"),
    "layered": dict(num_pages=20, host_cache_bytes=12 * 2 * 2 * 4 * 2 * 16 * 4, chunk_tokens=4,
                    swap_in="layered", restore_policy="load"),
    "one_seq": dict(max_num_seqs=1, max_batched_tokens=8, num_pages=18),
}


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_simulated_device_gives_the_reference_tokens(config, overlap):
    engine, device = fake_engine(overlap, **CONFIGS[config])
    try:
        tally = {"finished": 0, "aborted": 0}
        for seed in range(6):
            for key, n in run_workload(engine, seed + 100 * (config == "tight")).items():
                tally[key] += n
        stats = settle(engine)
        assert tally["finished"] > 20
        assert stats["failed_steps"] == 0
        assert stats["loop"]["overlap"] == overlap
        if overlap:      # decodes read their input token on the device, never via the host
            assert device.fed > 0
        else:
            assert device.fed == 0
        if config == "tight":
            assert stats["preemptions"] > 0
        if config in ("host", "layered"):
            assert stats["swap"]["in_pages"] > 0
        for cid in list(engine.store.conversations):
            engine.end_conversation(cid)
        stats = settle(engine)
        assert stats["pages"]["device"]["used"] == 0, stats["pages"]
    finally:
        engine.close()


def test_a_turn_finished_at_step_n_flushes_in_step_n_plus_1():
    """Overlapped, a turn whose last token is sampled at step N has its next decode already
    dispatched in N+1: that row is the turn's cache flush, so no further step runs for it and
    the next turn finds the whole history cached."""
    engine, device = fake_engine(True)
    try:
        prompt = list(range(1, 10))
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        first = engine.submit(prompt, params, conversation_id="f").result()
        settle(engine)
        # as synchronous: the prefill samples token 1, two decodes tokens 2 and 3, and the
        # flush computes token 3's KV (a decode dispatched before token 3 was known)
        assert device.dispatched == 4
        history = prompt + list(first.token_ids)
        second = engine.submit(history + [5], params, conversation_id="f").result()
        assert second.usage.cached_tokens == len(history)
        assert list(second.token_ids) == reference(engine, history + [5], params)
    finally:
        engine.close()


def test_stateless_turns_release_after_their_last_row():
    engine, _ = fake_engine(True, cache_policy="stateless", num_pages=16)
    try:
        for i in range(6):
            out = engine.submit(list(range(i + 1, i + 12)),
                                SamplingParams(max_tokens=4, ignore_eos=True)).result()
            assert list(out.token_ids) == reference(
                engine, list(range(i + 1, i + 12)), SamplingParams(max_tokens=4, ignore_eos=True))
        assert settle(engine)["pages"]["device"]["used"] == 0
    finally:
        engine.close()


# -- the real programs (random:tiny, float32) ------------------------------------------------

def tiny(overlap=True, policy="stateful", **kw) -> Engine:
    return make(policy, overlap=overlap, **kw)


def conversations(engine: Engine, n: int, seed: int, turns: int = 3, lo: int = 3, hi: int = 20,
                  params_for=None) -> dict:
    """n conversations at once, `turns` turns each; outputs per conversation."""
    results: dict = {}

    def run(i: int) -> None:
        rng = np.random.default_rng(seed * 100 + i)
        seq, outs = [], []
        for j in range(turns):
            seq = seq + [int(t) for t in rng.integers(0, 256, rng.integers(lo, hi))]
            params = params_for(i, j) if params_for else SamplingParams(max_tokens=8,
                                                                         ignore_eos=True)
            out = engine.submit(seq, params, conversation_id=f"conv-{seed}-{i}").result()
            outs.append((tuple(out.token_ids), out.finish_reason))
            seq = seq + list(out.token_ids)
        results[i] = outs

    in_threads(run, [(i,) for i in range(n)])
    return results


def mixed_params(i: int, j: int) -> SamplingParams:
    """Greedy turns with max_tokens, stop tokens, stop strings (bytes of random:tiny)."""
    kind = (i + j) % 4
    if kind == 0:
        return SamplingParams(max_tokens=3 + i, ignore_eos=True)
    if kind == 1:
        return SamplingParams(max_tokens=12, ignore_eos=True,
                              stop_token_ids=tuple(range(0, 256, 3)))
    if kind == 2:
        return SamplingParams(max_tokens=12, ignore_eos=True,
                              stop=tuple(chr(c) for c in range(97, 123, 2)))
    return SamplingParams(max_tokens=10, temperature=0.9, top_k=30, seed=7 + i, ignore_eos=True)


def test_overlap_on_equals_off_equals_stateless():
    engines = {"overlap": tiny(True), "sync": tiny(False),
               "stateless": tiny(True, "stateless")}
    try:
        got = {name: conversations(e, 5, seed=1, params_for=mixed_params)
               for name, e in engines.items()}
        assert got["overlap"] == got["sync"] == got["stateless"]
        reasons = {r for outs in got["overlap"].values() for _, r in outs}
        assert reasons == {"stop", "length"}
        loop = engines["overlap"].stats()["loop"]
        assert loop["overlap"] and loop["steps"] > 0
        # steady decode overlaps: most steps are not drained first
        assert loop["drains"] < loop["steps"] / 2, loop
        assert not engines["sync"].stats()["loop"]["overlap"]
    finally:
        for e in engines.values():
            e.close()


def test_cancel_mid_generation_overlapped():
    """A cancel while the overlapped loop runs ahead: the turn ends "abort" with exactly the
    tokens delivered (the stateless engine's), frees its slot, and the next turn continues from
    them with the cache."""
    engine, stateless = tiny(True), tiny(False, "stateless")
    try:
        prompt = list(range(30, 45))
        handle = engine.submit(prompt, SamplingParams(max_tokens=60, ignore_eos=True),
                               conversation_id="cancel-me")
        got = []
        for event in handle:
            got.extend(event.token_ids)
            if len(got) == 3:
                handle.cancel()
        out = handle.result()
        assert out.finish_reason == "abort" and list(out.token_ids) == got
        assert got == stateless.generate(prompt, SamplingParams(max_tokens=len(got),
                                                                 ignore_eos=True))
        assert settle(engine)["running"] == 0
        seq = prompt + list(out.token_ids) + [7, 8]
        nxt = engine.submit(seq, SamplingParams(max_tokens=8, ignore_eos=True),
                            conversation_id="cancel-me").result()
        # as synchronous: all but the last token sampled before the cancel (an aborted turn
        # runs no cache flush) and the two new ones
        assert nxt.usage.cached_tokens == len(seq) - 3
        assert list(nxt.token_ids) == stateless.generate(seq, SamplingParams(max_tokens=8,
                                                                             ignore_eos=True))
    finally:
        engine.close()
        stateless.close()


@pytest.mark.slow      # its pools compile their own programs (the simulated tests cover this fast)
def test_preemption_and_host_tier_overlapped_equal_synchronous():
    """A pool too small for 8 conversations (eviction, preemption), then the same with a host
    tier (swaps both ways): overlapped == synchronous."""
    page_bytes = 2 * 2 * 8 * 2 * 16 * 4
    for extra in (dict(num_pages=16), dict(num_pages=20, host_cache_bytes=24 * page_bytes,
                                          chunk_tokens=8)):
        engines = {"overlap": tiny(True, **extra), "sync": tiny(False, **extra)}
        try:
            got = {name: conversations(e, 8, seed=5, turns=2, lo=20, hi=40)
                   for name, e in engines.items()}
            assert got["overlap"] == got["sync"]
            stats = settle(engines["overlap"])
            assert stats["preemptions"] + stats["device_dropped_pages"] + \
                stats["swap"]["out_pages"] > 0
            if "host_cache_bytes" in extra:
                assert stats["swap"]["out_pages"] > 0
        finally:
            for e in engines.values():
                e.close()


def test_dispatch_reads_the_previous_steps_tokens_on_the_device():
    """Runner level: a decode fed from the step before on the device (token_src) equals the
    same decode with the token given by the host; the output is padded to max_num_seqs."""
    model = load_model("random:tiny", "float32")
    # the engines' configuration above: the same programs
    kw = dict(max_num_seqs=8, max_batched_tokens=16, max_model_len=128)
    runner = ModelRunner(model, 64, 8, **kw)

    def step(tokens, start, pages):
        n = len(tokens)
        return StepInput(
            token_ids=np.asarray(tokens, np.int32),
            positions=np.arange(start, start + n, dtype=np.int32),
            page_table=np.asarray([pages], np.int32),
            kv_lens=np.asarray([start + n], np.int32), cu_q_lens=np.asarray([0, n], np.int32),
            temperature=np.zeros(1, np.float32), top_k=np.zeros(1, np.int32),
            top_p=np.ones(1, np.float32), seeds=np.zeros(1, np.uint32),
            counters=np.zeros(1, np.int32))

    prompt = list(range(3, 13))
    first = runner.dispatch(step(prompt, 0, [1, 2]))
    assert first.tokens.shape == (8,)
    fed = runner.dispatch(step([0], 10, [1, 2]), last=first, token_src=np.asarray([0]))
    t1 = int(runner.fetch(first)[0])
    t2 = int(runner.fetch(fed)[0])
    again = ModelRunner(model, 64, 8, **kw)
    assert int(again.step(step(prompt, 0, [1, 2]))[0]) == t1
    assert int(again.step(step([t1], 10, [1, 2]))[0]) == t2
