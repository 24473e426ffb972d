"""Seeded, model-free fuzz of the scheduler, the conversation store and the prefix index.

`SimEngine` does to the bookkeeping what `Engine.step` does (land last step's swap-ins ->
schedule -> start the copies: device -> host, copy on write, host -> device staged -> compute
the rows -> postprocess -> swap out ahead), with the engine's `_abort` / `_release` / `_end`
and the TTL expiry between steps, but no model: each KV slot holds a hash of the token prefix
it was computed for, copies move those hashes, and every row's whole context is checked
against the tokens its conversation holds (cached path == recompute); sampled tokens are a
function of the last slot read, checked against a from-scratch reference. Clients send
multi-turn conversations, anonymous resends, shared system prompts, cache salts, edited
histories, cancellations (also racing a turn's end), concurrent and wrong-salt turns, and end
conversations, into small device and host pools under both eviction policies.

Invariants, every step: reference counts equal holders (device pages, copy-on-write sources,
host pages), free lists exact; holders of a page share a salt; a row only writes a page its
conversation holds alone (a fork's copy-on-write reference to a slot it does not use aside);
rows are runnable, within budgets, have their device pages, front range first; every page a
conversation or the index points at holds the KV of its tokens; busy iff a turn is admitted;
progress (no empty steps with nothing landing, no turn redoing work forever); every turn
finishes with the reference's tokens and consistent usage; ending everything frees every page
and index node.

Not modelled: the model's numerics, stop strings and the tokenizer, `_fail_all`, KV export /
import (kv_transfer, `Engine.settle_copies`), multi-threaded submission (events arrive between
steps, as the engine's inbox delivers them), measured load-or-recompute rates (a random or
fixed predicate instead), the runner's padding and buckets.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from pensieve_jax.kvcache import conversations as conversations_module
from pensieve_jax.kvcache import eviction as eviction_module
from pensieve_jax.kvcache import prefix_index as prefix_index_module
from pensieve_jax.kvcache.pages import PageAllocator
from pensieve_jax.model.config import PRESETS
from pensieve_jax.kvcache.conversations import ConversationStore
from pensieve_jax.kvcache.eviction import LRUPolicy, PensievePolicy
from pensieve_jax.engine.request import Request
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.engine.scheduler import Scheduler, SchedulerConfig

VOCAB = 40
STOP = 0                # a stop token (some turns end early)
MAX_STALL = 2           # steps in a row with work, no rows and nothing landing


class FakeClock:
    """time.monotonic for the store, the policies and the index: deterministic runs."""

    def __init__(self):
        self.now = 1e6

    def monotonic(self) -> float:
        self.now += 1e-4
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    for module in (conversations_module, eviction_module, prefix_index_module):
        monkeypatch.setattr(module, "time", c)
    return c


_HASHES: dict[tuple, list[int]] = {}


def prefix_hashes(tokens) -> list[int]:
    """h[p]: the simulated KV of position p, a hash of tokens[:p + 1]."""
    key = tuple(tokens)
    out = _HASHES.get(key)
    if out is None:
        out, h = [], 17
        for t in key:
            h = (h * 1000003 + t + 1) % (1 << 61)
            out.append(h)
        if len(_HASHES) > 50_000:
            _HASHES.clear()
        _HASHES[key] = out
    return out


def fake_token(kv: int) -> int:
    """The 'model': the next token is a function of the last KV slot it reads."""
    return (kv >> 11) % VOCAB


def reference(prompt: list[int], params: SamplingParams, max_model_len: int) -> list[int]:
    """What a turn must produce, computed from scratch (the stateless path)."""
    seq, out = list(prompt), []
    while True:
        token = fake_token(prefix_hashes(seq)[-1])
        out.append(token)
        seq.append(token)
        if (token in params.stop_token_ids or len(out) >= params.max_tokens or
                len(seq) >= max_model_len):
            return out


@dataclasses.dataclass
class SimConfig:
    page_size: int = 4
    num_pages: int = 24
    host_pages: int = 0
    policy: str = "lru"
    chunk_pages: int = 2
    sharing: bool = True
    stateless: bool = False
    max_batched_tokens: int = 16
    max_num_seqs: int = 4
    reserve_pages: int = 0
    fairness_steps: int = 16
    order_window: int = 128
    swap_out_threshold: float = 0.25
    restore: str = "none"          # recompute_cheaper: none, load, recompute, random
    max_model_len: int = 64
    ttl: float | None = None
    layered: bool = False          # swap_in="layered": swap-ins land inside the step
    token_buckets: tuple = ()      # the step programs: mixed steps may cut their last chunk

    @classmethod
    def random(cls, rng: random.Random) -> "SimConfig":
        ps = rng.choice([2, 4, 4, 8])
        max_model_len = rng.choice([24, 40, 64])
        min_pages = -(-max_model_len // ps)
        stateless = rng.random() < 0.1
        return cls(
            page_size=ps, num_pages=min_pages + rng.choice([0, 0, 1, 3, min_pages]),
            host_pages=rng.choice([0, 0, 2, 5, 3 * min_pages]),
            policy=rng.choice(["lru", "pensieve"]), chunk_pages=rng.choice([1, 2, 3]),
            sharing=rng.random() < 0.8, stateless=stateless,
            max_batched_tokens=rng.choice([1, 3, 8, 16, 64]), max_num_seqs=rng.choice([1, 2, 4, 8]),
            reserve_pages=rng.choice([0, 0, 1, 2, min_pages // 2]),
            fairness_steps=rng.choice([0, 2, 16]), order_window=rng.choice([1, 3, 128]),
            swap_out_threshold=rng.choice([0.0, 0.25, 0.6]),
            restore=rng.choice(["none", "load", "recompute", "random"]),
            max_model_len=max_model_len, ttl=rng.choice([None, None, None, 0.05]),
            token_buckets=rng.choice([(), (1, 2, 3, 5, 8, 13, 21, 34, 55, 64)]))


class SimEngine:
    """Engine.step and the engine's between-step handlers, over a simulated KV pool."""

    def __init__(self, cfg: SimConfig, seed: int = 0):
        self.cfg = cfg
        ps = self.ps = cfg.page_size
        self.allocator = PageAllocator(cfg.num_pages)
        self.host_allocator = PageAllocator(cfg.host_pages) if cfg.host_pages else None
        policy = PensievePolicy(PRESETS["tiny"]) if cfg.policy == "pensieve" else LRUPolicy()
        self.store = ConversationStore(self.allocator, ps, self.host_allocator, policy,
                                       cfg.chunk_pages, sharing=cfg.sharing and not cfg.stateless)
        if cfg.host_pages and cfg.restore != "none":
            pick = random.Random(seed)
            self.store.recompute_cheaper = {
                "load": lambda first, n: False, "recompute": lambda first, n: True,
                "random": lambda first, n: pick.random() < 0.5}[cfg.restore]
        self.scheduler = Scheduler(SchedulerConfig(
            cfg.max_batched_tokens, cfg.max_num_seqs, cfg.reserve_pages, cfg.fairness_steps,
            cfg.order_window, swap_in_same_step=cfg.layered,
            token_buckets=cfg.token_buckets), self.store)
        self.device = [[None] * ps for _ in range(cfg.num_pages)]   # simulated KV per slot
        self.host = [[None] * ps for _ in range(max(cfg.host_pages, 1))]
        self.landing = None          # (swap-ins, host contents read), lands at the next step
        self.delivered: dict[str, tuple] = {}      # request id -> ("output" | "error", info)
        self.usage: dict = {}                      # request id -> Usage of a finished turn
        self.preempted: set[str] = set()
        preempt = self.scheduler._preempt

        def note_preemption(req: Request) -> None:
            self.preempted.add(req.id)
            preempt(req)
        self.scheduler._preempt = note_preemption
        self.stalled = 0
        # progress: steps in a row with work in which no turn got further than ever before
        self.best: dict[str, tuple[int, int]] = {}
        self.unproductive, self.progressed = 0, False
        self.max_unproductive = 3 * -(-cfg.max_model_len // cfg.max_batched_tokens) + 10
        self.steps = self.rows_run = 0

    # -- the step (Engine.step) ---------------------------------------------------------------

    def step(self) -> int:
        self.land()
        self.check_pages()
        self.check_contents(host=False)
        rows = self.last_rows = self.scheduler.schedule()
        for req, error in self.scheduler.rejected:
            self.deliver(req, ("error", type(error).__name__))
        self.scheduler.rejected.clear()
        self.transfer()
        self.check_pages()
        self.check_contents(host=True)
        self.steps += 1
        if not rows:
            self.check_stall()
            self.check_progress()
            return 0
        self.stalled = 0
        tokens = self.compute(rows)
        for row, token in zip(rows, tokens):
            self.postprocess(row, token)
        self.store.swap_out_ahead(int(self.cfg.swap_out_threshold * self.allocator.num_pages))
        self.check_pages()
        self.check_progress()
        self.rows_run += len(rows)
        return len(rows)

    def land(self) -> None:
        """Engine._land: skip pages whose conversation let them go meanwhile."""
        if self.landing is None:
            return
        into, contents = self.landing
        self.landing = None
        for s, content in zip(into, contents):
            pages = s.conversation.pages
            if s.index < len(pages) and pages[s.index] == s.device_page:
                self.device[s.device_page] = list(content)
        self.scheduler.landed()

    def transfer(self) -> None:
        """Swapper.start: device -> host, device -> device (sources read before any write),
        then host -> device staged to land at the next step (or, layered, in this one)."""
        out, copies, into = self.store.take_transfers()
        for d, h in out:
            self.host[h] = list(self.device[d])
        sources = [list(self.device[s]) for s, _ in copies]
        for (_, d), content in zip(copies, sources):
            self.device[d] = content
        if into:
            self.landing = (into, [list(self.host[s.host_page]) for s in into])
            self.store.swapped_in([s.host_page for s in into])
            if self.cfg.layered:     # written before any layer of this step reads the pools
                self.land()

    def check_stall(self) -> None:
        if not self.scheduler.has_work() or self.landing is not None:
            self.stalled = 0
            return
        self.stalled += 1
        sched = self.scheduler
        assert self.stalled <= MAX_STALL, (
            f"no progress for {self.stalled} steps: running "
            f"{[(r.id, r.loading, r.restored) for r in sched.running]}, waiting "
            f"{[(r.id, r.loading, r.restored, r.conversation is not None) for r in sched.waiting]}")

    def check_progress(self) -> None:
        """Rows that only redo work (a turn preempting itself forever) are no progress either:
        some turn must get further than it ever got (tokens sampled, then KV computed)."""
        progress, self.progressed = self.progressed, False      # a turn delivered
        for req in self.scheduler.running:
            key = (len(req.output), req.front_done + req.conversation.num_computed)
            if key > self.best.get(req.id, (-1, -1)):
                self.best[req.id] = key
                progress = True
        if progress or not self.scheduler.has_work() or self.landing is not None:
            self.unproductive = 0
            return
        self.unproductive += 1
        running = [(r.id, r.num_computed, len(r.token_ids)) for r in self.scheduler.running]
        assert self.unproductive <= self.max_unproductive, (
            f"livelock: {self.unproductive} steps without progress; running {running}, "
            f"{self.scheduler.num_preemptions} preemptions")

    def compute(self, rows) -> list[int]:
        """The 'model': rows write the KV of their tokens, then read their whole context."""
        ps = self.ps
        self.check_rows(rows)
        holders = self.device_holders()
        for r in rows:
            conv = r.request.conversation
            want = prefix_hashes(conv.token_ids)
            for pos in range(r.start, r.end):
                page = conv.pages[pos // ps]
                # Held by conv alone, but for copy-on-write references of forks whose KV in
                # the page ends before pos (a fork of a flushing conversation copies the page
                # its last token is being written into; the slot is not theirs).
                others = [c for c in holders[page] if c != conv.id and not (
                    c.endswith("(cow)") and self.store.conversations[c[:-5]].num_computed <= pos)]
                assert holders[page].count(conv.id) == 1 and not others, (
                    f"row {r.start}:{r.end} of {conv.id} writes position {pos} into page {page} "
                    f"held by {holders[page]}: no copy on write")
                self.device[page][pos % ps] = want[pos]
        tokens = []
        for r in rows:
            conv = r.request.conversation
            got = self.read(conv, r.end)
            want = prefix_hashes(conv.token_ids)[:r.end]
            if got != want:
                bad = next(i for i in range(r.end) if got[i] != want[i])
                raise AssertionError(
                    f"row {r.start}:{r.end} (front={r.front}) of {conv.id} reads wrong KV at "
                    f"position {bad} (page {conv.pages[bad // ps]}); pages {conv.pages}")
            tokens.append(fake_token(got[-1]))
        return tokens

    def read(self, conv, end: int) -> list:
        ps, out = self.ps, []
        for i in range(-(-end // ps)):
            out.extend(self.device[conv.pages[i]][:min(ps, end - i * ps)])
        return out

    def postprocess(self, row, token: int) -> None:
        """Engine._postprocess."""
        req = row.request
        req.count_computed(row.start, row.end)
        if row.front:
            req.front_done = row.end
            return
        req.conversation.num_computed = row.end
        if not req.output and row.end // self.ps > row.start // self.ps:
            self.store.register(req.conversation)
        if req.finished:
            if row.end == len(req.token_ids):
                self.release(req)
            return
        if not row.sample:
            return
        req.output.append(token)
        req.token_ids.append(token)
        p = req.params
        if token in p.stop_token_ids:
            req.finish_reason = "stop"
        elif len(req.output) >= p.max_tokens or len(req.token_ids) >= self.cfg.max_model_len:
            req.finish_reason = "length"
        if req.finished:
            self.finish(req)

    def finish(self, req: Request) -> None:
        """Engine._finish."""
        self.usage[req.id] = req.make_output().usage
        if self.cfg.stateless or req.conversation.id in self.store.closing:
            self.release(req)
        else:
            req.conversation.flushing = True
        self.deliver(req, ("output", req.finish_reason))

    def release(self, req: Request, in_scheduler: bool = True) -> None:
        """Engine._release."""
        if in_scheduler:
            self.scheduler.finish(req)
        conv = req.conversation
        if req.front_done < req.front_end:
            self.store.truncate(conv, req.front_done)
        self.store.release(conv, keep_kv=not self.cfg.stateless)

    def deliver(self, req: Request, final: tuple) -> None:
        assert req.id not in self.delivered, f"{req.id} delivered twice"
        self.delivered[req.id] = final
        self.progressed = True

    # -- between steps (the engine's inbox) ---------------------------------------------------

    def submit(self, req: Request) -> None:
        self.scheduler.add(req)

    def abort(self, request_id: str) -> None:
        """Engine._abort."""
        req = self.scheduler.remove(request_id)
        if req is None or req.finished:
            return
        req.finish_reason = "abort"
        if req.conversation is not None:
            self.release(req, in_scheduler=False)
        self.deliver(req, ("output", "abort"))

    def end(self, conversation_id: str) -> bool:
        """Engine.end_conversation."""
        return self.store.end(conversation_id)

    # -- invariants ---------------------------------------------------------------------------

    def device_holders(self) -> dict[int, list[str]]:
        holders: dict[int, list[str]] = {p: [] for p in range(self.allocator.num_pages)}
        for conv in self.store.conversations.values():
            for p in conv.pages:
                if p >= 0:
                    holders[p].append(conv.id)
            if conv.cow is not None:
                holders[conv.cow[1]].append(conv.id + "(cow)")
        return holders

    def requests_by_conversation(self) -> dict[int, Request]:
        out: dict[int, Request] = {}
        for req in list(self.scheduler.running) + list(self.scheduler.waiting):
            if req.conversation is not None:
                assert id(req.conversation) not in out, (
                    f"two admitted turns in conversation {req.conversation.id}")
                out[id(req.conversation)] = req
        return out

    def check_allocator(self, alloc: PageAllocator, holders: dict[int, list], tier: str) -> None:
        free = alloc._free
        assert len(set(free)) == len(free), f"{tier}: a page is on the free list twice"
        used = [p for p in range(alloc.num_pages) if alloc.ref_count(p) > 0]
        assert len(free) + len(used) == alloc.num_pages, f"{tier}: free + used != total"
        assert set(free) == {p for p in range(alloc.num_pages) if alloc.ref_count(p) == 0}
        for p in range(alloc.num_pages):
            assert alloc.ref_count(p) == len(holders[p]), (
                f"{tier} page {p}: {alloc.ref_count(p)} references, held by {holders[p]}")

    def check_pages(self) -> None:
        """Reference counts equal holders (device: pages and copy-on-write sources; host:
        host pages); holders of a page share a cache salt; a page is in one tier per
        conversation; busy iff a turn is admitted."""
        device = self.device_holders()
        self.check_allocator(self.allocator, device, "device")
        tiers = [device]
        if self.host_allocator is not None:
            holders: dict[int, list] = {p: [] for p in range(self.host_allocator.num_pages)}
            for conv in self.store.conversations.values():
                for h in conv.host_pages.values():
                    holders[h].append(conv.id)
            self.check_allocator(self.host_allocator, holders, "host")
            tiers.append(holders)
        convs = self.store.conversations
        for holders in tiers:
            for p, ids in holders.items():
                salts = {convs[c.removesuffix("(cow)")].salt for c in ids}
                assert len(salts) <= 1, f"page {p} shared across cache salts: {ids}"
        reqs = self.requests_by_conversation()
        for conv in self.store.conversations.values():
            assert all(conv.pages[i] == -1 for i in conv.host_pages), f"{conv.id}: two tiers"
            if conv.cow is not None:
                assert conv.pages[conv.cow[0]] == -1, f"{conv.id}: cow page also on device"
            req = reqs.get(id(conv))
            assert conv.busy == (req is not None), f"{conv.id}: busy={conv.busy}, turn {req}"
            if req is not None:
                assert conv.flushing == req.finished, f"{conv.id}: flushing={conv.flushing}"
        for req in self.scheduler.running:
            assert req.conversation is not None and req.restored
            assert req not in self.scheduler.waiting
        index = self.store.index
        if index is not None:
            for p, node in index._by_device.items():
                assert node.device == p and self.allocator.ref_count(p) > 0, f"index: page {p}"
            for h, node in index._by_host.items():
                assert node.host == h and self.store.host.ref_count(h) > 0, f"index: host {h}"

    def check_contents(self, host: bool) -> None:
        """Every page a conversation holds (device, or host after the transfers ran) holds the
        KV of the conversation's tokens, except a range being recomputed and pages still
        loading; every page the index points at holds the KV of its node's tokens."""
        ps = self.ps
        reqs = self.requests_by_conversation()
        for conv in self.store.conversations.values():
            req = reqs.get(id(conv))
            if req is not None and req.loading and not host:
                continue
            gap = (req.front_done, req.front_end) if req is not None else (0, 0)
            want = prefix_hashes(conv.token_ids)
            spots = ([(i, self.host[h]) for i, h in conv.host_pages.items()] if host else
                     [(i, self.device[p]) for i, p in enumerate(conv.pages) if p >= 0])
            if conv.cow is not None and not host:
                spots.append((conv.cow[0], self.device[conv.cow[1]]))
            for i, content in spots:
                for pos in range(i * ps, min((i + 1) * ps, conv.num_computed)):
                    if gap[0] <= pos < gap[1]:
                        continue
                    assert content[pos % ps] == want[pos], (
                        f"{'host' if host else 'device'} page {i} of {conv.id} (pages "
                        f"{conv.pages}, host {conv.host_pages}) holds the wrong KV at {pos}")
        index = self.store.index
        if index is None:
            return
        for page, node in (index._by_host if host else index._by_device).items():
            keys = []
            n = node
            while n.parent is not None:
                keys.append(n.key)
                n = n.parent
            tokens = [t for key in reversed(keys) for t in key]
            content = (self.host if host else self.device)[page]
            assert content == prefix_hashes(tokens)[-ps:], (
                f"index node of {len(tokens)} tokens points at {'host' if host else 'device'} "
                f"page {page} with other KV")

    def check_rows(self, rows) -> None:
        """runner.step_input's check, plus: rows of a turn are its front (recompute) range,
        then its next tokens from num_computed on, within the budgets."""
        ps = self.ps
        seen: dict[int, object] = {}
        assert len({id(r.request) for r in rows}) <= self.cfg.max_num_seqs
        assert len(rows) <= self.cfg.max_num_seqs          # the program's sequences
        assert sum(r.end - r.start for r in rows) <= self.cfg.max_batched_tokens
        for r in rows:
            req, conv = r.request, r.request.conversation
            assert req in self.scheduler.running and not req.loading, f"{req.id} not runnable"
            assert 0 <= r.start < r.end <= len(conv.token_ids), f"row {r.start}:{r.end}"
            n = -(-r.end // ps)
            assert n <= len(conv.pages) and min(conv.pages[:n]) >= 0, (
                f"scheduler bug: row {r.start}:{r.end} of {conv.id} lacks device pages "
                f"({conv.pages})")
            first = seen.get(id(req))
            if r.front:
                assert first is None and r.start == req.front_done and r.end <= req.front_end
                assert req.front_end <= conv.num_computed
            else:
                assert r.start == conv.num_computed, f"row starts at {r.start}"
                if first is not None:
                    assert first.front and first.end == req.front_end, "front after new tokens"
                else:
                    assert req.front_done == req.front_end, "new tokens before the front"
                assert r.sample == (r.end == len(conv.token_ids) and not req.finished)
            seen[id(req)] = r


# -- clients --------------------------------------------------------------------------------


@dataclasses.dataclass
class Client:
    name: str
    anonymous: bool
    salt: str
    generation: int = 0
    history: list[int] = dataclasses.field(default_factory=list)
    request: Request | None = None
    prompt: list[int] = dataclasses.field(default_factory=list)
    last_conversation: str | None = None     # the id its last reply named

    @property
    def conversation_id(self) -> str | None:
        return None if self.anonymous else f"{self.name}.{self.generation}"


class Workload:
    """Clients submitting turns, editing histories, cancelling and ending conversations."""

    def __init__(self, sim: SimEngine, rng: random.Random, num_clients: int, chaos: float = 1):
        self.sim, self.rng, self.chaos = sim, rng, chaos    # chaos: more edits, cancels, ends
        ml = sim.cfg.max_model_len
        self.systems = [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, ml // 2))]
                        for _ in range(3)]
        self.clients = [Client(f"c{i}", rng.random() < 0.3, rng.choice(["", "", "", "t1"]))
                        for i in range(num_clients)]
        self.ids = 0
        self.in_flight: dict[str, tuple[Client, Request]] = {}
        self.recent: list[str] = []          # finished requests a late cancel may race with
        self.finished_turns = self.aborted = self.rejected = 0
        self.usage_checked = self.preempted_checked = 0     # finished turns (preempted ones)

    def params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.rng.choice([1, 2, 3, 5, 8]),
                              stop_token_ids=(STOP,) if self.rng.random() < 0.5 else ())

    def next_prompt(self, c: Client) -> list[int]:
        rng, ml = self.rng, self.sim.cfg.max_model_len
        new = [rng.randrange(1, VOCAB) for _ in range(rng.choice([1, 2, 3, 5, 9]))]
        if c.history and rng.random() < 0.15 * self.chaos:   # an edited history, cut anywhere
            cut = rng.randrange(1, len(c.history) + 1)
            prompt = c.history[:cut] + new
        elif c.history:
            prompt = c.history + new
        else:
            prompt = list(rng.choice(self.systems)) + new
        if len(prompt) >= ml:                          # too long: start a new conversation
            if not c.anonymous:
                self.sim.end(c.conversation_id)
            c.generation += 1
            c.history = []
            prompt = (list(rng.choice(self.systems)) + new)[:ml - 1]
        return prompt

    def submit(self, c: Client) -> None:
        self.ids += 1
        c.prompt = self.next_prompt(c)
        req = Request(f"r{self.ids}", list(c.prompt), self.params(), 0, c.conversation_id, None,
                      c.salt)
        c.request = req
        self.in_flight[req.id] = (c, req)
        self.sim.submit(req)

    def events(self) -> None:
        rng, sim = self.rng, self.sim
        for c in self.clients:
            if c.request is None and rng.random() < 0.3:
                self.submit(c)
        if rng.random() < 0.03:           # a second turn into a busy conversation, or a salt
            c = rng.choice(self.clients)  # that does not match its conversation: rejected
            if not c.anonymous and c.request is not None:
                saved = (c.request, c.prompt)
                self.ids += 1
                bad = Request(f"r{self.ids}", list(c.prompt), self.params(), 0,
                              c.conversation_id, None, rng.choice([c.salt, c.salt + "x"]))
                self.in_flight[bad.id] = (None, bad)
                sim.submit(bad)
                c.request, c.prompt = saved
        if rng.random() < 0.08 * self.chaos and (self.in_flight or self.recent):
            pool = list(self.in_flight) + self.recent
            sim.abort(rng.choice(pool))
        if rng.random() < 0.04 * self.chaos:
            c = rng.choice(self.clients)
            cid = c.last_conversation if c.anonymous else c.conversation_id
            if cid is not None:
                sim.end(cid)
                if rng.random() < 0.5:
                    c.generation += 1
                    c.history = []
        if sim.cfg.ttl is not None:
            sim.store.expire(sim.cfg.ttl)

    def collect(self) -> None:
        """Hand delivered results to their clients and check outputs against recomputation."""
        ml = self.sim.cfg.max_model_len
        for rid in [r for r in self.in_flight if r in self.sim.delivered]:
            c, req = self.in_flight.pop(rid)
            kind, info = self.sim.delivered[rid]
            if kind == "error":
                self.rejected += 1
                assert info in ("ConversationBusy", "ValueError"), info
            else:
                want = reference(req.prompt, req.params, ml)
                if info == "abort":
                    self.aborted += 1
                    assert req.output == want[:len(req.output)], f"{rid}: wrong tokens"
                else:
                    self.finished_turns += 1
                    assert req.output == want, f"{rid}: {req.output} != {want} (recompute)"
                if info != "abort":     # preempted or not: the run that finished counts
                    self.check_usage(rid, req)
                assert req.cached_host <= req.cached
            if c is not None and c.request is req:
                c.request = None
                if kind == "output":
                    c.history = req.prompt + req.output
                    c.last_conversation = req.conversation and req.conversation.id
            self.recent = (self.recent + [rid])[-4:]

    def check_usage(self, rid: str, req: Request) -> None:
        """Usage of a finished turn: each prompt token once, cached or computed; prefilled is
        the prompt past what the conversation had known, also when a preemption made the turn
        compute it twice."""
        u, n = self.sim.usage[rid], len(req.prompt)
        assert u.cached_tokens + u.prefilled_tokens + u.recomputed_tokens == n, (
            f"{rid}: usage {u.cached_tokens}+{u.prefilled_tokens}+{u.recomputed_tokens} != {n} "
            f"prompt tokens ({'' if rid in self.sim.preempted else 'not '}preempted)")
        assert u.prefilled_tokens == n - min(req.known_len, n), (rid, u, req.known_len)
        assert u.cached_host_tokens <= u.cached_tokens and u.cached_shared_tokens <= u.cached_tokens
        self.usage_checked += 1
        self.preempted_checked += rid in self.sim.preempted


def run_fuzz(seed: int, steps: int = 300) -> dict:
    rng = random.Random(seed)
    cfg = dataclasses.replace(SimConfig.random(rng), layered=seed % 3 == 2)
    sim = SimEngine(cfg, seed)
    work = Workload(sim, rng, rng.choice([2, 4, 6, 10]), chaos=rng.choice([1, 1, 3]))
    for _ in range(steps):
        work.events()
        sim.step()
        work.collect()
    for _ in range(5000):                 # drain: every turn finishes
        if not sim.scheduler.has_work():
            break
        sim.step()
        work.collect()
    assert not sim.scheduler.has_work() and not work.in_flight, (
        f"turns never finished: {sorted(work.in_flight)}")
    sim.land()
    sim.check_pages()
    for cid in list(sim.store.conversations):      # ending everything frees every page
        assert sim.end(cid)
    assert sim.allocator.num_free == cfg.num_pages
    if sim.host_allocator is not None:
        assert sim.host_allocator.num_free == cfg.host_pages
    if sim.store.index is not None:
        assert sim.store.index.stats() == {"nodes": 0, "device_pages": 0, "host_pages": 0}
    return dict(cfg=cfg, steps=sim.steps, rows=sim.rows_run, finished=work.finished_turns,
                aborted=work.aborted, rejected=work.rejected,
                preempted_finished=work.preempted_checked,
                preemptions=sim.scheduler.num_preemptions, **sim.store.counts)


@pytest.mark.parametrize("seed", range(48))
def test_fuzz(clock, seed):
    stats = run_fuzz(seed)
    assert stats["finished"] > 0


# -- regressions the fuzz found, minimized ---------------------------------------------------

ONE = SamplingParams(max_tokens=1)


def run(sim: SimEngine, steps: int = 20) -> None:
    for _ in range(steps):
        sim.step()


def test_a_cancel_racing_the_end_of_a_turn_leaves_its_conversation_usable(clock):
    """The client cancels just after the final event (the turn still flushes its cache): the
    turn used to leave the scheduler while its conversation stayed busy, so the next turn
    waited forever."""
    sim = SimEngine(SimConfig())
    first = Request("r1", [1, 2, 3, 4, 5], ONE, 0, "c", None)
    sim.submit(first)
    sim.step()
    assert sim.delivered["r1"] == ("output", "length") and first.conversation.flushing
    sim.abort("r1")
    second = Request("r2", first.prompt + first.output + [7], ONE, 0, "c", None)
    sim.submit(second)
    run(sim)
    assert sim.delivered["r2"] == ("output", "length") and not sim.scheduler.has_work()
    assert second.cached == 6 and not second.conversation.busy


def test_a_turn_with_two_ranges_does_not_push_the_step_past_max_num_seqs(clock):
    """A returning turn recomputing a dropped front runs two ranges; the running loop used to
    compare rows with max_num_seqs by equality, so it stepped over the limit and let the next
    running turn in as well. Rows are the step program's sequences: with one left, the front
    range runs alone and the new tokens follow in the next step."""
    sim = SimEngine(SimConfig(num_pages=8, host_pages=1, chunk_pages=1, max_num_seqs=1,
                              max_batched_tokens=64, swap_out_threshold=0.0))
    a = Request("a", list(range(1, 16)), ONE, 0, "a", None)
    sim.submit(a)
    run(sim, 3)
    conv = a.conversation
    assert not conv.busy and conv.num_computed == 16
    assert sim.store.make_room(7)          # page 0, 1 dropped, page 2 on host, page 3 stays
    sim.transfer()
    assert conv.dropped == 2 and list(conv.host_pages) == [2] and conv.pages[3] >= 0
    back = Request("back", conv.token_ids + [9], ONE, 0, "a", None)
    other = Request("other", [5, 6, 7], SamplingParams(max_tokens=3), 0, "z", None)
    sim.submit(back)
    sim.submit(other)
    sim.step()                             # back restores (loading), other runs
    assert back.loading and [r.request.id for r in sim.last_rows] == ["other"]
    sim.step()                             # one row fits (the program's one sequence)
    assert [(r.request.id, r.front) for r in sim.last_rows] == [("back", True)]
    sim.step()
    assert [(r.request.id, r.front) for r in sim.last_rows] == [("back", False)]
    run(sim)
    assert sim.delivered["back"] == sim.delivered["other"] == ("output", "length")


def test_registering_pages_that_left_the_device_adds_no_dead_index_nodes():
    """A conversation registered while its last pages are on host or dropped used to leave
    nodes with no copy and no children, never pruned: the index grew forever."""
    from pensieve_jax.kvcache.prefix_index import PrefixIndex
    index = PrefixIndex(4)
    index.insert("", list(range(12)), [5, -1, -1])
    assert index.stats() == {"nodes": 1, "device_pages": 1, "host_pages": 0}
    index.insert("", list(range(12)), [-1, -1, 7])         # a gap before a copy stays
    assert index.stats()["nodes"] == 3
    index.forget_device(7)
    index.forget_device(5)
    assert index.stats() == {"nodes": 0, "device_pages": 0, "host_pages": 0}


def test_a_sequence_as_long_as_the_pool_restores_without_its_copy_on_write(clock):
    """Pool = one max_model_len sequence; a new conversation shares 3 whole pages and 1 token
    of the 4th (copy on write): with the source page held it needs a 5th page, so it used to
    wait forever with nothing running. Now it computes that page's tokens instead."""
    sim = SimEngine(SimConfig(page_size=4, num_pages=4, max_model_len=16))
    a = Request("a", list(range(1, 16)), ONE, 0, "a", None)
    sim.submit(a)
    run(sim, 3)
    assert a.conversation.num_computed == 16 and not a.conversation.busy
    b = Request("b", a.conversation.token_ids[:13] + [39, 38], ONE, 0, "b", None)
    sim.submit(b)
    run(sim, 5)
    assert sim.delivered["b"] == ("output", "length")
    assert b.output == reference(b.prompt, ONE, 16)


def test_a_turn_cancelled_before_its_copy_on_write_does_not_pin_the_source_page(clock):
    """A turn admitted with a page to copy on write, cancelled before it ran, left its idle
    conversation holding a reference eviction never takes back: with a pool of one
    max_model_len sequence, a long prompt then waited forever."""
    sim = SimEngine(SimConfig(page_size=4, num_pages=6, max_model_len=24))
    a = Request("a", list(range(1, 16)), ONE, 0, "a", None)
    sim.submit(a)
    run(sim, 3)
    x = Request("x", list(range(20, 26)), SamplingParams(max_tokens=5), 0, "x", None)
    sim.submit(x)
    sim.step()
    b = Request("b", a.conversation.token_ids[:13] + [39, 38], ONE, 0, "b", None)
    sim.submit(b)
    sim.step()                        # b shares a's pages, no room yet for its copy
    assert b.conversation.cow is not None and b in sim.scheduler.waiting
    sim.abort("b")
    run(sim)
    assert sim.delivered["x"] == ("output", "length")
    y = Request("y", list(range(1, 24))[::-1], ONE, 0, "y", None)   # needs all 6 pages
    sim.submit(y)
    run(sim)
    assert sim.delivered["y"] == ("output", "length")


def test_a_preempted_turn_counts_each_prompt_token_once(clock):
    """y prefills its 8 prompt tokens and samples 2, is preempted for x's pages, then computes
    them all again: its usage is that of the run that finished (8 prefilled), not 8 prefilled +
    8 recomputed, more than its prompt, as it used to be."""
    sim = SimEngine(SimConfig(page_size=4, num_pages=6, max_model_len=24,
                              max_batched_tokens=16))
    x = Request("x", list(range(1, 11)), SamplingParams(max_tokens=8), 0, "x", None)
    y = Request("y", list(range(11, 19)), SamplingParams(max_tokens=4), 0, "y", None)
    sim.submit(x)
    sim.submit(y)
    run(sim, 3)
    assert y.prefilled == 8 and len(y.output) == 2 and not sim.preempted
    run(sim)
    assert sim.preempted == {"y"} and sim.delivered["y"] == ("output", "length")
    u = sim.usage["y"]
    assert (u.prompt_tokens, u.cached_tokens, u.prefilled_tokens, u.recomputed_tokens) == \
        (8, 0, 8, 0)


def test_ending_a_conversation_whose_cache_flush_is_preempted_removes_it(clock):
    """end_conversation while the turn flushes its cache defers the removal to the store's
    release; when the flush is preempted instead, the scheduler releases the conversation
    itself, and the removal must still happen (it used to live in Engine._release only: the
    conversation stayed, and a later turn under the same id was dropped when it finished)."""
    sim = SimEngine(SimConfig(page_size=4, num_pages=6, max_model_len=24,
                              max_batched_tokens=32))
    x = Request("x", list(range(1, 11)), SamplingParams(max_tokens=8), 0, "x", None)
    c = Request("c", list(range(11, 23)), ONE, 0, "c", None)
    sim.submit(x)
    sim.submit(c)
    sim.step()
    assert c.conversation.flushing
    assert sim.end("c")
    run(sim)
    assert sim.scheduler.num_preemptions == 1 and not x.conversation.busy
    assert "c" not in sim.store.conversations and not sim.store.closing
