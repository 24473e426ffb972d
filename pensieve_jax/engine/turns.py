"""A turn's life on the engine, in one place: admitted (`admit`), queued (`add`), its rows
booked when a step is dispatched (`dispatched`), its sampled tokens put in place when the step
is fetched (`postprocess`: stop checks, streaming), then finished, aborted or failed, its
conversation released, and exactly one final event delivered to its handle.

    event                       the turn                         its conversation
    submit                      admit (counted, maybe refused)   -
    step dispatched             rows booked; a sampling row      num_computed advances; prompt
                                appends a placeholder            pages offered for sharing
    step fetched                placeholder -> token, streamed   -
    stop token / string, length finished, output delivered       flushing (one more row computes
                                                                 the last token's KV), or
                                                                 released (stateless, ended)
    cancel                      aborted, output delivered        released (keeps its tokens)
    failed step (one turn)      TurnFailed delivered             released (its KV dropped)
    failed step (with others)   isolated: requeued, runs alone   KV dropped (recomputed)
    close                       error delivered                  released (its KV dropped)

Between turns a conversation keeps its token history, the process's one copy, whatever its KV
went through: callers read and set it through engine/history.py (`Engine.history`).

A failed step fails only the turns it touched (`step_failed`): a step of one turn, or of a
turn already isolated, fails that turn; a step of several isolates each (they go back to wait
with their KV dropped and then run alone, so the next failure names the culprit). The KV of
every other conversation stays, unless the step took the pools with it (pools lost): then all
of it goes, and the running turns recompute theirs, as after a preemption.
"""

from __future__ import annotations

import logging
import threading
import time

from pensieve_jax.engine.config import EngineConfig
from pensieve_jax.engine.errors import EngineOverloaded, TurnFailed
from pensieve_jax.engine.request import Request, TokenEvent
from pensieve_jax.engine.scheduler import Row, Scheduler
from pensieve_jax.kvcache.conversations import ConversationStore
from pensieve_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PLACEHOLDER = 0    # a sampled token not fetched yet (the overlapped loop's Request.pending)
USAGE_COUNTERS = ("prompt_tokens", "cached_tokens", "cached_host_tokens", "cached_shared_tokens",
                  "prefilled_tokens", "recomputed_tokens", "completion_tokens")   # sums of Usage
COUNTERS = ("steps", "requests", "finished", *USAGE_COUNTERS, "step_tokens", "failed_steps")


