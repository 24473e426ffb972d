"""`pensieve serve --state-dir DIR`: the server's conversations survive restarts (issue 22).

The records and the KV are the engine's (pensieve_jax/engine/kept_sessions.py, the same records
as the in-process Sessions of `Engine(..., state_dir=DIR)`); what is the server's is here: each
record's owner, and the ConversationTable the kept conversations are reopened into.

A turn's record (owner, salt, exact token ids, the messages the template renders) is written
before the turn's last message goes out, so a turn the client saw finish is never lost, even on
SIGKILL. An ended, expired or evicted conversation's record is deleted. At shutdown the idle
conversations' device and host pages are written to page files within what is left of the grace
period (the most recently used first); at start every record is reopened: its conversation
continues from exactly its token ids, on the KV its page files hold (what they lack, or a
damaged file, is recomputed at its next turn). A directory written by another model or page
layout is refused (StateDirMismatch).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from pensieve_jax.engine.kept_sessions import KeptSessions
from pensieve_jax.session import Session
from serving.server.conversations import Conversation

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine
    from serving.server.conversations import ConversationTable

log = logging.getLogger(__name__)


def kept_sessions(engine: "Engine", directory: str | None) -> KeptSessions | None:
    """The engine's kept conversations (an engine built with state_dir), or those of directory
    for an engine built without one (its disk tier elsewhere, if any); None: neither. A
    directory other than the engine's own is refused (ValueError)."""
    kept = getattr(engine, "kept", None)
    if kept is None:
        return KeptSessions.open(engine, directory) if directory is not None else None
    if directory is not None and os.path.abspath(directory) != os.path.abspath(kept.directory):
        raise ValueError(f"state_dir {directory[:100]!r} differs from the engine's "
                         f"{kept.directory[:100]!r}")
    return kept


class KeptConversations:
    """A state directory's records, kept in step with the server's ConversationTable."""

    def __init__(self, engine: "Engine", directory: str | None = None):
        self.engine = engine
        self.sessions = kept_sessions(engine, directory)
        if self.sessions is None:
            raise ValueError("no state directory: give state_dir, or an engine built with one")
        self.owned = self.sessions is not getattr(engine, "kept", None)   # close() closes it

    def save(self, conv: "Conversation") -> None:
        """Durable when it returns (run it off the event loop)."""
        self.sessions.save(conv.session, conv.owner)

    def forget(self, conversation_id: str) -> None:
        self.sessions.forget(conversation_id)

    def reopen_all(self, table: "ConversationTable") -> int:
        """Open every kept conversation in table; returns how many. A record that cannot be
        reopened is logged and skipped."""
        opened = 0
        for record in self.sessions.records():
            cid = record.conversation_id
            try:
                held = self.sessions.reopen(record)
                session = Session(self.engine, cache_salt=record.cache_salt or None)
                session.conversation_id = cid
                session.continue_from(record.token_ids, earlier=record.messages)
            except Exception:  # noqa: BLE001 - one bad record costs only its conversation
                log.exception("kept conversation %s could not be reopened", cid[:100])
                continue
            table.accept(Conversation(session, record.owner))
            opened += 1
            log.info("reopened %s: %d tokens, %d with KV on disk", cid, len(record.token_ids),
                     held)
        return opened

    def flush(self, deadline: float | None = None) -> int:
        """Page files of the kept conversations' device and host pages, the most recently used
        first, none started after deadline (time.monotonic()); returns the pages written."""
        return self.sessions.flush(deadline)

    def close(self) -> None:
        """Close the records if the server opened them (an engine closes its own)."""
        if self.owned:
            self.sessions.close()

