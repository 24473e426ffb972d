"""`pensieve serve --state-dir`: conversations survive a SIGTERM and restart (their KV from the
disk tier) and a SIGKILL mid-turn (every acknowledged turn kept), with the same greedy tokens as
a conversation that never restarted (the in-process engine)."""

import hashlib
import json
import signal
import subprocess

import grpc
import pytest

from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc

from .conftest import GREEDY, LONG, collect, sampling, user
from .served import ROOT, Served, server_command
from .test_serving_e2e import SYSTEM, TEXTS, env  # noqa: F401 (env: a fixture)

pytestmark = pytest.mark.slow      # three server processes each


def turn(stub, text, cid="", params=GREEDY):
    messages = ([pb.Message(role="system", content=SYSTEM)] if not cid else []) + [user(text)]
    return collect(stub.Chat(pb.ChatRequest(conversation_id=cid, messages=messages,
                                            sampling=sampling(params))))


def connect(served):
    channel = grpc.insecure_channel(served.target)
    grpc.channel_ready_future(channel).result(timeout=30)
    return channel, pb_grpc.PensieveStub(channel)


def reference(engine, texts):
    """The replies' token ids of a conversation that never restarted."""
    local = engine.session(system=SYSTEM)
    try:
        return [list(local.send(t, GREEDY).token_ids) for t in texts]
    finally:
        local.close()


def test_a_conversation_survives_sigterm_and_restart_with_its_kv_from_disk(env, engine,
                                                                            tmp_path):
    state = str(tmp_path / "state")
    first = Served(env, "--state-dir", state)
    channel, stub = connect(first)
    cid, _, ids1, _, _ = turn(stub, TEXTS[0])
    _, _, ids2, _, _ = turn(stub, TEXTS[1], cid)
    channel.close()
    assert first.stop() == 0, "".join(first.lines)

    second = Served(env, "--state-dir", state)
    try:
        channel, stub = connect(second)
        _, _, ids3, last, _ = turn(stub, TEXTS[2], cid)
        stats = json.loads(stub.GetStats(pb.GetStatsRequest()).stats_json)
        channel.close()
    finally:
        assert second.stop() == 0, "".join(second.lines)
    assert [ids1, ids2, ids3] == reference(engine, TEXTS)
    assert last.usage.cached_tokens > 0 and last.usage.recomputed_tokens == 0
    assert last.usage.cached_disk_tokens == last.usage.cached_tokens    # all of it from disk
    assert stats["hit_tokens_by_tier"]["disk"] >= last.usage.cached_tokens


def test_a_flush_out_of_grace_is_recomputed_after_restart(env, engine, tmp_path):
    """--grace 0: the shutdown's flush has no time left and writes no page file; the kept
    conversation still continues after the restart, recomputed, with the same tokens."""
    state = tmp_path / "state"
    first = Served(env, "--state-dir", str(state), "--grace", "0")
    channel, stub = connect(first)
    cid, _, ids1, _, _ = turn(stub, TEXTS[0])
    channel.close()
    assert first.stop() == 0, "".join(first.lines)
    assert (state / "conversations.sqlite3").exists()
    assert not list((state / "kv").glob("*.kvp"))          # the flush had no time left

    second = Served(env, "--state-dir", str(state))
    try:
        channel, stub = connect(second)
        _, _, ids2, last, _ = turn(stub, TEXTS[1], cid)
        channel.close()
    finally:
        assert second.stop() == 0, "".join(second.lines)
    assert [ids1, ids2] == reference(engine, TEXTS[:2])
    assert last.usage.cached_tokens == 0 and last.usage.recomputed_tokens > 0


def test_after_sigkill_mid_turn_every_acknowledged_turn_is_kept(env, engine, tmp_path):
    state = str(tmp_path / "state")
    first = Served(env, "--state-dir", state)
    channel, stub = connect(first)
    cid, _, ids1, _, _ = turn(stub, TEXTS[0])
    stream = stub.Chat(pb.ChatRequest(conversation_id=cid, messages=[user("a long one")],
                                      sampling=sampling(LONG)))
    next(stream), next(stream)               # accepted, and a first piece: the turn runs
    first.proc.send_signal(signal.SIGKILL)
    assert first.stop(signal_it=False) == -signal.SIGKILL
    channel.close()

    second = Served(env, "--state-dir", state)
    try:
        channel, stub = connect(second)
        _, _, ids2, _, _ = turn(stub, TEXTS[1], cid)       # the killed turn never happened
        channel.close()
    finally:
        assert second.stop() == 0, "".join(second.lines)
    assert [ids1, ids2] == reference(engine, TEXTS[:2])


def test_a_truncated_page_file_costs_only_its_conversation(env, engine, tmp_path):
    state = tmp_path / "state"
    first = Served(env, "--state-dir", str(state))
    channel, stub = connect(first)
    a = turn(stub, TEXTS[0])[0]
    b = turn(stub, "another conversation")[0]
    channel.close()
    assert first.stop() == 0, "".join(first.lines)
    digest = hashlib.sha256(a.encode()).hexdigest()[:16]
    damaged = sorted((state / "kv").glob(f"{digest}-*.kvp"))
    assert damaged, sorted(p.name for p in (state / "kv").iterdir())
    for path in damaged:                      # torn writes: each file cut in half
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])

    second = Served(env, "--state-dir", str(state))
    try:
        channel, stub = connect(second)
        _, _, ids_a, last_a, _ = turn(stub, TEXTS[1], a)
        _, _, _, last_b, _ = turn(stub, "and more", b)
        channel.close()
    finally:
        assert second.stop() == 0, "".join(second.lines)
    assert ids_a == reference(engine, TEXTS[:2])[1]         # recomputed, the same tokens
    assert last_a.usage.cached_tokens == 0 and last_a.usage.recomputed_tokens > 0
    assert last_b.usage.cached_tokens > 0 and last_b.usage.recomputed_tokens == 0
    assert last_b.usage.cached_disk_tokens == last_b.usage.cached_tokens


def test_a_state_dir_of_another_page_layout_is_refused(env, tmp_path):
    state = str(tmp_path / "state")
    first = Served(env, "--state-dir", state)
    assert first.stop() == 0
    proc = subprocess.run([*server_command("--state-dir", state), "--page-size", "16"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "page_size" in proc.stderr and "written by another model or page layout" in proc.stderr
