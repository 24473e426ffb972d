"""The real engine stepped by hand: an Engine over a runner without a device, whose thread is
never started (nothing is posted to it); the test thread does what that thread does, one
step at a time, with the pages' invariants checked before every step (engine_fuzz's
check_pages). For scenarios that need a step-exact order of events."""

from __future__ import annotations

import dataclasses

from pensieve_jax.engine.config import EngineConfig, page_bytes
from pensieve_jax.engine.engine import Engine
from pensieve_jax.engine.request import Request
from pensieve_jax.engine.sampling import SamplingParams
from tests.engine.test_engine_fuzz import CheckedRunner, check_pages
from tests.engine.test_engine_over_fake_runner import CONFIG, MODEL

ONE = SamplingParams(max_tokens=1)


class Recorder:
    """A request's handle that keeps what the engine delivered."""

    def __init__(self):
        self.events: list = []

    def put(self, item) -> None:
        self.events.append(item)

    @property
    def final(self) -> tuple[str, str] | None:
        """("output", finish_reason), ("error", exception type), or None (not finished)."""
        if not self.events:
            return None
        last = self.events[-1]
        if isinstance(last, BaseException):
            return ("error", type(last).__name__)
        return ("output", last.output.finish_reason) if last.output is not None else None

    @property
    def usage(self):
        return self.events[-1].output.usage


class Driver:
    def __init__(self, page_size=4, num_pages=24, host_pages=0, chunk_pages=2,
                 max_batched_tokens=16, max_num_seqs=4, max_model_len=64,
                 swap_out_threshold=0.25, overlap=False, **options):
        nbytes = page_bytes(MODEL, EngineConfig(page_size=page_size), "float32")
        config = EngineConfig(
            page_size=page_size, num_pages=num_pages, host_cache_bytes=host_pages * nbytes,
            chunk_tokens=chunk_pages * page_size, max_batched_tokens=max_batched_tokens,
            max_num_seqs=max_num_seqs, max_model_len=max_model_len,
            swap_out_threshold=swap_out_threshold, eviction_policy="lru", reserve_fraction=0.0,
            restore_policy="load", precompile=False, overlap=overlap, **options)
        self.runner = None

        def make_runner(n, ladder):
            self.runner = CheckedRunner(CONFIG, n, page_size, max_num_seqs, max_batched_tokens,
                                        max_model_len, ladder)
            return self.runner
        self.engine = Engine(MODEL, "float32", config, make_runner=make_runner)
        self.runner.engine = self.engine
        self.store, self.scheduler = self.engine.store, self.engine.scheduler
        self.handles: dict[str, Recorder] = {}
        self.last_rows: list = []
        rows = self.scheduler.schedule

        def remember():
            self.last_rows = rows()
            return self.last_rows
        self.scheduler.schedule = remember

    def request(self, request_id: str, prompt: list[int], params=ONE,
                conversation_id: str | None = None) -> Request:
        self.handles[request_id] = handle = Recorder()
        params = dataclasses.replace(params, ignore_eos=True)   # the fake model has no eos
        return Request(request_id, list(prompt), params, 0, conversation_id or request_id,
                       handle)

    def submit(self, req: Request) -> None:
        self.engine.turns.admit()
        self.engine.turns.add(req)

    def step(self) -> int:
        self.last_rows = []
        n = self.engine.steps.step()
        check_pages(self.engine)
        return n

    def run(self, steps: int = 200) -> None:
        """Steps until nothing is left to do (or `steps` of them)."""
        for _ in range(steps):
            self.step()
            if self.engine.steps.idle() and not self.engine.swapper.in_flight:
                return

    def delivered(self, request_id: str):
        return self.handles[request_id].final

    def abort(self, request_id: str) -> None:
        self.engine.steps.drain()           # as the engine thread does before an inbox call
        self.engine.turns.abort(request_id)

    def end(self, conversation_id: str) -> bool:
        self.engine.steps.drain()
        return self.store.end(conversation_id)

    def close(self) -> None:
        self.engine.close()
