"""The engine: a loop of schedule -> run -> postprocess over conversations that keep their cache.

Callers on any thread `submit` turns (or use `generate` / `session`); one background thread owns
all scheduling state and runs the steps, so requests join and leave at step boundaries.

The overlapped loop (EngineConfig.overlap, on by default; off: schedule, run, postprocess one
after another). The host plans and dispatches step N+1 while the device runs step N, then
fetches and postprocesses N while the device runs N+1:

    host    | plan N+1 | dispatch N+1 | fetch N, postprocess N, book N+1 | plan N+2 | ...
    device  | ...... step N ......... | ........ step N+1 .......................| ...

- Booking (`_dispatched`): when a step is dispatched, what it will have computed is booked at
  once (KV computed, prompt pages offered for sharing); each row that samples appends a
  placeholder to its turn's tokens (`Request.pending`). Planning N+1 thus sees every turn of N
  one token further; a decode row whose input is N's still unknown sample reads it on the
  device (`token_src`, from N's output: `ModelRunner.dispatch(..., last=N)`), never via host.
- Postprocessing N (`_postprocess`) puts the sampled tokens in place of the placeholders, checks
  stop tokens, stop strings and lengths, streams, and finishes turns. A turn found finished at
  N has (unless the token budget left it out) had its N+1 row dispatched already: that row
  computes the KV of its last token, which is exactly the cache flush a finished turn runs
  (conversation.flushing), so it is one; its sampled token is dropped. Stateless turns (and
  ended conversations) with such a row are released when N+1 is fetched, not before.
- Everything else drains first (`_drain`: fetch and postprocess the step in flight, then plan
  with nothing in flight, as the synchronous loop does): an empty plan, a plan that would
  preempt a running turn (the scheduler raises PreemptionNeeded before it preempts), and
  whatever the inbox brings except new turns: cancellations, end_conversation, KV export and
  import, stats, any `call()`.

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
are written by N, and whatever reads them (another turn's rows, a copy on write) is dispatched
after N.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import logging
import queue
import secrets
import threading
import time
import uuid
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pensieve_jax.runner import compile_cache
from pensieve_jax.runner.compile_watch import CompileWatch, progress_bar
from pensieve_jax.kvcache.pages import PageAllocator
from pensieve_jax.kvcache.conversations import ConversationStore
from pensieve_jax.engine.config import EngineConfig, page_bytes, page_shape, pool_pages
from pensieve_jax.engine.stats import COUNTERS, USAGE_COUNTERS, engine_stats
from pensieve_jax.kvcache.eviction import make_policy
from pensieve_jax.kvcache.host_cache import HostCache
from pensieve_jax.engine.request import Request, RequestHandle, TokenEvent, check_prompt
from pensieve_jax.runner.model_runner import (ModelRunner, StepHandle, single_decode_program, step_input,
                                 token_buckets)
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.engine.scheduler import PreemptionNeeded, Row, Scheduler, SchedulerConfig
from pensieve_jax.model.self_check import select_attention
from pensieve_jax.kvcache.swap import Swapper
from pensieve_jax.tokenizer import Tokenizer
from pensieve_jax.kvcache.transfer_costs import TransferCosts
from pensieve_jax.weights import DEFAULT_MODEL, LoadedModel, load_model

log = logging.getLogger(__name__)


PLACEHOLDER = 0    # a sampled token not fetched yet (the overlapped loop's Request.pending)


class _InFlight(NamedTuple):
    """A step dispatched and not yet fetched (the overlapped loop)."""
    rows: list[Row]
    handle: StepHandle
    dispatched: float        # perf_counter() when dispatched
    num_tokens: int


def _overlaps(fn: Callable[[], None]) -> Callable[[], None]:
    """Mark an inbox function that may run while a step is in flight (the loop drains the
    step before any other)."""
    fn.overlaps = True
    return fn


class EngineOverloaded(RuntimeError):
    """Too many unfinished requests (EngineConfig.max_queued_requests)."""


class EngineClosed(RuntimeError):
    """The engine was closed (Engine.close): it takes no more work; turns still queued or
    running when it closed end with this error."""


# Every engine not yet closed, without keeping any alive; closed at interpreter exit.
_open_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_open_engines() -> None:
    """An engine thread left inside a JAX call (a step in flight) when the interpreter
    finalizes is ended by CPython with pthread_exit as it takes the GIL back; the forced unwind
    through jaxlib's C++ frames aborts the process (exit 134, "FATAL: exception not
    rethrown"). atexit hooks run before that, last registered first: this one (this module
    imports JAX first) before JAX's own, which clear its backends."""
    for engine in list(_open_engines):
        try:
            engine.close()
        except Exception:  # exiting anyway; close the others
            pass


