"""The engine in this process as a replay target: token-level turns through engine.submit (or
chat sessions in text mode), and a timing of every model step it runs."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .turns import SessionConversation, TurnResult, usage_dict


class EngineTarget:
    """The in-process engine. conversation(key) gives one conversation's turn runner."""

    kind = "engine"

    def __init__(self, engine, text: bool = False, profile_steps: bool = True):
        self.engine = engine
        self.text = text
        self.vocab_size = min(engine.model.config.vocab_size, engine.tokenizer.vocab_size)
        self.step_log: list[tuple] = []
        if profile_steps:
            self._time_steps()

    def _time_steps(self) -> None:
        """Time every model step: (tokens, sequences, pages of the widest row, longest query,
        context tokens, seconds). Steps are timed from their dispatch to the fetch of their
        tokens; with the overlapped loop (EngineConfig.overlap) a step is dispatched while the
        one before still runs, so its time starts when that one's tokens came back (the device
        runs steps one after another), which is the device step plus whatever host work was
        not hidden."""
        runner = getattr(self.engine, "runner", None)
        dispatch, fetch = getattr(runner, "dispatch", None), getattr(runner, "fetch", None)
        if dispatch is None or fetch is None or getattr(dispatch, "_timed", False):
            self.step_log = getattr(dispatch, "_log", self.step_log)
            return
        log = self.step_log
        started: dict[int, tuple] = {}
        last_done = [0.0]

        def timed_dispatch(s, *args, **kw):
            start = time.perf_counter()
            handle = dispatch(s, *args, **kw)
            q = np.diff(s.cu_q_lens)
            started[id(handle)] = (start, (len(s.token_ids), len(s.kv_lens), s.page_table.shape[1],
                                           int(q.max(initial=0)), int(np.sum(s.kv_lens))))
            return handle

        def timed_fetch(handle):
            out = fetch(handle)
            done = time.perf_counter()
            start, info = started.pop(id(handle), (None, None))
            if start is not None:
                log.append(info + (done - max(start, last_done[0]),))
            last_done[0] = done
            return out
        timed_dispatch._timed, timed_dispatch._log = True, log
        runner.dispatch, runner.fetch = timed_dispatch, timed_fetch

    def compilations(self) -> int:
        return int(self.engine.stats()["compilations"])

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def conversation(self, key: str, system_ids: list[int], system_text: str | None):
        if self.text:
            return SessionConversation(self.engine.session(system=system_text))
        return _EngineTokenConversation(self, key, system_ids)


class _EngineTokenConversation:
    """The conversation's whole token sequence each turn, under its conversation id."""

    def __init__(self, target: EngineTarget, key: str, system_ids: list[int]):
        self.engine, self.key = target.engine, key
        self.seq: list[int] = list(system_ids)

    def turn(self, new_ids: list[int], text: str | None, max_tokens: int) -> TurnResult:
        from pensieve_jax import SamplingParams   # (every layout exports it)
        self.seq = self.seq + list(new_ids)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        handle = self.engine.submit(self.seq, params, conversation_id=self.key)
        first, out = None, None
        for event in handle:
            if first is None and event.token_ids:
                first = time.perf_counter()
            if event.output is not None:
                out = event.output
        end = time.perf_counter()
        self.seq = self.seq + list(out.token_ids)
        return TurnResult(token_ids=list(out.token_ids), usage=usage_dict(out.usage),
                          ttft_s=(first or end) - start, e2e_s=end - start)

    def close(self) -> None:
        self.engine.end_conversation(self.key)
