"""Unified batching: every step mixes decode tokens of running turns with prefill chunks.

Each step, under `max_batched_tokens` and `max_num_seqs`:
  1. running turns, oldest first: a decode token, or the next chunk of an unfinished prefill
     (a turn that already finished runs its last sampled token once more so that its
     conversation's cache is complete for the next turn);
  2. waiting turns, first come first served, while budget and pages last.
Waiting turns whose prompt is better cached go first, within a fairness bound (Preble). A turn
whose pages come back from host memory is admitted one step before it runs: the copy overlaps
that step's compute and blocks no one.
When pages run short, idle conversations lose their cache first (by the eviction policy,
shared pages last), then the newest running turn is preempted: its pages are freed and it goes
back to the front of the queue to be recomputed. The oldest running turn can always proceed, so
there is no deadlock.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

from pensieve_jax.kvcache.conversations import ConversationStore, common_prefix
from pensieve_jax.kvcache.errors import ConversationBusy
from pensieve_jax.engine.errors import brief
from pensieve_jax.engine.batching import Row, fit_to_program, order_waiting
from pensieve_jax.engine.request import Request


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_batched_tokens: int = 512
    max_num_seqs: int = 64
    reserve_pages: int = 0      # new turns leave this many pages free for running ones
    fairness_steps: int = 16    # better-cached waiting turns may pass one for this many steps
    order_window: int = 128     # waiting turns considered for cache-aware ordering
    swap_in_same_step: bool = False   # swap-ins land inside the step that runs their turn
    token_buckets: tuple[int, ...] = ()   # the step programs' token counts (runner.ProgramSet):
                                          # a mixed step may end its last prefill chunk at one


class Scheduler:
    def __init__(self, config: SchedulerConfig, store: ConversationStore):
        self.config = config
        self.store = store
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.rejected: list[tuple[Request, Exception]] = []   # the engine fails these
        # set while a step is in flight (the engine's overlapped loop plans the next one): a
        # preemption then raises PreemptionNeeded instead, and the engine plans again once
        # that step is done (what was reserved or evicted until then stays valid)
        self.no_preemption = False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> list[Row]:
        rows: list[Row] = []
        budget = self.config.max_batched_tokens
        solo = next((r for r in self.running if r.isolated), None)   # runs alone (a failed
        for req in [solo] if solo else list(self.running):           # step's suspect)
            if budget == 0 or len(rows) >= self.config.max_num_seqs:
                break
            if req not in self.running or req.loading:   # preempted / its pages not back yet
                continue
            n = min(len(req.token_ids) - req.num_computed, budget)
            if self._make_room(req, req.num_computed + n, may_preempt=True):
                budget -= self._add_rows(rows, req, budget)
        self.waiting = order_waiting(self.waiting, self.store, self.config)
        deferred = []
        while self.waiting and budget > 0 and len(rows) < self.config.max_num_seqs and not solo:
            req = self.waiting.popleft()
            try:
                added = self._admit_waiting(req, rows, budget, deferred)
            except Exception:   # a bug: req stays queued, so the loop's failure path reaches it
                if req not in self.running:
                    self.waiting.appendleft(req)
                raise
            if added is None:
                break
            budget -= added
        self.waiting.extendleft(reversed(deferred))
        return fit_to_program(rows, self.config.token_buckets)

    def _admit_waiting(self, req: Request, rows: list[Row], budget: int,
                       deferred: list[Request]) -> int | None:
        """req, just taken off the front of the waiting queue, moves on: returns the tokens of
        the rows added for it (0: deferred, rejected, or it runs from a later step on), or None
        when admission stops here (req is back at the front)."""
        if req.conversation is None:
            try:
                if not bind_conversation(self.store, req):
                    deferred.append(req)      # its conversation's cache flush runs first
                    return 0
            except (ConversationBusy, ValueError) as e:     # busy, or another salt's
                self.rejected.append((req, e))
                return 0
        if not req.restored and not self._restore(req):
            self.waiting.appendleft(req)
            return None
        n = min(len(req.token_ids) - req.num_computed, budget)
        if not self._make_room(req, req.num_computed + n, may_preempt=False):
            self.waiting.appendleft(req)      # newcomers never preempt running turns
            return None
        self.running.append(req)
        if req.loading or req.isolated:       # it runs once its pages have landed (next
            return 0                          # step), or alone
        return self._add_rows(rows, req, budget)

    def _make_room(self, req: Request, num_tokens: int, may_preempt: bool) -> bool:
        """Reserve pages for req's first num_tokens tokens. Idle conversations go first (inside
        reserve), then waiting turns' pages, then (if allowed) the newest running turn. False if
        req cannot run this step."""
        extra = self.config.reserve_pages if not may_preempt and self.running else 0
        need = -(-num_tokens // self.store.page_size) - len(req.conversation.pages)
        while not (self.store.make_room(need + extra) and
                   self.store.reserve(req.conversation, num_tokens)):
            if self._drop_waiting_kv(req):
                continue
            if not may_preempt:
                return False
            if self.no_preemption:
                raise PreemptionNeeded(req.id)
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _add_rows(self, rows: list[Row], req: Request, budget: int) -> int:
        """Add req's rows within budget to rows (a step holds at most max_num_seqs rows: its
        program's sequences); returns the tokens they use."""
        added = request_rows(req, budget, self.config.max_num_seqs - len(rows))
        rows += added
        return sum(r.end - r.start for r in added)

    def _restore(self, req: Request) -> bool:
        """Bring the conversation's swapped-out, shared and dropped pages back before its
        first step (see ConversationStore.plan_restore)."""
        conv = req.conversation
        gained = self.store.attach_shared(conv, conv.token_ids)
        req.cached_shared += gained
        req.known_len = max(req.known_len, conv.num_computed)
        self.store.make_writable(conv)
        plan = self.store.plan_restore(conv)
        while not self.store.make_room(plan.new_pages):
            if self._drop_waiting_kv(req):
                continue
            if conv.cow is None or self.running:
                return False
            # nothing else will free a page: the one to copy from is the one too many, so
            # compute its tokens instead (a sequence as long as the pool would wait forever)
            self.store.truncate(conv, conv.cow[0] * self.store.page_size)
            plan = self.store.plan_restore(conv)
        # Usage counts prompt tokens only: after a preemption the sequence (and what is found
        # cached of it) can reach past the prompt into the turn's own output
        ps, reused = self.store.page_size, min(conv.num_computed, len(req.prompt))
        lo, hi = plan.front
        req.cached = reused - max(0, min(hi, reused) - lo)
        req.cached_host = sum(max(0, min(ps, reused - i * ps)) for i in conv.host_pages)
        req.cached_disk = sum(max(0, min(ps, reused - i * ps)) for i in conv.disk_pages)
        loads = self.store.restore(conv)
        req.loading = loads > 0 and not self.config.swap_in_same_step
        req.front_done, req.front_end = plan.front
        req.cached_shared += plan.shared_tokens
        req.restored = True
        return True

    def _drop_waiting_kv(self, keep: Request) -> bool:
        """Free the pages of admitted turns still waiting (newest first); False if none."""
        for other in reversed(self.waiting):
            if other is not keep and other.conversation is not None and other.conversation.pages:
                drop_kv(self.store, other)
                return True
        return False

    def _preempt(self, req: Request) -> None:
        self.num_preemptions += 1
        self.running.remove(req)
        drop_kv(self.store, req)
        if req.finished:                          # only its cache flush was left: give it up
            self.store.release(req.conversation, keep_kv=False)
        else:
            self.waiting.appendleft(req)

    def landed(self) -> None:
        """Every swap-in planned so far is in the device pools: those turns may run. That
        includes a turn restored but sent back to wait for room (it would wait forever)."""
        for req in itertools.chain(self.running, self.waiting):
            req.loading = False

    def finish(self, req: Request) -> None:
        self.running.remove(req)

    def remove(self, request_id: str) -> Request | None:
        """Take a request out of the queues (cancellation); None if it is not there, or if it
        has finished and only its cache flush is left (a cancel racing the turn's end)."""
        for queue_ in (self.running, self.waiting):
            for req in queue_:
                if req.id == request_id and not req.finished:
                    queue_.remove(req)
                    return req
        return None

    def requeue(self, req: Request) -> None:
        """req goes back to wait with its KV dropped (a failed step may have left it wrong)."""
        if req in self.running:
            self._preempt(req)
        elif req.conversation is not None:
            drop_kv(self.store, req)

    def discard(self, req: Request) -> None:
        """Take req out of the queues, finished or not (it failed)."""
        for queue_ in (q for q in (self.running, self.waiting) if req in q):
            queue_.remove(req)

    def abort_all(self) -> list[Request]:
        reqs = self.running + list(self.waiting)
        self.running, self.waiting = [], collections.deque()
        return reqs

    def report_stats(self) -> dict[str, int]:
        """A Reporter (model/reporting.py): running and waiting (turns, now), preemptions (so
        far)."""
        return {"running": len(self.running), "waiting": len(self.waiting),
                "preemptions": self.num_preemptions}


