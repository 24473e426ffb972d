"""Sessions kept in a state directory (`Engine(..., state_dir=DIR)`, issue 22) on random:tiny:
a named session's record is written before its reply returns; a later engine on DIR continues
it from exactly its token ids, on the KV its page files hold, with the tokens of a conversation
that never restarted; closing it deletes its record; a directory of another page layout is
refused; a flush cut short by its deadline writes the most recently used conversations first
and the rest is recomputed, correctly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pensieve_jax.engine.engine import Engine
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.engine.state_store import StateDirMismatch
from pensieve_jax.kvcache import disk_writes

P = SamplingParams(max_tokens=8, ignore_eos=True)
OPTS = dict(max_model_len=256, page_size=8, num_pages=128, max_batched_tokens=32)
PAGE_BYTES = 2 * 2 * 8 * 2 * 16 * 4       # tiny: 2 layers, page 8, 2 kv heads, dim 16, float32
TIERS = dict(host_cache_bytes=16 * PAGE_BYTES, disk_cache_bytes=400 * PAGE_BYTES)
TEXTS = ["hello there", "and now?", "last one"]


def kept_engine(directory, **kw):
    return Engine.from_pretrained("random:tiny", state_dir=str(directory),
                                  **{**OPTS, **TIERS, **kw})


@pytest.fixture(scope="module")
def reference():
    """The replies' token ids of conversations that never restarted (no cache reuse)."""
    eng = Engine.from_pretrained("random:tiny", cache_policy="stateless", **OPTS)
    cache = {}

    def replies(system, texts):
        key = (system, tuple(texts))
        if key not in cache:
            with eng.session(system=system) as s:
                cache[key] = [list(s.send(t, P).token_ids) for t in texts]
        return cache[key]
    yield replies
    eng.shutdown()


@pytest.mark.slow    # ~20 s: two engines and a disk round trip (.ci/run runs it)
def test_a_named_session_continues_in_a_later_engine_on_its_kv_from_disk(tmp_path, reference):
    first = kept_engine(tmp_path)
    s = first.session(system="be brief", conversation_id="alice")
    got = []
    for text in TEXTS[:2]:
        got.append(list(s.send(text, P).token_ids))
        # written before send() returned: the record is the session's exact state
        record = first.kept.record("alice")
        assert record.token_ids == tuple(s.token_ids)
        assert list(record.messages) == s.template_history
    assert [r.conversation_id for r in first.kept_conversations()] == ["alice"]
    history = s.token_ids
    first.close()                        # its KV flushed to page files
    assert first.kept.closed

    again = kept_engine(tmp_path)
    assert again.stats()["disk"]["unclaimed_files"] > 0
    s2 = again.session(conversation_id="alice")
    assert s2.token_ids == history
    assert s2.template_history == s.template_history
    reply = s2.send(TEXTS[2], P)
    got.append(list(reply.token_ids))
    assert got == reference("be brief", TEXTS)
    u = reply.usage
    assert u.cached_tokens == len(history) and u.recomputed_tokens == 0
    assert u.cached_disk_tokens == len(history) and u.cached_host_tokens == 0
    assert again.kept.record("alice").token_ids == tuple(s2.token_ids)
    s2.close()                           # ended: its record goes
    assert again.kept_conversations() == []
    again.close()

    third = kept_engine(tmp_path)
    fresh = third.session(conversation_id="alice")
    assert fresh.token_ids == [] and third.kept_conversations() == []
    third.close()


