"""The state directory's conversation store: records round-trip, survive SIGKILL right after
save() returns, and a directory of another model or page layout is refused."""

import os
import signal
import subprocess
import sys

import pytest

from pensieve_jax.engine.state_store import ConversationRecord, StateDirMismatch, StateStore

FINGERPRINT = {"model": "random:tiny", "page_size": 16, "dtype": "float32"}


def test_records_round_trip_and_delete(tmp_path):
    record = ConversationRecord("chat-1", "owner-a", "salt", (1, 2, 3),
                                ({"role": "user", "content": "hi"},), {"max_tokens": 8})
    with StateStore.open(tmp_path, FINGERPRINT) as store:
        store.save(record)
        store.save(ConversationRecord("chat-2", token_ids=(4,)))
        assert store.load("chat-1") == record
        assert [r.conversation_id for r in store.records()] == ["chat-1", "chat-2"]
        assert store.delete("chat-2") and not store.delete("chat-2")
        assert len(store) == 1
    with StateStore.open(tmp_path, FINGERPRINT) as store:     # reopened: still there
        assert store.load("chat-1") == record
        assert store.load("chat-2") is None


def test_saved_record_survives_sigkill(tmp_path):
    code = f"""
import os, signal
from pensieve_jax.engine.state_store import ConversationRecord, StateStore
store = StateStore.open({str(tmp_path)!r}, {FINGERPRINT!r})
store.save(ConversationRecord("chat-k", "o", "", tuple(range(1000))))
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    with StateStore.open(tmp_path, FINGERPRINT) as store:
        assert store.load("chat-k").token_ids == tuple(range(1000))


def test_other_model_or_layout_is_refused(tmp_path):
    StateStore.open(tmp_path, FINGERPRINT).close()
    with pytest.raises(StateDirMismatch, match="page_size: 16 .* vs 32"):
        StateStore.open(tmp_path, {**FINGERPRINT, "page_size": 32})
    with pytest.raises(StateDirMismatch, match="model"):
        StateStore.open(tmp_path, {**FINGERPRINT, "model": "other"})
    assert os.path.exists(tmp_path / "conversations.sqlite3")
