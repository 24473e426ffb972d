"""Conversations kept in a state directory (issue 22): one implementation of their records for
the in-process Sessions of `Engine(..., state_dir=DIR)` and the Chat conversations of `pensieve
serve --state-dir DIR` (serving/server/state.py adds owners and its ConversationTable).

    DIR/conversations.sqlite3   one record per kept conversation (state_store.py)
    DIR/kv/                     the disk tier's page files (kept_state.with_state_dir)

    kept = KeptSessions.open(engine, DIR)        # StateDirMismatch: another model or layout
    kept.save(session)                           # after each turn; durable when it returns
    kept.attach(session, started)                # a named Session: continue its record
    kept.forget(conversation_id)                 # an ended conversation
    kept.flush(deadline)                         # at shutdown: its KV to page files
    kept.close()

A record holds what continuing the conversation needs: its exact token ids (the engine's history
of it: the next turn finds the kept KV, or recomputes exactly those tokens), the messages its
chat template renders, its owner and cache salt. A conversation reopened in a later process
continues from exactly its token ids, on the KV its page files hold (what they lack is
recomputed at its next turn).
Neither Session nor the server's conversations have sampling defaults of their own (each turn
brings its SamplingParams), so records keep none (ConversationRecord.sampling stays None).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from pensieve_jax.engine import kept_state
from pensieve_jax.engine.config import EngineConfig
from pensieve_jax.engine.errors import EngineClosed
from pensieve_jax.engine.parts import page_layout
from pensieve_jax.engine.state_store import ConversationRecord, StateStore
from pensieve_jax.weights import LoadedModel

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine

log = logging.getLogger(__name__)

__all__ = ["KeptSessions", "open_state_dir"]


def open_state_dir(state_dir: str | os.PathLike, model: LoadedModel, config: EngineConfig,
                   dtype) -> tuple[EngineConfig, StateStore]:
    """An engine's config with its disk tier in state_dir/kv (kept_state.with_state_dir), and
    the directory's records, before the engine is built: StateDirMismatch if another model or
    page layout wrote them."""
    config = kept_state.with_state_dir(config, state_dir)
    layout = page_layout(model, config, dtype)
    return config, StateStore.open(state_dir, kept_state.fingerprint(layout))


class KeptSessions:
    """The records of one state directory, for one engine. Thread-safe. `session` arguments are
    Sessions (pensieve_jax/session.py): anything with conversation_id, cache_salt, token_ids,
    template_history and continue_from()."""

    def __init__(self, engine: "Engine", store: StateStore):
        self.engine, self.store = engine, store
        self.directory = os.path.dirname(store.path)
        self.closed = False                  # close() ran: saves are skipped
        self.flushed = False                 # flush() ran (close() does not flush again)
        self._lock = threading.Lock()
        self._open: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()

    @classmethod
    def open(cls, engine: "Engine", directory: str | os.PathLike) -> "KeptSessions":
        """The records in directory for engine; StateDirMismatch if another model or page
        layout wrote them."""
        return cls(engine, StateStore.open(directory,
                                           kept_state.fingerprint(engine.parts.disk.layout)))

    # -- records ------------------------------------------------------------------------------

    def save(self, session, owner: str = "") -> None:
        """Write session's record (owner: who may continue it, the server's); durable when it
        returns. Its token ids are the engine's history of the conversation. Skipped once
        closed, or the engine is (nothing more was acknowledged)."""
        if self.closed:
            return
        try:
            ids = tuple(session.token_ids)
        except EngineClosed:
            return
        record = ConversationRecord(session.conversation_id, owner, session.cache_salt or "",
                                    ids, tuple(session.template_history))
        with self._lock:
            if not self.closed:
                self.store.save(record)
                self.flushed = False         # its KV changed since the last flush

    def record(self, conversation_id: str) -> ConversationRecord | None:
        with self._lock:
            return None if self.closed else self.store.load(conversation_id)

    def records(self) -> list[ConversationRecord]:
        """Every kept record, least recently updated first."""
        with self._lock:
            return [] if self.closed else list(self.store.records())

    def forget(self, conversation_id: str) -> bool:
        """Delete a conversation's record (it ended); False if it had none."""
        with self._lock:
            self._open.pop(conversation_id, None)
            return False if self.closed else self.store.delete(conversation_id)

    # -- sessions -----------------------------------------------------------------------------

    def reopen(self, record: ConversationRecord) -> int:
        """Make the engine hold record's conversation, idle, on the KV its page files keep
        (kept_state.reopen); returns those tokens."""
        return kept_state.reopen(self.engine, record.conversation_id, record.token_ids,
                                 record.cache_salt)

    def attach(self, session, started: bool = False) -> ConversationRecord | None:
        """Keep session, named by its conversation_id: if a record has that id, session
        continues it (its exact token ids and messages, on the KV the engine or the page files
        hold) and the record is returned; else its record is written at its first turn.
        started: session was given a system prompt or history, which only a new conversation
        may be. ValueError if another open Session has the id, if a kept conversation is given
        a start, or another cache salt than it was kept with."""
        cid = session.conversation_id
        with self._lock:
            other = self._open.get(cid)
            if other is not None and other is not session:
                raise ValueError(f"conversation_id {cid[:100]!r} is open in another Session: "
                                 "use that one, or close it first")
            self._open[cid] = session
        try:
            record = self.record(cid)
            if record is not None:
                self._continue(session, record, started)
            return record
        except BaseException:
            with self._lock:
                self._open.pop(cid, None)
            raise

    def _continue(self, session, record: ConversationRecord, started: bool) -> None:
        cid = record.conversation_id[:100]
        if started:
            raise ValueError(f"conversation_id {cid!r} is kept already: continue it without "
                             "system or history (or close it to start afresh)")
        if session.cache_salt is None:
            session.cache_salt = record.cache_salt or None
        elif session.cache_salt != record.cache_salt:
            raise ValueError(f"cache_salt differs from the one conversation {cid!r} was kept "
                             "with")
        held = self.reopen(record)
        session.continue_from(record.token_ids, earlier=record.messages)
        log.info("continuing kept conversation %s: %d tokens, %d with KV held", cid,
                 len(record.token_ids), held)

    # -- shutdown -----------------------------------------------------------------------------

    def flush(self, deadline: float | None = None) -> int:
        """Page files of the kept conversations' device and host pages, the most recently
        updated first; with a deadline (time.monotonic()), none started after it (the rest is
        recomputed after a restart). Returns the pages written."""
        ids = [r.conversation_id for r in reversed(self.records())]
        self.flushed = True
        return kept_state.flush_to_disk(self.engine, ids, deadline) if ids else 0

    def close(self) -> None:
        """Close the records (idempotent); saves are skipped from here on."""
        with self._lock:
            if not self.closed:
                self.closed = True
                self.store.close()

    def shut(self) -> None:
        """The engine is closing: flush (unless a bounded flush ran already, e.g. a server's
        shutdown), then close. A flush that fails is logged: the records are durable anyway."""
        try:
            if not self.flushed and not self.closed:
                pages = self.flush()
                log.info("kept conversations flushed: %d pages written", pages)
        except Exception:  # noqa: BLE001 - closing anyway; their KV is recomputed later
            log.exception("flushing kept conversations failed")
        finally:
            self.close()
