"""The engine's step: schedule -> run -> postprocess (engine thread only).

The overlapped loop (EngineConfig.overlap, on by default; off: schedule, run, postprocess one
after another). The host plans and dispatches step N+1 while the device runs step N, then
fetches and postprocesses N while the device runs N+1:

    host    | plan N+1 | dispatch N+1 | fetch N, postprocess N, book N+1 | plan N+2 | ...
    device  | ...... step N ......... | ........ step N+1 .......................| ...

- Booking (`Turns.dispatched`): when a step is dispatched, what it will have computed is booked at
  once (KV computed, prompt pages offered for sharing); each row that samples appends a
  placeholder to its turn's tokens (`Request.pending`). Planning N+1 thus sees every turn of N
  one token further; a decode row whose input is N's still unknown sample reads it on the
  device (`token_src`, from N's output: `ModelRunner.dispatch(..., last=N)`), never via host.
- Postprocessing N (`Turns.postprocess`) puts the sampled tokens in place of the placeholders, checks
  stop tokens, stop strings and lengths, streams, and finishes turns. A turn found finished at
  N has (unless the token budget left it out) had its N+1 row dispatched already: that row
  computes its last token's KV, the cache flush a finished turn runs (conversation.flushing);
  its sampled token is dropped. Stateless turns (and ended conversations) with such a row are
  released when N+1 is fetched, not before.
- Everything else drains first (`drain`: fetch and postprocess the step in flight, then plan
  with nothing in flight, like the synchronous loop): an empty plan, a plan that would preempt
  (the scheduler raises PreemptionNeeded first), and what the inbox brings but new turns.

Why freeing and reusing pages while a step is in flight is safe: the KV pools are donated into
every program that writes them (steps, page copies, swap-in scatters) and read by the others
(gathers), each taking the pools the one before returned, so the device runs them in the order
they are dispatched. A page is freed on the host only once every program that used it for its
old holder has been dispatched, and a program using it for a new holder is planned, so
dispatched, after the free:

    page freed (step N in flight)     old holder's programs               new holder's
    --------------------------------  ----------------------------------  ----------------
    idle conversation evicted or      steps <= N-1 (its cache flush was   copies and steps
    expired while planning N+1        fetched before it went idle); the   dispatched from
                                      swap-out gather: after N            N+1 on
    waiting turn's KV dropped         none in flight (no rows)            from N+1 on
    (planning N+1)
    stateless or ended turn finished  steps <= N                          from N+2 on
    at N, no row in N+1: released
    when N is fetched
    ... with a row in N+1 (its flush) steps <= N+1                        from N+3 on
    released when N+1 is fetched
    preempted turn                    never with a step in flight: the    after the drain
                                      plan is redone after a drain
    cancelled turn, ended conversa-   never with a step in flight: the    -
    tion, KV export / import          inbox drains first

Pages are also read while in flight: prompt pages booked (offered for sharing) at N's dispatch
are written by N, and what reads them (another turn's rows, a copy on write) comes after N.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax

from pensieve_jax.engine.config import EngineConfig
from pensieve_jax.engine.inflight import InFlight, token_sources
from pensieve_jax.engine.scheduler import PreemptionNeeded, Row, Scheduler
from pensieve_jax.engine.step_input import step_input
from pensieve_jax.engine.turns import Turns
from pensieve_jax.kvcache.conversations import ConversationStore
from pensieve_jax.kvcache.swap import Swapper
from pensieve_jax.kvcache.transfer_costs import TransferCosts
from pensieve_jax.runner.seam import Runner

log = logging.getLogger(__name__)


class StepLoop:
    """One engine step at a time (`step`), and what must drain first (`drain`).

    times: where the loop's time goes (seconds): plan_s (land swap-ins, schedule, build
    inputs, start page copies), run_s (synchronous: the step; overlapped: its dispatch), wait_s
    (overlapped: waiting for a step's tokens), post_s (postprocess, booking); drains: steps
    fetched before planning the next (preemption, inbox, ...); busy_fetches: steps still
    running when fetched (the host's work since their dispatch was hidden behind them)."""

    def __init__(self, config: EngineConfig, runner: Runner, scheduler: Scheduler,
                 store: ConversationStore, swapper: Swapper, rates: TransferCosts, turns: Turns,
                 num_pages: int):
        self.config, self.runner, self.scheduler = config, runner, scheduler
        self.store, self.swapper, self.rates, self.turns = store, swapper, rates, turns
        self.num_pages = num_pages
        self.inflight: InFlight | None = None     # overlap: the step the device is running
        self.times = {"steps": 0, "plan_s": 0.0, "run_s": 0.0, "wait_s": 0.0, "post_s": 0.0,
                      "drains": 0, "busy_fetches": 0}
        self._stalled_steps = 0              # steps in a row with work but nothing to run
        self._last_done = 0.0                # when the last fetched step was complete

    def idle(self) -> bool:
        """Nothing to run and nothing in flight: the engine thread may block."""
        return not self.scheduler.has_work() and self.inflight is None

    def step(self) -> int:
        """Land last step's swap-ins, schedule, start this step's copies, run, postprocess;
        returns the rows run. Overlapped (config.overlap): run is a dispatch, and what is
        postprocessed is the step dispatched before this one, which the device ran meanwhile."""
        start = time.perf_counter()
        try:
            self.land()
            rows = self._schedule()
        except Exception as e:  # a scheduler bug must not kill the loop silently
            log.exception("engine scheduling failed: every queued turn fails")
            self.fail_all(RuntimeError(f"engine scheduling failed: {type(e).__name__}: {e}"))
            return 0
        for req, error in self.scheduler.rejected:
            self.turns.deliver(req, error)
        self.scheduler.rejected.clear()
        prev, incoming = self.inflight, None
        try:
            self.swapper.start()
            if not rows:
                self.swapper.flush()
                if prev is not None:
                    self.drain()             # nothing to overlap it with
                else:
                    self._check_stall()
                return 0
            s = step_input(rows, self.config.page_size)
            src = None if prev is None else token_sources(rows)
            incoming = self.swapper.take_incoming()
            planned = time.perf_counter()
            if self.config.overlap:
                handle = self.runner.dispatch(s, incoming, prev and prev.handle, src)
            else:
                tokens = self.runner.step(s, incoming)
            ran = time.perf_counter()
        except Exception as e:  # noqa: BLE001 - only this step's turns fail
            self.step_failed(rows, e, prev, incoming)
            return 0
        self._stalled_steps = 0
        num_tokens = sum(r.end - r.start for r in rows)
        counts, times, turns = self.turns.counts, self.times, self.turns
        counts["steps"] += 1
        counts["step_tokens"] += num_tokens
        waited = times["wait_s"]
        if self.config.overlap:
            turns.next_reqs = {id(r.request) for r in rows}
            try:
                if prev is not None and not self.complete(prev):
                    return 0                 # its fetch failed: its turns failed
            finally:
                turns.next_reqs = set()
            turns.dispatched(rows)
            self.inflight = InFlight(rows, handle, planned, num_tokens)
        else:
            if num_tokens >= 16:      # prefill speed, for the load-or-recompute choice
                self.rates.prefill(ran - planned, num_tokens)
            turns.dispatched(rows)
            self.postprocess(rows, tokens)
        self.store.swap_out_ahead(int(self.config.swap_out_threshold * self.num_pages))
        times["steps"] += 1
        times["plan_s"] += planned - start
        times["run_s"] += ran - planned
        times["post_s"] += time.perf_counter() - ran - (times["wait_s"] - waited)
        return len(rows)

    def _schedule(self) -> list[Row]:
        """The next step's rows. With a step in flight, a plan that would preempt a running turn
        is given up (what it reserved or evicted stays valid) and made again once that step is
        fetched: a preempted turn must not have a row in flight."""
        if self.inflight is None:
            return self.scheduler.schedule()
        self.scheduler.no_preemption = True
        try:
            return self.scheduler.schedule()
        except PreemptionNeeded:
            pass
        finally:
            self.scheduler.no_preemption = False
        self.drain()
        return self.scheduler.schedule()

    def complete(self, f: InFlight) -> bool:
        """Fetch a dispatched step's tokens and postprocess it. False if the fetch failed (then
        every turn in flight has failed)."""
        if self.inflight is f:
            self.inflight = None
        start = time.perf_counter()
        ready = getattr(f.handle.tokens, "is_ready", None)
        self.times["busy_fetches"] += ready is not None and not ready()
        try:
            tokens = self.runner.fetch(f.handle)
        except Exception as e:  # noqa: BLE001 - its turns fail; the pools went with it
            self.step_failed(f.rows, e, lost=True)
            return False
        done = time.perf_counter()
        self.times["wait_s"] += done - start
        if f.num_tokens >= 16:    # prefill speed: from when the device could start it
            self.rates.prefill(done - max(f.dispatched, self._last_done), f.num_tokens)
        self._last_done = done
        self.postprocess(f.rows, tokens)
        return True

    def postprocess(self, rows: list[Row], tokens) -> None:
        """Each row's sampled token; a turn whose postprocessing fails fails alone."""
        for row, token in zip(rows, tokens):
            try:
                self.turns.postprocess(row, int(token))
            except Exception as e:  # noqa: BLE001 - that turn's fault only
                self.turns.fail(row.request, e)

    def step_failed(self, rows: list[Row], error: Exception, prev: InFlight | None = None,
                    incoming=None, lost: bool = False) -> None:
        """A step failed before it was booked: only its turns fail (Turns.step_failed). With
        the pools intact every other KV stays (the step in flight before it is fetched first)."""
        lost = lost or not pools_intact(self.runner.kv)
        if not lost and prev is not None and not self.complete(prev):
            lost = True                  # its fetch failed instead
        self.inflight = None
        if lost:
            self.swapper.drop()
            self.runner.reset_kv()
        pages = () if incoming is None else incoming.page_ids
        self.turns.step_failed([r.request for r in rows], error, lost, pages)

    def drain(self) -> None:
        """Fetch and postprocess the step in flight, if any: afterwards no turn has a row in
        flight nor a placeholder token."""
        if self.inflight is not None:
            self.times["drains"] += 1
            self.complete(self.inflight)

    def settle_copies(self) -> None:
        """Land the swap-ins started at the last step and start the copies planned since
        (KV export/import use it to read every page where it will be)."""
        self.land()
        self.swapper.start()
        self.swapper.flush()

    def land(self) -> None:
        """Last step's swap-ins go into the pools; their turns may run from now on."""
        if self.swapper.land():
            self.scheduler.landed()

    def _check_stall(self) -> None:
        """Work queued, nothing runnable and no copy in flight that would change that: a
        scheduler bug. Fail what is in flight with a clear error instead of spinning forever."""
        if not self.scheduler.has_work() or self.swapper.in_flight:
            self._stalled_steps = 0
            return
        self._stalled_steps += 1
        if self._stalled_steps >= 100:
            self._stalled_steps = 0
            self.fail_all(RuntimeError(
                "engine made no progress in 100 steps with turns queued (scheduler bug); "
                f"running {len(self.scheduler.running)}, waiting {len(self.scheduler.waiting)}"),
                pools_lost=False)

    def report_stats(self) -> dict[str, dict[str, Any]]:
        """A Reporter (model/reporting.py): loop, where its time goes (`times`) and whether it
        overlaps."""
        return {"loop": dict(self.times, overlap=self.config.overlap)}

    def fail_all(self, error: Exception, pools_lost: bool = True) -> None:
        """Fail every turn in flight (a scheduler bug); with pools_lost every conversation's
        cache goes too, else idle conversations keep theirs."""
        self.turns.counts["failed_steps"] += 1
        self.swapper.drop()
        self.inflight = None
        self.turns.fail_all(error)
        if pools_lost:
            for conv in self.store.conversations.values():
                self.store.truncate(conv, 0)
            self.runner.reset_kv()


def pools_intact(kv: Any) -> bool:
    """Whether a failed step left the KV pools usable: none deleted (donated into a program
    that did not return them) nor poisoned by a failed computation."""
    try:
        return not any(a.is_deleted() or not a.block_until_ready().is_ready()
                       for a in jax.tree_util.tree_leaves(kv) if isinstance(a, jax.Array))
    except Exception:  # noqa: BLE001 - a computation that failed
        return False