class Turns:
    """The engine's turns (engine thread, but `admit` and `unfinished`: any thread).
    next_reqs: ids of the turns with a row in the step dispatched after the one being
    postprocessed (the overlapped loop sets it): such a turn is released when that is fetched."""

    def __init__(self, scheduler: Scheduler, store: ConversationStore, config: EngineConfig,
                 tokenizer: Tokenizer, max_model_len: int):
        self.scheduler, self.store, self.config = scheduler, store, config
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.next_reqs: set[int] = set()
        self._lock = threading.Lock()
        self._unfinished = 0              # admitted, no final event yet (guarded by _lock)

    def admit(self) -> None:
        """Count a new turn in, or raise EngineOverloaded (max_queued_requests)."""
        limit = self.config.max_queued_requests
        with self._lock:
            if limit is not None and self._unfinished >= limit:
                raise EngineOverloaded(f"{self._unfinished} requests in flight; the limit is "
                                       f"{limit} (max_queued_requests)")
            self._unfinished += 1

    def add(self, req: Request) -> None:
        self.counts["requests"] += 1
        try:
            req.text = self.tokenizer.text_stream()
            self.scheduler.add(req)
        except Exception as e:  # noqa: BLE001 - its caller hears of it; the engine goes on
            self.fail(req, e)

    def dispatched(self, rows: list[Row]) -> None:
        """Book what a step just dispatched computes (steps, page copies and gathers run on
        the device in dispatch order: whatever is dispatched later sees it). A row that
        samples appends a placeholder for its token (Request.pending) until it is fetched."""
        ps = self.config.page_size
        for i, row in enumerate(rows):
            req = row.request
            if req.failed:      # failed while this step was planned: nothing of it counts
                continue
            req.count_computed(row.start, row.end)
            if row.front:
                req.front_done = row.end
                continue
            req.conversation.num_computed = row.end
            if not req.output and row.end // ps > row.start // ps:
                self.store.register(req.conversation)      # prompt pages done: offer them
            if row.sample and not req.finished:
                req.token_ids.append(PLACEHOLDER)
                req.output.append(PLACEHOLDER)
                req.pending += 1
                req.pending_row = i

    def postprocess(self, row: Row, token: int) -> None:
        """A fetched step's row (booked by `dispatched`): its sampled token, stop checks."""
        req = row.request
        if row.front or req.failed:
            return
        if req.finished:        # the cache flush after a turn (overlapped: maybe a decode
            if row.end == len(req.token_ids):    # dispatched before the turn was done; its
                self.release(req)                # token is dropped)
            return
        if not row.sample:
            return
        # the placeholder `dispatched` appended (steps after this one have booked none yet)
        assert req.pending == 1 and row.end == len(req.token_ids) - 1, "placeholder out of step"
        req.pending = 0
        req.output[-1] = req.token_ids[-1] = token
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        piece = req.text.step(token)
        self._check_finish(req, token, len(piece))
        req.handle.put(TokenEvent((token,), None, piece))
        if req.finished:
            self._finish(req)

    def _check_finish(self, req: Request, token: int, new_chars: int) -> None:
        p = req.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.tokenizer.stop_token_ids):
            req.finish_reason = "stop"
        elif p.stop:            # a stop string ends in the new text: search only its tail
            text = req.text.text
            start = max(0, len(text) - new_chars - max(len(s) for s in p.stop) + 1)
            hits = [i for i in (text.find(s, start) for s in p.stop) if i >= 0]
            if hits:
                req.finish_reason, req.stop_text_index = "stop", min(hits)
        if not req.finished and (len(req.output) >= p.max_tokens or
                                 len(req.token_ids) >= self.max_model_len):
            req.finish_reason = "length"

    def _finish(self, req: Request) -> None:
        out = req.make_output()
        self._count(out)
        if ((self.config.cache_policy == "stateless" or req.conversation.id in self.store.closing)
                and id(req) not in self.next_reqs):
            self.release(req)
        else:   # stays running one more step to compute the last token's KV (the cache flush;
            # overlapped, maybe the step dispatched already: released once that is fetched)
            req.conversation.flushing = True
        self.deliver(req, TokenEvent((), out))

    def _count(self, out) -> None:
        self.counts["finished"] += 1
        for key in USAGE_COUNTERS:
            self.counts[key] += getattr(out.usage, key)

    def deliver(self, req: Request, final) -> None:
        """The last thing a request's handle receives: its output, or an exception."""
        with self._lock:
            self._unfinished -= 1
        req.handle.put(final)

    def abort(self, request_id: str) -> None:
        """Cancel a turn (queued or running); its conversation keeps what it computed."""
        req = self.scheduler.remove(request_id)
        if req is None or req.finished:
            return
        req.finish_reason = "abort"
        out = req.make_output()
        self._count(out)
        if req.conversation is not None:
            self.release(req, in_scheduler=False)
        self.deliver(req, TokenEvent((), out))

    def release(self, req: Request, in_scheduler: bool = True) -> None:
        if in_scheduler:
            self.scheduler.finish(req)
        conv = req.conversation
        if req.front_done < req.front_end:     # stopped while recomputing a dropped range
            self.store.truncate(conv, req.front_done)
        self.store.release(conv, keep_kv=self.config.cache_policy == "stateful")

    def fail(self, req: Request, error: BaseException) -> None:
        """req alone ends with TurnFailed (logged with its request id, error the cause); its
        conversation drops its KV. A step in flight with a row of it computes for nothing."""
        if req.failed:
            return
        log.error("turn %s failed: %s: %s", req.id, type(error).__name__, error, exc_info=error)
        req.failed = True
        self.scheduler.discard(req)
        self._drop_placeholders(req)
        if req.conversation is not None and req.conversation.busy:
            self.store.release(req.conversation, keep_kv=False)
        if not req.finished:
            req.finish_reason = "abort"
            failed = TurnFailed(f"internal error (request id {req.id})", req.id)
            failed.__cause__ = error
            self.deliver(req, failed)

    def step_failed(self, reqs: list[Request], error: BaseException, pools_lost: bool,
                    incoming_pages=()) -> None:
        """A step of reqs failed (see the module docstring). incoming_pages: device pages it was
        to load from host (their holders lose their KV too); pools_lost: every KV is gone."""
        self.counts["failed_steps"] += 1
        suspects = [r for r in dict.fromkeys(reqs) if not r.failed]
        pages = set(incoming_pages)
        live = [r for r in self.scheduler.running + list(self.scheduler.waiting)
                if r.conversation is not None]
        hit = live if pools_lost else [r for r in live if r in suspects or
                                       pages.intersection(r.conversation.pages)]
        for req in hit:
            self._drop_placeholders(req)
            self.scheduler.requeue(req)
        if pools_lost:
            for conv in self.store.conversations.values():
                self.store.truncate(conv, 0)
        for req in suspects:
            if len(suspects) == 1 or req.isolated:
                self.fail(req, error)
            else:
                req.isolated = True
        log.warning("a step of %d turns failed (%s: %s); %s", len(suspects),
                    type(error).__name__, error, "every conversation's KV is lost" if pools_lost
                    else f"{len(hit)} turns recompute their KV")

    def _drop_placeholders(self, req: Request) -> None:
        """The placeholders of a step that will never be fetched."""
        if req.pending:
            del req.token_ids[-req.pending:], req.output[-req.pending:]
            req.pending = 0

    def fail_all(self, error: Exception) -> None:
        """Every turn queued or running ends with error; their conversations drop their KV."""
        for req in self.scheduler.abort_all():
            self._drop_placeholders(req)
            if req.conversation is not None:
                self.store.release(req.conversation, keep_kv=False)
            if not req.finished:
                self.deliver(req, error)

    def end_all(self, error: Exception) -> None:
        """(at close) Every turn queued or running ends with error."""
        for req in self.scheduler.abort_all():
            if not req.finished:
                self.deliver(req, error)

    def report_stats(self) -> dict[str, int]:
        """A Reporter (model/reporting.py): the counters (COUNTERS), as top-level entries."""
        return dict(self.counts)
