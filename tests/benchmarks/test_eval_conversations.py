"""eval_conversations: input shapes, and resuming after an interruption (random:tiny)."""

import json

import pytest

import eval_conversations as ev
from pensieve_jax.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow   # long: `make test-all` runs it (not `make test`)

CONVERSATIONS = [
    {"id": "a", "system": "Be terse.", "turns": ["hi", "more"]},
    {"id": "b", "messages": [{"role": "user", "content": "one"},
                             {"role": "assistant", "content": "ignored"},
                             {"role": "user", "content": "two"}]},
    {"conversations": [{"from": "human", "value": "three"}]},
    {"id": "d", "turns": ["four"], "max_tokens": 2},
    {"id": "e", "turns": ["five", "six", "seven"]},
]


def write_input(path, records=CONVERSATIONS):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_output(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_parse_shapes(tmp_path):
    convs = ev.read_conversations(write_input(tmp_path / "in.jsonl"))
    assert [c.id for c in convs] == ["a", "b", "line-3", "d", "e"]
    assert convs[0].system == "Be terse." and convs[0].turns == ("hi", "more")
    assert convs[1].turns == ("one", "two")
    assert convs[3].max_tokens == 2
    with pytest.raises(ValueError, match="duplicate"):
        ev.read_conversations(write_input(tmp_path / "dup.jsonl", [{"id": 1, "turns": ["x"]}] * 2))
    with pytest.raises(ValueError, match="no user turns"):
        ev.parse_conversation({"id": "x", "turns": [" "]}, 1)


def test_resume_after_interruption(tiny_engine, tmp_path):
    src = write_input(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    convs = ev.read_conversations(src)
    params = SamplingParams(max_tokens=3)

    first = ev.run(tiny_engine, convs, out, params, concurrency=2, stop_after=2)
    assert first["written"] >= 2 and first["failed"] == 0
    done = {r["id"] for r in read_output(out)}
    assert len(done) == first["written"] < len(convs)

    # A kill in the middle of writing a line: the partial line is dropped and redone.
    with open(out, "a") as f:
        f.write('{"id": "e", "turns": [{"user": "fi')
    second = ev.run(tiny_engine, convs, out, params, concurrency=2)
    assert second["skipped"] == len(done)
    assert second["written"] == len(convs) - len(done)
    records = read_output(out)
    assert sorted(r["id"] for r in records) == sorted(c.id for c in convs)   # each exactly once
    by_id = {r["id"]: r for r in records}
    assert [t["user"] for t in by_id["e"]["turns"]] == ["five", "six", "seven"]
    assert by_id["d"]["turns"][0]["usage"]["completion_tokens"] <= 2
    later = by_id["e"]["turns"][1]["usage"]
    assert later["cached_tokens"] > 0 and later["cached_tokens"] + later["prefilled_tokens"] \
        + later["recomputed_tokens"] == later["prompt_tokens"]

    third = ev.run(tiny_engine, convs, out, params)
    assert third["written"] == 0 and third["skipped"] == len(convs)
    assert len(read_output(out)) == len(convs)


def test_cli_and_rejected_input(tiny_engine, tmp_path, capsys):
    src = write_input(tmp_path / "in.jsonl", [{"id": "long", "turns": ["x" * 600]},
                                              {"id": "ok", "turns": ["hello"]}])
    out = tmp_path / "out.jsonl"
    status = ev.main([str(src), str(out), "--max-tokens", "2", "--no-progress"],
                     engine=tiny_engine)
    assert status == 0
    by_id = {r["id"]: r for r in read_output(out)}
    assert "error" in by_id["long"] and by_id["long"]["turns"] == []
    assert len(by_id["ok"]["turns"]) == 1 and "error" not in by_id["ok"]
    assert ev.main([str(src), str(out), "--no-progress"], engine=tiny_engine) == 0
    assert "0 written" in capsys.readouterr().out
    assert len(read_output(out)) == 2
