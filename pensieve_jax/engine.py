"""The engine: a loop of schedule -> run -> postprocess over conversations that keep their cache.

Callers on any thread `submit` turns (or use `generate` / `session`); one background thread owns
all scheduling state and runs the steps, so requests join and leave at step boundaries.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import queue
import secrets
import threading
import time
import uuid
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pensieve_jax.cache import PageAllocator
from pensieve_jax.conversations import ConversationStore
from pensieve_jax.eviction import make_policy
from pensieve_jax.host_cache import HostCache
from pensieve_jax.request import Request, RequestHandle, TokenEvent, check_prompt
from pensieve_jax.runner import ModelRunner, step_input
from pensieve_jax.sampling import SamplingParams
from pensieve_jax.scheduler import Row, Scheduler, SchedulerConfig
from pensieve_jax.tokenizer import Tokenizer
from pensieve_jax.transfer_costs import RESTORE_POLICIES, TransferCosts
from pensieve_jax.weights import DEFAULT_MODEL, LoadedModel, load_model

CACHE_POLICIES = ("stateful", "stateless")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int | None = None         # None: from kv_cache_bytes / kv_cache_fraction
    kv_cache_bytes: int | None = None    # per device; None: kv_cache_fraction of free memory
    kv_cache_fraction: float = 0.6       # (on CPU: 512 MiB, capped at what the seqs can use)
    max_model_len: int | None = None     # None: min(model context, 4096)
    max_batched_tokens: int = 512
    max_num_seqs: int = 64
    attention: str = "xla"
    cache_policy: str = "stateful"       # "stateless": drop each turn's KV, share nothing
                                         # (the baseline)
    max_queued_requests: int | None = None     # submit raises EngineOverloaded beyond this
    host_cache_bytes: int = 0            # host-memory tier for idle conversations (0: none)
    eviction_policy: str = "pensieve"    # or "lru": which idle chunk leaves a tier first
    chunk_tokens: int = 32               # eviction granularity (rounded to whole pages)
    swap_out_threshold: float = 0.25     # copy idle chunks to host when fewer pages are free
    reserve_fraction: float = 0.10       # pages new turns leave free for running ones
    conversation_ttl_s: float | None = None    # idle conversations are forgotten after this
    restore_policy: str = "auto"         # host pages: "load", "recompute", or "auto" (the
                                         # cheaper by measured bandwidth and prefill speed)
    prefix_sharing: bool = True          # conversations share cached pages of common prefixes
    fairness_steps: int = 16             # a waiting turn is passed over for better-cached ones
                                         # for at most this many steps
    tensor_parallel: int = 1             # devices the weights and KV heads are split over

    def __post_init__(self):
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        for name in ("max_batched_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cache_policy not in CACHE_POLICIES:
            raise ValueError(f"cache_policy must be one of {CACHE_POLICIES}, "
                             f"got {self.cache_policy!r}")
        if not isinstance(self.tensor_parallel, int) or self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be an integer >= 1, "
                             f"got {self.tensor_parallel!r}")
        if self.restore_policy not in RESTORE_POLICIES:
            raise ValueError(f"restore_policy must be one of {RESTORE_POLICIES}, "
                             f"got {self.restore_policy!r}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")


def _page_shape(model: LoadedModel, config: EngineConfig) -> tuple[int, int, int, int]:
    c = model.config
    return (c.num_layers, config.page_size, c.num_kv_heads, c.head_dim)


def _page_bytes(model: LoadedModel, config: EngineConfig, dtype) -> int:
    """K and V of one page, all layers and KV heads."""
    return 2 * math.prod(_page_shape(model, config)) * jnp.dtype(dtype).itemsize


def _pool_pages(model: LoadedModel, config: EngineConfig, dtype, max_model_len: int) -> int:
    if config.num_pages is not None:
        return config.num_pages
    # per device: each holds its KV heads only
    page_bytes = _page_bytes(model, config, dtype) // config.tensor_parallel
    budget = config.kv_cache_bytes
    stats = jax.devices()[0].memory_stats() if budget is None else None
    if budget is None and stats and "bytes_limit" in stats:
        budget = int((stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * config.kv_cache_fraction)
    if budget is None:
        usable = config.max_num_seqs * math.ceil(max_model_len / config.page_size)
        return max(1, min(usable, (512 << 20) // page_bytes))
    return max(1, budget // page_bytes)


class EngineOverloaded(RuntimeError):
    """Too many unfinished requests (EngineConfig.max_queued_requests)."""


class Engine:
    def __init__(self, model: LoadedModel, dtype="float32", config: EngineConfig = EngineConfig()):
        self.model = model
        self.config = config
        self.max_model_len = config.max_model_len or min(model.config.max_position_embeddings, 4096)
        num_pages = _pool_pages(model, config, dtype, self.max_model_len)
        if num_pages * config.page_size < self.max_model_len:
            raise ValueError(f"KV pool of {num_pages} pages x {config.page_size} tokens cannot hold "
                             f"one sequence of max_model_len {self.max_model_len}")
        c = model.config
        self.allocator = PageAllocator(num_pages)
        page_shape = _page_shape(model, config)
        page_bytes = _page_bytes(model, config, dtype)
        self.host = HostCache(config.host_cache_bytes // page_bytes, page_shape, jnp.dtype(dtype))
        self.store = ConversationStore(
            self.allocator, config.page_size, self.host.allocator if self.host.enabled else None,
            make_policy(config.eviction_policy, c), max(1, config.chunk_tokens // config.page_size),
            sharing=config.prefix_sharing and config.cache_policy == "stateful")
        self.scheduler = Scheduler(SchedulerConfig(
            config.max_batched_tokens, config.max_num_seqs,
            int(config.reserve_fraction * num_pages), config.fairness_steps), self.store)
        self.runner = ModelRunner(model, num_pages, config.page_size, config.attention, dtype,
                                  tensor_parallel=config.tensor_parallel)
        self._rates = TransferCosts(page_bytes, config.restore_policy)
        if self.host.enabled:
            if config.restore_policy == "auto":
                self._rates.calibrate(self.runner, page_shape, self.host.k.dtype)
            if config.restore_policy != "load":
                self.store.recompute_cheaper = self._rates.recompute_cheaper
        self._landing = None                 # swap-ins started, to land at the next step
        self._stalled_steps = 0              # steps in a row with work but nothing to run
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing: set[str] = set()
        self._unfinished = 0                 # submitted, no final event yet (guarded by _lock)
        self._counts = dict.fromkeys(("steps", "requests", "finished", "prompt_tokens",
                                      "cached_tokens", "cached_host_tokens", "cached_shared_tokens",
                                      "prefilled_tokens",
                                      "recomputed_tokens",
                                      "completion_tokens", "step_tokens", "failed_steps"), 0)

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
        return cls(load_model(source, dtype, cache_dir), dtype, config)

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
        self._post(lambda: self._add(Request(handle.request_id, prompt, params, seed,
                                             conversation_id, handle, cache_salt or "")))
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
        self._post(lambda: self._abort(request_id))

    def has_conversation(self, conversation_id: str) -> bool:
        return self._call(lambda: conversation_id in self.store.conversations)

    def end_conversation(self, conversation_id: str) -> bool:
        """Free a conversation's cache (after its running turn, if any). False if unknown."""
        return self._call(lambda: self._end(conversation_id))

    def stats(self) -> dict[str, Any]:
        return self._call(self._stats)

    def shutdown(self) -> None:
        if self._thread is not None:
            self._post(None)
            self._thread.join()
            self._thread = None

    # -- the loop -----------------------------------------------------------------------------

    def _post(self, fn: Callable[[], None] | None) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="pensieve-engine",
                                                    daemon=True)
                    self._thread.start()
        self._inbox.put(fn)

    def _call(self, fn: Callable[[], Any]) -> Any:
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
            block = not self.scheduler.has_work()
            try:
                while True:
                    fn = self._inbox.get(block=block, timeout=ttl / 4 if block and ttl else None)
                    if fn is None:
                        return
                    fn()
                    block = False
            except queue.Empty:
                pass
            if ttl is not None:
                self.store.expire(ttl)
            self.step()

    def step(self) -> int:
        """One engine step (called by the loop thread); returns the number of rows run:
        land last step's swap-ins, schedule, start this step's copies, run, postprocess."""
        try:
            self._land()
            rows = self.scheduler.schedule()
        except Exception as e:  # a scheduler bug must not kill the loop silently
            self._fail_all(RuntimeError(f"engine scheduling failed: {type(e).__name__}: {e}"))
            return 0
        for req, error in self.scheduler.rejected:
            self._deliver(req, error)
        self.scheduler.rejected.clear()
        try:
            self._transfer()
            if not rows:
                self._check_stall()
                return 0
            start = time.perf_counter()
            tokens = self.runner.step(step_input(rows, self.config.page_size))
        except Exception as e:  # fail what is in flight; the pools may be gone (donated)
            self._fail_all(RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
            return 0
        self._stalled_steps = 0
        num_tokens = sum(r.end - r.start for r in rows)
        if num_tokens >= 16:      # prefill speed, for the load-or-recompute choice
            self._rates.prefill(time.perf_counter() - start, num_tokens)
        self._counts["steps"] += 1
        self._counts["step_tokens"] += num_tokens
        for row, token in zip(rows, tokens):
            self._postprocess(row, int(token))
        self.store.swap_out_ahead(int(self.config.swap_out_threshold * self.allocator.num_pages))
        return len(rows)

    def _transfer(self) -> None:
        """Run the page copies the scheduler planned: device -> host, device -> device (copy on
        write), then host -> device (a page freed by one may be the target of a later one)."""
        self.host.finish_writes()           # last step's device -> host copies land now
        out, copies, into = self.store.take_transfers()
        if out:
            k, v = self.runner.gather_pages([d for d, _ in out])
            self.host.write_async(k, v, [h for _, h in out])
        if copies:
            self.runner.copy_pages(copies)
        if into:      # start the host -> device copy now; it lands at the next step
            start = time.perf_counter()
            k, v = self.host.read([s.host_page for s in into])
            self._landing = (self.runner.stage_pages(k, v), into)
            self.store.swapped_in([s.host_page for s in into])
            self.host.stats["in_s"] += time.perf_counter() - start

    def _check_stall(self) -> None:
        """Work queued, nothing runnable and no copy in flight that would change that: a
        scheduler bug. Fail what is in flight with a clear error instead of spinning forever."""
        if not self.scheduler.has_work() or self._landing is not None:
            self._stalled_steps = 0
            return
        self._stalled_steps += 1
        if self._stalled_steps >= 100:
            self._stalled_steps = 0
            self._fail_all(RuntimeError(
                "engine made no progress in 100 steps with turns queued (scheduler bug); "
                f"running {len(self.scheduler.running)}, waiting {len(self.scheduler.waiting)}"),
                pools_lost=False)

    def _land(self) -> None:
        """Swap-ins started before the last step's compute go into the pools (pages whose
        conversation let them go meanwhile are skipped); their turns may run from now on."""
        if self._landing is None:
            return
        staged, into = self._landing
        self._landing = None
        hidden = all(a.is_ready() for a in staged)
        start = time.perf_counter()
        jax.block_until_ready(staged)
        self.host.stats["in_wait_s"] += time.perf_counter() - start
        self.host.stats["in_hidden_pages"] += len(into) if hidden else 0
        self.runner.scatter_staged(staged, [
            s.device_page if s.index < len(s.conversation.pages) and
            s.conversation.pages[s.index] == s.device_page else -1 for s in into])
        self.scheduler.landed()

    def _postprocess(self, row: Row, token: int) -> None:
        req = row.request
        req.count_computed(row.start, row.end)
        if row.front:
            req.front_done = row.end
            return
        req.conversation.num_computed = row.end
        if not req.output and row.end // self.config.page_size > row.start // self.config.page_size:
            self.store.register(req.conversation)          # prompt pages done: offer them
        if req.finished:                                   # the cache flush after a turn
            if row.end == len(req.token_ids):
                self._release(req)
            return
        if not row.sample:
            return
        req.output.append(token)
        req.token_ids.append(token)
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
        if self.config.cache_policy == "stateless" or req.conversation.id in self._closing:
            self._release(req)
        else:   # stays running one more step to compute the last token's KV (the cache flush)
            req.conversation.flushing = True
        self._deliver(req, TokenEvent((), out))

    def _count(self, out) -> None:
        self._counts["finished"] += 1
        for key in ("prompt_tokens", "cached_tokens", "cached_host_tokens", "cached_shared_tokens",
                    "prefilled_tokens", "recomputed_tokens", "completion_tokens"):
            self._counts[key] += getattr(out.usage, key)

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
        if conv.id in self._closing:
            self._closing.discard(conv.id)
            self.store.remove(conv.id)

    def _add(self, req: Request) -> None:
        self._counts["requests"] += 1
        self.scheduler.add(req)

    def _end(self, conversation_id: str) -> bool:
        conv = self.store.conversations.get(conversation_id)
        if conv is None:
            return False
        if conv.busy:
            self._closing.add(conversation_id)
        else:
            self.store.remove(conversation_id)
        return True

    def _fail_all(self, error: Exception, pools_lost: bool = True) -> None:
        """Fail every turn in flight; when the pools may be gone (a failed step donated them)
        every conversation's cache goes too, else idle conversations keep theirs."""
        self._counts["failed_steps"] += 1
        self._landing = None
        for req in self.scheduler.abort_all():
            if req.conversation is not None:
                self.store.release(req.conversation, keep_kv=False)
            if not req.finished:
                self._deliver(req, error)
        if pools_lost:
            for conv in self.store.conversations.values():
                self.store.truncate(conv, 0)
            self.runner.reset_kv()

    def _stats(self) -> dict[str, Any]:
        used = self.allocator.num_pages - self.allocator.num_free
        host = self.store.host          # the host tier's page allocator, or None
        return dict(
            self._counts, compilations=self.runner.num_compilations,
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            conversations=len(self.store.conversations), preemptions=self.scheduler.num_preemptions,
            **self.store.counts, cached_tokens_resident=self.store.cached_tokens(),
            resident_tokens=self.store.resident_tokens(),
            hit_tokens=self._counts["cached_tokens"],
            hit_tokens_by_tier={"device": self._counts["cached_tokens"] -
                                self._counts["cached_host_tokens"],
                                "host": self._counts["cached_host_tokens"]},
            miss_tokens=self._counts["prefilled_tokens"] + self._counts["recomputed_tokens"],
            pages={"device": {"used": used, "free": self.allocator.num_free,
                              "total": self.allocator.num_pages},
                   "host": {"used": host.num_pages - host.num_free if host else 0,
                            "free": host.num_free if host else 0,
                            "total": host.num_pages if host else 0}},
            sharing=dict(self.store.sharing_stats(), enabled=self.store.index is not None,
                         shared_hit_tokens=self._counts["cached_shared_tokens"],
                         hit_ratio=self._counts["cached_tokens"] /
                         max(1, self._counts["prompt_tokens"])),
            swap=dict(self.host.stats, **self._rates.stats()), eviction_policy=self.store.policy.name,
            cache_policy=self.config.cache_policy, page_size=self.config.page_size,
            max_model_len=self.max_model_len)

    # -- KV transfer between engines (pensieve_jax/kv_transfer.py) ----------------------------

    def export_kv(self, conversation_id: str, start: int = 0, limit: int | None = None):
        """An idle conversation's held KV prefix as kv_transfer.ExportedKV (token ids, k/v
        pages from the page holding token `start`, at most `limit` tokens)."""
        from pensieve_jax import kv_transfer
        return kv_transfer.call_settled(self, lambda: kv_transfer.export_kv(
            self, conversation_id, start, limit))

    def import_kv(self, conversation_id: str | None, token_ids, k, v, layout,
                  first_page: int = 0, cache_salt: str | None = None) -> str:
        """Make an idle conversation hold token_ids with KV pages k, v (from first_page on);
        None: the anonymous conversation sharing the longest prefix (or a new one). Returns
        its id. Raises KVMismatch, ConversationBusy or OutOfPages."""
        from pensieve_jax import kv_transfer
        return kv_transfer.call_settled(self, lambda: kv_transfer.import_kv(
            self, conversation_id, token_ids, k, v, layout, first_page, cache_salt or ""))