@pytest.mark.slow
def test_a_turn_returned_survives_sigkill(tmp_path):
    """A process killed right after send() returned: the turn is in the record."""
    code = f"""
import json, os, signal
from tests.engine.test_kept_sessions import P, kept_engine
eng = kept_engine({str(tmp_path)!r})
s = eng.session(system="be brief", conversation_id="dora")
s.send("hello there", P)
print(json.dumps(s.token_ids), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ids = json.loads(proc.stdout.strip().splitlines()[-1])
    eng = kept_engine(tmp_path)
    try:
        s = eng.session(conversation_id="dora")
        assert s.token_ids == ids and len(ids) > 8
        assert s.send("and now?", P).usage.prompt_tokens > len(ids)
    finally:
        eng.close()


@pytest.mark.slow    # ~9 s of engines; .ci/run runs it
def test_kept_sessions_refuse_what_they_cannot_keep(tmp_path):
    eng = kept_engine(tmp_path)
    try:
        s = eng.session(system="be brief", conversation_id="bob", cache_salt="t1")
        with pytest.raises(ValueError, match="open in another Session"):
            eng.session(conversation_id="bob")
        s.send("hi", P)
        del s                              # not closed: kept, and free to be opened again
        with pytest.raises(ValueError, match="kept already"):
            eng.session(system="other", conversation_id="bob")
        with pytest.raises(ValueError, match="cache_salt"):
            eng.session(conversation_id="bob", cache_salt="t2")
        kept = eng.kept.record("bob").token_ids
        again = eng.session(conversation_id="bob")         # this process's KV: all cached
        assert again.cache_salt == "t1" and again.token_ids == list(kept)
        usage = again.send("more", P).usage
        assert usage.cached_tokens == len(kept) and usage.recomputed_tokens == 0
        assert usage.cached_disk_tokens == 0
        with pytest.raises(ValueError, match="conversation_id"):
            eng.session(conversation_id="  ")
    finally:
        eng.close()


def test_a_state_dir_of_another_page_layout_is_refused_at_construction(tmp_path):
    kept_engine(tmp_path).close()
    with pytest.raises(StateDirMismatch, match="page_size"):
        kept_engine(tmp_path, page_size=16)
    with pytest.raises(ValueError, match="disk_cache_dir"):
        kept_engine(tmp_path / "other", disk_cache_dir=str(tmp_path / "elsewhere"))


@pytest.mark.slow    # ~11 s: two engines; .ci/run runs it
def test_an_unnamed_session_or_an_engine_without_state_dir_keeps_nothing(tmp_path):
    eng = kept_engine(tmp_path)
    s = eng.session(system="be brief")
    s.send("hi", P)
    assert eng.kept_conversations() == []
    eng.close()
    plain = Engine.from_pretrained("random:tiny", **OPTS)
    named = plain.session(conversation_id="carol")
    named.send("hi", P)
    assert named.conversation_id == "carol" and plain.kept_conversations() == []
    plain.close()


class SteppingClock:
    """time.monotonic for disk_writes: 0 for the first `ticks` reads, then far past."""

    def __init__(self, ticks):
        self.left = ticks

    def monotonic(self):
        self.left -= 1
        return 0.0 if self.left >= 0 else 1e9

    def time(self):
        return time.time()


def test_a_flush_cut_short_writes_the_most_recent_first_and_restarts_correctly(
        tmp_path, monkeypatch, reference):
    eng = kept_engine(tmp_path)
    texts = {"old": ["one", "two"], "new": ["three", "four"]}
    sessions = {}
    for cid in ("old", "new"):             # "new" is the more recently updated record
        sessions[cid] = s = eng.session(system=cid, conversation_id=cid)
        for text in texts[cid]:
            s.send(text, P)
    history = {cid: s.token_ids for cid, s in sessions.items()}
    assert eng.kept.flush(deadline=time.monotonic() - 1) == 0       # no time left: nothing
    # time for one file (a chunk of 4 pages) only: it is the most recent conversation's
    monkeypatch.setattr(disk_writes, "time", SteppingClock(1))
    pages = eng.kept.flush(deadline=1.0)
    monkeypatch.undo()
    assert pages == eng.store.evictor.chunk_pages
    eng.close()                              # flushed already: not again

    again = kept_engine(tmp_path)
    usage = {}
    for cid in ("old", "new"):
        s = again.session(conversation_id=cid)
        assert s.token_ids == history[cid]
        reply = s.send("five", P)
        assert list(reply.token_ids) == reference(cid, texts[cid] + ["five"])[-1]
        usage[cid] = reply.usage
    assert usage["new"].cached_disk_tokens == pages * OPTS["page_size"]
    assert usage["new"].recomputed_tokens == len(history["new"]) - pages * OPTS["page_size"]
    assert usage["old"].cached_tokens == 0
    assert usage["old"].recomputed_tokens == len(history["old"])
    again.close()