class Engine:
    _closed = False                      # close() ran (guarded by _lock)
    _owns_weights = False                # from_pretrained loaded them: close() frees them

    def __init__(self, model: LoadedModel, dtype="float32", config: EngineConfig = EngineConfig()):
        self.model = model
        self.config = config
        self.max_model_len = config.max_model_len or min(model.config.max_position_embeddings, 4096)
        num_pages = pool_pages(model, config, dtype, self.max_model_len)
        if num_pages * config.page_size < self.max_model_len:
            raise ValueError(f"KV pool of {num_pages} pages x {config.page_size} tokens cannot hold "
                             f"one sequence of max_model_len {self.max_model_len}")
        c = model.config
        self.allocator = PageAllocator(num_pages)
        shape, nbytes = page_shape(model, config), page_bytes(model, config, dtype)
        self.host = HostCache(config.host_cache_bytes // nbytes, shape, jnp.dtype(dtype))
        self.store = ConversationStore(
            self.allocator, config.page_size, self.host.allocator if self.host.enabled else None,
            make_policy(config.eviction_policy, c), max(1, config.chunk_tokens // config.page_size),
            sharing=config.prefix_sharing and config.cache_policy == "stateful")
        ladder = config.token_buckets or token_buckets(   # (with a 1-token program on CPU)
            config.max_batched_tokens, single=single_decode_program(jax.devices()[0].platform))
        self.scheduler = Scheduler(SchedulerConfig(
            config.max_batched_tokens, config.max_num_seqs,
            int(config.reserve_fraction * num_pages), config.fairness_steps,
            swap_in_same_step=config.swap_in == "layered", token_buckets=ladder), self.store)
        compile_cache.enable()
        # config.attention None: "pallas" on a GPU (self-checked against "xla" first, falling
        # back to it), else "xla"; stats() reports the choice (pensieve_jax/model/self_check.py)
        self.attention_choice = select_attention(config.attention, c, config.page_size, dtype,
                                                 config.tensor_parallel)
        self.runner = ModelRunner(
            model, num_pages, config.page_size, self.attention_choice.attention, dtype,
            tensor_parallel=config.tensor_parallel, max_num_seqs=config.max_num_seqs,
            max_batched_tokens=config.max_batched_tokens, max_model_len=self.max_model_len,
            token_ladder=ladder,
            layered_loads=config.swap_in == "layered" and self.host.enabled)
        self._rates = TransferCosts(nbytes, config.restore_policy)
        if self.host.enabled:
            if config.restore_policy == "auto":
                self._rates.calibrate(self.runner, shape, self.host.k.dtype)
            if config.restore_policy != "load":
                self.store.recompute_cheaper = self._rates.recompute_cheaper
        self.swapper = Swapper(self.runner, self.store, self.host, self._rates,
                               layered=config.swap_in == "layered")
        self._stalled_steps = 0              # steps in a row with work but nothing to run
        self._inflight: _InFlight | None = None    # overlap: the step the device is running
        self._next_reqs: set[int] = set()    # ids of turns with a row in the step after it
        self._last_done = 0.0                # when the last fetched step was complete
        # where the loop's time goes (seconds): plan_s (land swap-ins, schedule, build the
        # step's inputs, start page copies), run_s (synchronous: the step; overlapped: its
        # dispatch), wait_s (overlapped: waiting for a step's tokens), post_s (postprocess and
        # booking); drains: steps fetched before planning the next (preemption, inbox, ...);
        # busy_fetches: steps still running when fetched (all the host's work since their
        # dispatch was hidden behind them)
        self.loop = {"steps": 0, "plan_s": 0.0, "run_s": 0.0, "wait_s": 0.0, "post_s": 0.0,
                     "drains": 0, "busy_fetches": 0}
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._unfinished = 0                 # submitted, no final event yet (guarded by _lock)
        self.counts = dict.fromkeys(COUNTERS, 0)   # engine thread only; see stats()
        self._compiles = CompileWatch()      # any compile on the engine thread once ready
        self.warm_up_s: float | None = None
        _open_engines.add(self)
        if config.precompile_enabled:
            self.warm_up()

    @classmethod
    def from_pretrained(cls, source: str = DEFAULT_MODEL, dtype="float32", cache_dir=None,
                        **options) -> "Engine":
        """source: a .gguf path, a Hugging Face directory, a converted (orbax) directory,
        random:<preset>, or the alias smollm2-135m-instruct. options: EngineConfig fields."""
        fields = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = set(options) - fields
        if unknown:
            raise TypeError(f"unknown engine options {sorted(unknown)} (known: {sorted(fields)})")
        config = EngineConfig(**options)
        engine = cls(load_model(source, dtype, cache_dir), dtype, config)
        engine._owns_weights = True
        # the runner holds the weights as its programs take them (copies where its layout or
        # mesh differs from the loaded one): keep those, not the loaded tree beside them
        engine.model = engine.model._replace(params=engine.runner.params)
        return engine

    def warm_up(self) -> None:
        """Compile every program the engine can run (runner.ProgramSet, page copies) on the
        engine thread, before any request; turns submitted meanwhile wait behind it. Logs a
        line per program. Idempotent. After it, `ready` is True and any compile on the engine
        thread is a bug: logged as a warning and counted in stats()["programs"]."""
        if self.runner.ready:
            return
        self.call(self._warm_up)

    def _warm_up(self) -> None:
        if self.runner.ready:
            return
        start = time.perf_counter()
        total = len(self.runner.programs.shapes)
        bar = progress_bar(total, "compiling step programs")
        done = iter(range(1, total + 1))

        def compiled(shape, seconds: float) -> None:
            log.info("step program %d/%d ready at %.1f s: %s", next(done), total, seconds, shape)
            bar.update(1)
        try:
            self.runner.precompile(compiled)
        finally:
            bar.close()
        self._compiles.arm(threading.current_thread())
        self.warm_up_s = time.perf_counter() - start
        log.info("engine ready: %d step programs compiled or loaded in %.1f s", total,
                 self.warm_up_s)

    @property
    def ready(self) -> bool:
        """Every program is compiled (warm_up ran); a lazy engine (precompile off) is never."""
        return self.runner.ready

    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.tokenizer

    # -- public, thread-safe ------------------------------------------------------------------

    def submit(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
               conversation_id: str | None = None, cache_salt: str | None = None) -> RequestHandle:
        """Queue one turn. prompt_token_ids is the conversation's whole sequence (history + new
        turn); the longest prefix still cached for `conversation_id` (or, without an id, for the
        anonymous conversation that shares it), or by any conversation of the same
        `cache_salt` (prompt sharing), is reused."""
        params = params or SamplingParams()
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise TypeError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
        prompt = check_prompt(prompt_token_ids, self.model.config.vocab_size, self.max_model_len)
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        limit = self.config.max_queued_requests
        with self._lock:
            if limit is not None and self._unfinished >= limit:
                raise EngineOverloaded(f"{self._unfinished} requests in flight; the limit is "
                                       f"{limit} (max_queued_requests)")
            self._unfinished += 1
        handle = RequestHandle(uuid.uuid4().hex, conversation_id, self.cancel)
        self._post(_overlaps(lambda: self._add(Request(handle.request_id, prompt, params, seed,
                                                       conversation_id, handle,
                                                       cache_salt or ""))))
        return handle

    def generate(self, prompt_token_ids, params: SamplingParams | None = None):
        """Generate for one prompt (a list of ids) or a batch (a list of lists). Returns the new
        token ids per prompt, without a final stop token."""
        batch = len(prompt_token_ids) > 0 and not isinstance(prompt_token_ids[0], (int, np.integer))
        prompts = prompt_token_ids if batch else [prompt_token_ids]
        handles = [self.submit(p, params) for p in prompts]
        outs = [self.strip_stop(h.result()) for h in handles]
        return outs if batch else outs[0]

    def strip_stop(self, output) -> list[int]:
        ids = list(output.token_ids)
        if output.finish_reason == "stop" and ids and output.stop_text_index is None:
            ids.pop()
        return ids

    def session(self, system: str | None = None, history=None, cache_salt: str | None = None):
        """A Session (one conversation); history: earlier messages to start from; cache_salt:
        share cached prompt pages only with requests of the same salt (tenant isolation)."""
        from pensieve_jax.session import Session
        return Session(self, system, history, cache_salt)

    def cancel(self, request_id: str) -> None:
        """Stop a turn now; its conversation keeps the tokens produced so far."""
        try:
            self._post(lambda: self._abort(request_id))
        except EngineClosed:      # close() ended every turn
            pass

    def has_conversation(self, conversation_id: str) -> bool:
        return self.call(lambda: conversation_id in self.store.conversations)

    def end_conversation(self, conversation_id: str) -> bool:
        """Free a conversation's cache (after its running turn, if any). False if unknown."""
        return self.call(lambda: self.store.end(conversation_id))

    def stats(self) -> dict[str, Any]:
        return self.call(lambda: engine_stats(self))

    # -- life cycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the engine: turns still queued or running end with EngineClosed, the engine
        thread exits and the device buffers go (the KV pools; the weights too if
        from_pretrained loaded them and no open engine shares them). Idempotent; afterwards
        submit, call and what uses them raise EngineClosed. `with Engine.from_pretrained(...)
        as engine:` closes on the way out, and engines still open close at interpreter exit."""
        with self._lock:
            if self._closed:
                return
            thread = self._thread
            if thread is threading.current_thread():
                raise RuntimeError("close() on the engine thread would wait for itself")
            self._closed = True
            if thread is not None:          # after what was posted before: end turns, stop
                self._inbox.put(self._end_all)
                self._inbox.put(None)
        if thread is not None:
            thread.join()
            self._thread = None
        _open_engines.discard(self)
        self._free_buffers()

    def shutdown(self) -> None:
        """close() (the earlier name)."""
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _end_all(self) -> None:
        """(engine thread, at close) Every turn queued or running ends with EngineClosed."""
        self.swapper.drop()
        error = EngineClosed("the engine was closed")
        for req in self.scheduler.abort_all():
            if not req.finished:
                self._deliver(req, error)

    def _free_buffers(self) -> None:
        """(after the engine thread ended) Free the KV pools and the weights this engine owns:
        copies the runner made (tensor parallel), and the loaded ones if from_pretrained
        loaded them and no open engine shares them."""
        runner, params = self.runner, self.model.params
        shared = {id(a) for a in jax.tree_util.tree_leaves(params)}
        owned = jax.tree_util.tree_leaves(runner.kv) + [
            a for a in jax.tree_util.tree_leaves(runner.params) if id(a) not in shared]
        if self._owns_weights and not any(e.model.params is params for e in _open_engines):
            owned += jax.tree_util.tree_leaves(params)
        runner.kv = runner.params = None
        for a in owned:
            if isinstance(a, jax.Array) and not a.is_deleted():
                a.delete()

    # -- the loop -----------------------------------------------------------------------------

    def _post(self, fn: Callable[[], None] | None) -> None:
        with self._lock:         # so nothing lands in the inbox behind close()'s stop
            if self._closed:
                raise EngineClosed("the engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="pensieve-engine",
                                                daemon=True)
                self._thread.start()
            self._inbox.put(fn)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread between steps; its result or exception comes back."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                future.set_result(fn())
            except Exception as e:  # delivered to the caller
                future.set_exception(e)
        self._post(run)
        return future.result()

    def _loop(self) -> None:
        ttl = self.config.conversation_ttl_s
        while True:
            block = not self.scheduler.has_work() and self._inflight is None
            try:
                while True:
                    fn = self._inbox.get(block=block, timeout=ttl / 4 if block and ttl else None)
                    if fn is None:
                        return
                    if not getattr(fn, "overlaps", False):
                        self._drain()      # it sees every token sampled so far, no placeholder
                    fn()
                    block = False
            except queue.Empty:
                pass
            if ttl is not None:
                self.store.expire(ttl)
            self.step()

    def step(self) -> int:
        """One engine step (called by the loop thread); returns the number of rows run:
        land last step's swap-ins, schedule, start this step's copies, run, postprocess.
        Overlapped (config.overlap): run is a dispatch, and what is postprocessed is the step
        dispatched before this one, which the device ran meanwhile (module docstring)."""
        start = time.perf_counter()
        try:
            self._land()
            rows = self._schedule()
        except Exception as e:  # a scheduler bug must not kill the loop silently
            self._fail_all(RuntimeError(f"engine scheduling failed: {type(e).__name__}: {e}"))
            return 0
        for req, error in self.scheduler.rejected:
            self._deliver(req, error)
        self.scheduler.rejected.clear()
        prev = self._inflight
        try:
            self.swapper.start()
            if not rows:
                self.swapper.flush()
                if prev is not None:
                    self._drain()            # nothing to overlap it with
                else:
                    self._check_stall()
                return 0
            s = step_input(rows, self.config.page_size)
            src = None if prev is None else self._token_sources(rows)
            incoming = self.swapper.take_incoming()
            planned = time.perf_counter()
            if self.config.overlap:
                handle = self.runner.dispatch(s, incoming, prev and prev.handle, src)
            else:
                tokens = self.runner.step(s, incoming)
            ran = time.perf_counter()
        except Exception as e:  # fail what is in flight; the pools may be gone (donated)
            self._fail_all(RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
            return 0
        self._stalled_steps = 0
        num_tokens = sum(r.end - r.start for r in rows)
        self.counts["steps"] += 1
        self.counts["step_tokens"] += num_tokens
        waited = self.loop["wait_s"]
        if self.config.overlap:
            self._next_reqs = {id(r.request) for r in rows}
            try:
                if prev is not None and not self._complete(prev):
                    return 0                 # the fetch failed: everything in flight failed
            finally:
                self._next_reqs = set()
            self._dispatched(rows)
            self._inflight = _InFlight(rows, handle, planned, num_tokens)
        else:
            if num_tokens >= 16:      # prefill speed, for the load-or-recompute choice
                self._rates.prefill(ran - planned, num_tokens)
            self._dispatched(rows)
            for row, token in zip(rows, tokens):
                self._postprocess(row, int(token))
        self.store.swap_out_ahead(int(self.config.swap_out_threshold * self.allocator.num_pages))
        loop = self.loop
        loop["steps"] += 1
        loop["plan_s"] += planned - start
        loop["run_s"] += ran - planned
        loop["post_s"] += time.perf_counter() - ran - (loop["wait_s"] - waited)
        return len(rows)

    def _schedule(self) -> list[Row]:
        """The next step's rows. With a step in flight, a plan that would preempt a running turn
        is given up (what it reserved or evicted stays valid) and made again once that step is
        fetched: a preempted turn must not have a row in flight."""
        if self._inflight is None:
            return self.scheduler.schedule()
        self.scheduler.no_preemption = True
        try:
            return self.scheduler.schedule()
        except PreemptionNeeded:
            pass
        finally:
            self.scheduler.no_preemption = False
        self._drain()
        return self.scheduler.schedule()

    def _token_sources(self, rows: list[Row]) -> np.ndarray:
        """token_src of a step planned while the one before is in flight: for each token row,
        -1 (its id is known), or the row of the step in flight that samples it."""
        src = np.full(sum(r.end - r.start for r in rows), -1, np.int32)
        at = 0
        for row in rows:
            req = row.request
            if req.pending and not row.front:
                assert req.pending == 1, "more than one step in flight"
                first = len(req.token_ids) - 1            # the placeholder's position
                if row.start <= first < row.end:
                    src[at + first - row.start] = req.pending_row
            at += row.end - row.start
        return src

    def _complete(self, f: _InFlight) -> bool:
        """Fetch a dispatched step's tokens and postprocess it. False if the fetch failed (then
        every turn in flight has failed)."""
        if self._inflight is f:
            self._inflight = None
        start = time.perf_counter()
        ready = getattr(f.handle.tokens, "is_ready", None)
        self.loop["busy_fetches"] += ready is not None and not ready()
        try:
            tokens = self.runner.fetch(f.handle)
        except Exception as e:  # noqa: BLE001 - as a failed step: the pools may be gone
            self._fail_all(RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
            return False
        done = time.perf_counter()
        self.loop["wait_s"] += done - start
        if f.num_tokens >= 16:    # prefill speed: from when the device could start it
            self._rates.prefill(done - max(f.dispatched, self._last_done), f.num_tokens)
        self._last_done = done
        for row, token in zip(f.rows, tokens):
            self._postprocess(row, int(token))
        return True

    def _drain(self) -> None:
        """Fetch and postprocess the step in flight, if any: afterwards no turn has a row in
        flight nor a placeholder token."""
        if self._inflight is not None:
            self.loop["drains"] += 1
            self._complete(self._inflight)

    def settle_copies(self) -> None:
        """Land the swap-ins started at the last step and start the copies planned since
        (engine thread; KV export/import use it to read every page where it will be)."""
        self._land()
        self.swapper.start()
        self.swapper.flush()

    def _land(self) -> None:
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
            self._fail_all(RuntimeError(
                "engine made no progress in 100 steps with turns queued (scheduler bug); "
                f"running {len(self.scheduler.running)}, waiting {len(self.scheduler.waiting)}"),
                pools_lost=False)

    def _dispatched(self, rows: list[Row]) -> None:
        """Book what a step just dispatched computes (steps, page copies and gathers run on
        the device in dispatch order: whatever is dispatched later sees it). A row that samples
        appends a placeholder for its token (Request.pending) until the step is fetched."""
        ps = self.config.page_size
        for i, row in enumerate(rows):
            req = row.request
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

    def _postprocess(self, row: Row, token: int) -> None:
        """A fetched step's row (booked by _dispatched): its sampled token, stop checks."""
        req = row.request
        if row.front:
            return
        if req.finished:        # the cache flush after a turn (overlapped: maybe a decode
            if row.end == len(req.token_ids):    # dispatched before the turn was done; its
                self._release(req)               # token is dropped)
            return
        if not row.sample:
            return
        # the placeholder _dispatched appended (steps after this one have booked none yet)
        assert req.pending == 1 and row.end == len(req.token_ids) - 1, "placeholder out of step"
        req.pending = 0
        req.output[-1] = req.token_ids[-1] = token
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        self._check_finish(req, token)
        req.handle._put(TokenEvent((token,), None))
        if req.finished:
            self._finish(req)

    def _check_finish(self, req: Request, token: int) -> None:
        p = req.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.tokenizer.stop_token_ids):
            req.finish_reason = "stop"
        elif p.stop:
            text = self.tokenizer.decode(req.output, skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            if hits:
                req.finish_reason, req.stop_text_index = "stop", min(hits)
        if not req.finished and (len(req.output) >= p.max_tokens or
                                 len(req.token_ids) >= self.max_model_len):
            req.finish_reason = "length"

    def _finish(self, req: Request) -> None:
        out = req.make_output()
        self._count(out)
        if ((self.config.cache_policy == "stateless" or req.conversation.id in self.store.closing)
                and id(req) not in self._next_reqs):
            self._release(req)
        else:   # stays running one more step to compute the last token's KV (the cache flush;
            # overlapped, maybe the step dispatched already: released once that is fetched)
            req.conversation.flushing = True
        self._deliver(req, TokenEvent((), out))

    def _count(self, out) -> None:
        self.counts["finished"] += 1
        for key in USAGE_COUNTERS:
            self.counts[key] += getattr(out.usage, key)

    def _deliver(self, req: Request, final) -> None:
        """The last thing a request's handle receives: its output, or an exception."""
        with self._lock:
            self._unfinished -= 1
        req.handle._put(final)

    def _abort(self, request_id: str) -> None:
        req = self.scheduler.remove(request_id)
        if req is None or req.finished:
            return
        req.finish_reason = "abort"
        out = req.make_output()
        self._count(out)
        if req.conversation is not None:
            self._release(req, in_scheduler=False)
        self._deliver(req, TokenEvent((), out))

    def _release(self, req: Request, in_scheduler: bool = True) -> None:
        if in_scheduler:
            self.scheduler.finish(req)
        conv = req.conversation
        if req.front_done < req.front_end:     # stopped while recomputing a dropped range
            self.store.truncate(conv, req.front_done)
        self.store.release(conv, keep_kv=self.config.cache_policy == "stateful")

    def _add(self, req: Request) -> None:
        self.counts["requests"] += 1
        self.scheduler.add(req)

    def _fail_all(self, error: Exception, pools_lost: bool = True) -> None:
        """Fail every turn in flight; when the pools may be gone (a failed step donated them)
        every conversation's cache goes too, else idle conversations keep theirs."""
        self.counts["failed_steps"] += 1
        self.swapper.drop()
        self._inflight = None
        for req in self.scheduler.abort_all():
            if req.pending:            # placeholders of a step that will never be fetched
                del req.token_ids[-req.pending:], req.output[-req.pending:]
                req.pending = 0
            if req.conversation is not None:
                self.store.release(req.conversation, keep_kv=False)
            if not req.finished:
                self._deliver(req, error)
        if pools_lost:
            for conv in self.store.conversations.values():
                self.store.truncate(conv, 0)
            self.runner.reset_kv()

    # -- KV transfer between engines (pensieve_jax/kvcache/transfer.py) ----------------------------

    def export_kv(self, conversation_id: str, start: int = 0, limit: int | None = None):
        """An idle conversation's held KV prefix as kv_transfer.ExportedKV (token ids, k/v
        pages from the page holding token `start`, at most `limit` tokens)."""
        from pensieve_jax.kvcache import transfer as kv_transfer
        return kv_transfer.call_settled(self, lambda: kv_transfer.export_kv(
            self, conversation_id, start, limit))

    def import_kv(self, conversation_id: str | None, token_ids, k, v, layout,
                  first_page: int = 0, cache_salt: str | None = None) -> str:
        """Make an idle conversation hold token_ids with KV pages k, v (from first_page on);
        None: the anonymous conversation sharing the longest prefix (or a new one). Returns
        its id. Raises KVMismatch, ConversationBusy or OutOfPages."""
        from pensieve_jax.kvcache import transfer as kv_transfer
        return kv_transfer.call_settled(self, lambda: kv_transfer.import_kv(
            self, conversation_id, token_ids, k, v, layout, first_page, cache_salt or ""))
