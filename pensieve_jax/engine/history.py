"""A conversation's token history between its turns: the process's one copy, kept by the
conversation store whatever its KV went through (`Conversation.token_ids`). Callers on any
thread read and set it here (`Engine.history`); the Session keeps none of its own.

    operation           runs on the engine thread          the conversation
    token_ids           beside the step in flight (drains   unchanged (hold: an open Session
                        first if one of its turns runs)     holds it: the TTL lets only its
                                                            KV go, not its ids, until the
                                                            Session is closed or collected)
    rewind              between steps (ConversationBusy     ids become exactly the given ones
                        while a turn runs)                  (created if unknown, held); the KV
                                                            of their computed prefix stays
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import weakref
from typing import NamedTuple, Sequence

from pensieve_jax.engine.errors import EngineClosed
from pensieve_jax.engine.loop import StepLoop
from pensieve_jax.engine.request import check_history
from pensieve_jax.engine.scheduler import Scheduler
from pensieve_jax.engine.turns import Turns
from pensieve_jax.engine.worker import EngineThread
from pensieve_jax.kvcache.conversations import ConversationStore


class ConversationHistory(NamedTuple):
    """The engine's parts a history operation touches (engine.py builds it)."""
    store: ConversationStore
    scheduler: Scheduler
    turns: Turns
    steps: StepLoop
    thread: EngineThread
    vocab_size: int
    max_model_len: int

    def token_ids(self, conversation_id: str, hold: bool = False) -> list[int]:
        """A conversation's whole token history: its turns' prompts and outputs so far,
        exactly as its next turn must extend them ([]: unknown). hold: an open Session's: until
        end_conversation, conversation_ttl_s lets only its KV go, not its history. Read on
        the engine thread beside a step in flight (an idle conversation's tokens do not
        change)."""
        done: concurrent.futures.Future = concurrent.futures.Future()

        def read() -> None:
            try:
                if hold:
                    self.store.held.add(conversation_id)
                conv = self.store.conversations.get(conversation_id)
                if conv is not None and conv.busy and not conv.flushing:
                    self.steps.drain()           # a turn runs: no placeholder token left
                done.set_result([] if conv is None else list(conv.token_ids))
            except Exception as e:  # noqa: BLE001 - the caller's
                done.set_exception(e)
        read.overlaps = True        # worker.overlaps: runs beside the step in flight
        self.thread.post(read)
        return done.result()

    def hold_while(self, owner: object, conversation_id: str) -> None:
        """The conversation's hold (token_ids' hold=True) ends when `owner` (a Session) is
        garbage collected without being closed: the TTL may then forget it again."""
        weakref.finalize(owner, self.release, conversation_id)

    def release(self, conversation_id: str) -> None:
        """End an open Session's hold on a conversation (its history stays until the TTL or
        end_conversation). Any thread; nothing to do on a closed engine."""
        with contextlib.suppress(EngineClosed):
            self.thread.post(lambda: self.store.held.discard(conversation_id))

    def rewind(self, conversation_id: str, token_ids: Sequence[int] = (),
               cache_salt: str | None = None, keep: int | None = None,
               wait: bool = True) -> int | None:
        """Between its turns, a conversation's token history becomes exactly token_ids (or,
        with keep, its first `keep` tokens); it is created if unknown, and held. The KV of the
        computed prefix they share stays (a cache flush still to run is given up); returns its
        tokens. ConversationBusy while a turn runs; ValueError for bad input (naming the
        field). wait=False: like cancel(), returns None at once; what is posted later (a turn,
        a read) comes after it."""
        ids = check_history(conversation_id, token_ids, self.vocab_size, self.max_model_len,
                            keep)

        def run() -> int:
            for req in [r for r in self.scheduler.running
                        if r.finished and r.conversation.id == conversation_id]:
                self.turns.release(req)          # its cache flush: the history changes anyway
            conv = self.store.conversations.get(conversation_id)
            new = ids if keep is None else (conv.token_ids[:keep] if conv is not None else [])
            return self.store.rewind(conversation_id, new, cache_salt or "").num_computed
        if wait:
            return self.thread.call(run)
        self.thread.post(run)
        return None
