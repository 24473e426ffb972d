"""`pensieve serve --state-dir DIR`: the server's conversations survive restarts (issue 22).

    DIR/conversations.sqlite3   one record per kept Chat conversation (pensieve_jax/state_store.py)
    DIR/kv/                     the disk tier's page files (EngineConfig.disk_cache_dir)

A turn's record (owner, salt, exact token ids, the messages the template renders) is written
before the turn's last message goes out, so a turn the client saw finish is never lost, even on
SIGKILL. An ended, expired or evicted conversation's record is deleted. At shutdown the idle
conversations' device and host pages are written to page files (within the grace period); at
start every record is reopened: its conversation continues from exactly its token ids, on the
KV its page files hold (what they lack, or a damaged file, is recomputed at its next turn). A
directory written by another model or page layout is refused (StateDirMismatch).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from pensieve_jax.engine import kept_state
from pensieve_jax.session import Session
from pensieve_jax.state_store import ConversationRecord, StateStore
from serving.server.conversations import Conversation

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine
    from serving.server.conversations import ConversationTable

log = logging.getLogger(__name__)
KV_DIR = "kv"


def engine_options(state_dir: str, options: dict) -> dict:
    """EngineConfig options for a server with a state directory: the disk tier in DIR/kv (with
    a host tier, which it needs: 256 MiB host and 4 GiB disk unless set)."""
    options = dict(options)
    options["disk_cache_dir"] = os.path.join(state_dir, KV_DIR)
    options.setdefault("host_cache_bytes", 256 << 20)
    options.setdefault("disk_cache_bytes", 4 << 30)
    return options


class KeptConversations:
    """The records of a state directory, kept in step with the server's ConversationTable."""

    def __init__(self, engine: "Engine", directory: str):
        self.engine = engine
        self.store = StateStore.open(directory, kept_state.fingerprint(engine))

    def save(self, conv: "Conversation") -> None:
        """Durable when it returns (run it off the event loop)."""
        s = conv.session
        self.store.save(ConversationRecord(s.conversation_id, conv.owner, s.cache_salt or "",
                                           tuple(s.token_ids), tuple(s.template_history)))

    def forget(self, conversation_id: str) -> None:
        self.store.delete(conversation_id)

    def reopen_all(self, table: "ConversationTable") -> int:
        """Open every kept conversation in table; returns how many. A record that cannot be
        reopened is logged and skipped."""
        opened = 0
        for record in self.store.records():
            cid = record.conversation_id
            try:
                held = kept_state.reopen(self.engine, cid, record.token_ids, record.cache_salt)
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

    def flush(self) -> int:
        """Page files of every idle conversation's device and host pages; returns pages."""
        return kept_state.flush_to_disk(self.engine)

    def close(self) -> None:
        self.store.close()
