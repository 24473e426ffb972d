"""Conversation records that survive restarts: an embedded transactional store (SQLite) in a
state directory (issue 22).

    store = StateStore.open(state_dir, fingerprint={"model": ..., "page_size": ...})
    store.save(ConversationRecord("chat-...", owner, salt, token_ids, messages, sampling))
    for record in store.records(): ...           # on start: the kept conversations
    store.delete("chat-...")

A record is written when a turn's reply has been delivered, in one transaction with SQLite's
write-ahead log and `synchronous=FULL`: once save() returns the record is on disk, even if the
process is killed at once. A record holds what continuing the conversation needs: its exact token
history (so the next turn finds the kept KV, or recomputes exactly that), the messages the chat
template renders, its owner (the API key digest that created it), cache salt and sampling
defaults.

The directory remembers the fingerprint it was created with (the model and the KV page layout);
opening it with another fingerprint raises StateDirMismatch naming the fields that differ, so a
state dir is never served by a model it was not written by.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import time
from typing import Any, Iterator, Mapping, Sequence

DB_NAME = "conversations.sqlite3"
SCHEMA_VERSION = 1


class StateDirMismatch(ValueError):
    """The state directory was written by another model or KV page layout."""


@dataclasses.dataclass(frozen=True)
class ConversationRecord:
    """A kept conversation as stored."""
    conversation_id: str
    owner: str = ""
    cache_salt: str = ""
    token_ids: tuple[int, ...] = ()
    messages: tuple[Mapping[str, str], ...] = ()
    sampling: Mapping[str, Any] | None = None
    updated: float = dataclasses.field(default_factory=time.time)


def _describe(fields: Mapping[str, Any]) -> str:
    return json.dumps(dict(fields), sort_keys=True, default=str)


class StateStore:
    """The conversation records of one state directory. Thread-safe (one connection, a lock)."""

    def __init__(self, connection: sqlite3.Connection, path: str,
                 fingerprint: Mapping[str, Any] | None = None):
        self._db = connection
        self._lock = threading.Lock()
        self.path = path
        self._check_fingerprint(dict(fingerprint or {}))

    @classmethod
    def open(cls, directory: str | os.PathLike,
             fingerprint: Mapping[str, Any] | None = None) -> "StateStore":
        """Open (or create) the store in directory. A directory created with another
        fingerprint raises StateDirMismatch."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(os.fspath(directory), DB_NAME)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("CREATE TABLE IF NOT EXISTS conversations (id TEXT PRIMARY KEY, owner TEXT, "
                   "salt TEXT, token_ids TEXT, messages TEXT, sampling TEXT, updated REAL)")
        return cls(db, path, fingerprint)

    def _check_fingerprint(self, fingerprint: dict[str, Any]) -> None:
        wanted = {"schema": SCHEMA_VERSION, **fingerprint}
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key='fingerprint'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('fingerprint', ?)",
                                 (_describe(wanted),))
                return
        stored = json.loads(row[0])
        wanted = json.loads(_describe(wanted))        # compare as stored (JSON types)
        differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        if differ:
            details = ", ".join(f"{k}: {stored.get(k)!r} (dir) vs {wanted.get(k)!r} (now)"
                                for k in differ)
            raise StateDirMismatch(f"state directory {os.path.dirname(self.path)!r} was written "
                                   f"by another model or page layout ({details}); use another "
                                   "--state-dir or start it afresh")

    def save(self, record: ConversationRecord) -> None:
        """Write (or replace) a record; durable when this returns."""
        row = (record.conversation_id, record.owner, record.cache_salt,
               json.dumps(list(record.token_ids)), json.dumps([dict(m) for m in record.messages]),
               json.dumps(dict(record.sampling)) if record.sampling is not None else None,
               record.updated)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO conversations VALUES (?,?,?,?,?,?,?)", row)

    def load(self, conversation_id: str) -> ConversationRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM conversations WHERE id=?",
                                   (conversation_id,)).fetchone()
        return None if row is None else self._record(row)

    def delete(self, conversation_id: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM conversations WHERE id=?", (conversation_id,))
        return cur.rowcount > 0

    def records(self) -> Iterator[ConversationRecord]:
        """Every kept record, least recently updated first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM conversations ORDER BY updated").fetchall()
        return (self._record(r) for r in rows)

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0]

    @staticmethod
    def _record(row: Sequence[Any]) -> ConversationRecord:
        cid, owner, salt, ids, messages, sampling, updated = row
        return ConversationRecord(cid, owner or "", salt or "", tuple(json.loads(ids)),
                                  tuple(json.loads(messages)),
                                  json.loads(sampling) if sampling else None, updated)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
