"""llama.cpp served the way llama.cpp's own server serves, over a LlamaCpp (llama_cpp_peer.py):
`n_seq` slots (one KV sequence each, kept between the turns of the conversation that holds the
slot, so a turn evaluates only its new tokens: the server's prompt cache), continuous batching
(every step decodes one token for each generating slot and fills the rest of the `n_batch`
token budget with prompt tokens), greedy sampling. A single conversation is plain llama.cpp at
batch 1.

    target = LlamaCppTarget(llm)           # the interface of multiturn_lib's targets
    conv = target.conversation("c0", [], None)
    res = conv.turn(new_ids, None, max_tokens=32)   # token_ids, ttft_s, e2e_s, token_times
    conv.close(); target.shutdown(); llm.close()
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peers.llama_cpp_peer import LlamaCpp


class _Job:
    def __init__(self, slot: int, seq: list[int], max_tokens: int):
        self.slot, self.seq, self.max_tokens = slot, seq, max_tokens
        self.submit = time.perf_counter()
        self.pending: list[int] = []          # tokens still to evaluate (prompt, or last token)
        self.out: list[int] = []
        self.times: list[float] = []
        self.prompt_tokens = len(seq)
        self.evaluated = 0                    # prompt tokens this turn evaluated (not cached)
        self.done = threading.Event()
        self.error: BaseException | None = None


class LlamaCppTarget:
    """A llama.cpp server in this process: a worker thread drives LlamaCpp, one slot per
    conversation (conversation() blocks while all n_seq slots are taken)."""

    kind = "llama.cpp"

    def __init__(self, llm: LlamaCpp, vocab_size: int | None = None):
        self.llm = llm
        self.vocab_size = vocab_size or llm.n_vocab
        self._free = queue.Queue()
        for s in range(llm.n_seq):
            self._free.put(s)
        self._kv: list[list[int]] = [[] for _ in range(llm.n_seq)]   # tokens in each slot's KV
        self._inbox: queue.Queue = queue.Queue()
        self.steps = 0
        self.step_tokens = 0
        self._worker = threading.Thread(target=self._loop, daemon=True, name="llama.cpp-peer")
        self._worker.start()

    # the target interface of multiturn_lib (replay)
    def compilations(self) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        return {"steps": self.steps, "step_tokens": self.step_tokens}

    def conversation(self, key: str, system_ids: list[int], system_text: str | None):
        return _LlamaConversation(self, self._free.get(), list(system_ids))

    def run(self, slot: int, seq: list[int], max_tokens: int) -> _Job:
        job = _Job(slot, seq, max_tokens)
        self._inbox.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job

    def release(self, slot: int) -> None:
        done = threading.Event()
        self._inbox.put(("clear", slot, done))
        done.wait()
        self._free.put(slot)

    def shutdown(self) -> None:
        self._inbox.put(None)
        self._worker.join()

    # the worker
    def _start(self, job: _Job) -> None:
        kv = self._kv[job.slot]
        p = 0
        limit = min(len(kv), len(job.seq) - 1)     # at least one token to evaluate
        while p < limit and kv[p] == job.seq[p]:
            p += 1
        if p < len(kv):
            self.llm.clear(job.slot, p)
            del kv[p:]
        if len(job.seq) > self.llm.n_ctx_seq:
            raise ValueError(f"{len(job.seq)} tokens exceed the slot's {self.llm.n_ctx_seq}")
        job.pending = list(job.seq[p:])
        job.evaluated = len(job.pending)

    def _loop(self) -> None:
        active: list[_Job] = []
        while True:
            try:
                while True:
                    item = self._inbox.get(block=not active)
                    if item is None:
                        return
                    if isinstance(item, tuple):           # ("clear", slot, event)
                        _, slot, ev = item
                        self.llm.clear(slot, 0)
                        self._kv[slot] = []
                        ev.set()
                        continue
                    try:
                        self._start(item)
                        active.append(item)
                    except BaseException as e:
                        item.error = e
                        item.done.set()
            except queue.Empty:
                pass
            if not active:
                continue
            # generating slots first (one token each), then prompt tokens in the budget left
            budget = self.llm.n_batch
            entries, chosen = [], []
            for job in sorted(active, key=lambda j: len(j.pending) > 1):
                if budget <= 0:
                    break
                take = job.pending[:budget]
                kv = self._kv[job.slot]
                entries.append((job.slot, take, len(kv)))
                chosen.append((job, len(take)))
                budget -= len(take)
            try:
                tokens = self.llm.decode(entries)
            except BaseException as e:
                for job in active:
                    job.error = e
                    job.done.set()
                active = []
                continue
            now = time.perf_counter()
            self.steps += 1
            self.step_tokens += sum(n for _, n in chosen)
            for (job, n), tok in zip(chosen, tokens):
                self._kv[job.slot].extend(job.pending[:n])
                del job.pending[:n]
                if job.pending:                     # prompt not finished: its logits unused
                    continue
                job.out.append(tok)
                job.times.append(now)
                if len(job.out) >= job.max_tokens:
                    active.remove(job)
                    job.done.set()
                else:
                    job.pending = [tok]


class _LlamaConversation:
    def __init__(self, target: LlamaCppTarget, slot: int, system_ids: list[int]):
        self.target, self.slot = target, slot
        self.seq = system_ids
        self._closed = False

    def turn(self, new_ids: list[int], text: str | None, max_tokens: int):
        from multiturn_lib.turns import TurnResult
        self.seq = self.seq + list(new_ids)
        start = time.perf_counter()
        job = self.target.run(self.slot, self.seq, max_tokens)
        end = time.perf_counter()
        self.seq = self.seq + job.out
        cached = job.prompt_tokens - job.evaluated
        return TurnResult(token_ids=list(job.out), ttft_s=job.times[0] - start,
                          e2e_s=end - start, token_times=[t - start for t in job.times],
                          usage={"prompt_tokens": job.prompt_tokens, "cached_tokens": cached,
                                 "prefilled_tokens": job.evaluated, "recomputed_tokens": 0,
                                 "completion_tokens": len(job.out)})

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.target.release(self.slot)