def request_rows(req: Request, budget: int, seats: int) -> list[Row]:
    """req's rows of a step, within budget tokens (> 0) and seats rows (>= 1): first the
    dropped prefix still to recompute, then (only once the prefix is complete in this step,
    and a seat is left) its next tokens."""
    rows: list[Row] = []
    if req.front_done < req.front_end:
        n = min(req.front_end - req.front_done, budget)
        rows.append(Row(req, req.front_done, req.front_done + n, False, front=True))
        budget -= n
        if req.front_done + n < req.front_end or seats <= 1:
            return rows
    n = min(len(req.token_ids) - req.num_computed, budget)
    if n > 0:
        start = req.num_computed
        rows.append(Row(req, start, start + n,
                        start + n == len(req.token_ids) and not req.finished))
    return rows


def bind_conversation(store: ConversationStore, req: Request) -> bool:
    """Bind the request to its conversation and reuse the longest cached prefix, its own
    or shared. False if the conversation's previous turn still has its cache flush to run
    (admit later)."""
    conv = store.get_or_create(req.requested_conversation, req.prompt, req.salt)
    if conv.busy:
        if conv.flushing:
            return False
        raise ConversationBusy(f"conversation {brief(conv.id)} has a turn in progress")
    conv.busy = True
    req.conversation = conv
    computed = common_prefix(conv.token_ids[:conv.num_computed], req.prompt)
    req.known_len = common_prefix(conv.token_ids, req.prompt)
    # the last prompt token always runs: its logits give the first output token
    store.truncate(conv, min(computed, len(req.prompt) - 1))
    conv.token_ids = list(req.prompt)
    req.cached_shared = min(conv.shared_tokens, conv.num_computed)    # a fork's pages
    conv.shared_tokens = 0
    return True


def drop_kv(store: ConversationStore, req: Request) -> None:
    """Free req's pages: its tokens are recomputed, after it is restored again on admission
    (reusing what others still hold)."""
    store.drop_kv(req.conversation)
    req.front_done = req.front_end = 0
    req.restored = req.loading = False
    req.reset_usage()


class PreemptionNeeded(Exception):
    """schedule() would preempt a running turn while no_preemption is set."""
