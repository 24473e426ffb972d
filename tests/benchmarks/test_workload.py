"""The workload generators: means, seeds, timing, ShareGPT files (numpy only, no engine)."""

import json
import math

import numpy as np
import pytest

import workload as wl


@pytest.mark.parametrize("gen, shape", [(wl.sharegpt, wl.SHAREGPT), (wl.ultrachat, wl.ULTRACHAT)])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_synthetic_means(gen, shape, scale):
    s = wl.summarize(gen(4000, seed=3, scale=scale))
    assert s["conversations"] == 4000
    assert s["mean_turns"] == pytest.approx(shape["turns"], rel=0.05)
    assert s["mean_prompt_tokens"] == pytest.approx(shape["prompt"] * scale, rel=0.05)
    assert s["mean_answer_tokens"] == pytest.approx(shape["answer"] * scale, rel=0.05)


def test_seeds_reproducible_and_distinct():
    a, b, c = wl.sharegpt(50, seed=1), wl.sharegpt(50, seed=1), wl.sharegpt(50, seed=2)
    assert a == b
    assert a != c
    assert len({x.id for x in a}) == 50
    w1 = wl.schedule(a, rate=2.0, think_time_s=1.0, seed=5)
    w2 = wl.schedule(b, rate=2.0, think_time_s=1.0, seed=5)
    assert w1 == w2
    assert w1 != wl.schedule(a, rate=2.0, think_time_s=1.0, seed=6)
    ids1 = wl.token_ids_for(a[0], 1000, seed=0)
    assert ids1 == wl.token_ids_for(a[0], 1000, seed=0)
    assert ids1 != wl.token_ids_for(a[0], 1000, seed=1)
    assert [len(t) for t in ids1[1]] == [t.prompt_len for t in a[0].turns]


def test_max_context_and_max_turns():
    convs = wl.sharegpt(500, seed=0, max_context=300, max_turns=4)
    assert len(convs) == 500
    assert all(c.context_len() <= 300 and 1 <= len(c.turns) <= 4 for c in convs)


def test_multi_round_qa_shares_the_system_prompt():
    convs = wl.multi_round_qa(6, rounds=3, system_len=200, answer_len=40, scale=0.5)
    assert all(len(c.turns) == 3 and c.system_len == 100 for c in convs)
    assert {t.answer_len for c in convs for t in c.turns} == {20}
    shared = {}
    systems = [wl.token_ids_for(c, 500, 0, shared)[0] for c in convs]
    assert all(s == systems[0] and len(s) == 100 for s in systems)
    users = [wl.token_ids_for(c, 500, 0, shared)[1][0] for c in convs]
    assert users[0] != users[1]


def test_poisson_arrivals_and_think_times():
    rng = np.random.default_rng(0)
    arr = wl.poisson_arrivals(20000, rate=4.0, rng=rng)
    assert arr[0] == 0 and np.all(np.diff(arr) >= 0)
    assert np.mean(np.diff(arr)) == pytest.approx(0.25, rel=0.03)
    assert np.all(wl.poisson_arrivals(5, math.inf, rng) == 0)
    thinks = wl.think_times(20001, 2.0, rng)
    assert thinks[0] == 0 and np.mean(thinks[1:]) == pytest.approx(2.0, rel=0.03)
    w = wl.schedule(wl.sharegpt(10, seed=0), rate=1.0, think_time_s=0.5)
    assert len(w.arrivals_s) == 10
    assert [len(t) for t in w.think_s] == [len(c.turns) for c in w.conversations]
    assert w.summary()["conversations"] == 10


def test_load_sharegpt(tmp_path):
    records = [
        {"id": "a", "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "Hi! " * 10},
            {"from": "human", "value": "More"}, {"from": "human", "value": "please"},
            {"from": "gpt", "value": "Sure."}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "orphan"},
                                      {"from": "human", "value": "question?"}]},
        {"id": "c", "conversations": [{"from": "gpt", "value": "only the model"}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(records))

    class WordTokenizer:
        def encode(self, s):
            return s.split()

    convs = wl.load_sharegpt(path, tokenizer=WordTokenizer(), default_answer_len=7)
    assert [c.id for c in convs] == ["a", "b"]
    a, b = convs
    assert a.system == "Be brief." and a.system_len == 2
    assert [t.text for t in a.turns] == ["Hello there", "More\nplease"]
    assert [(t.prompt_len, t.answer_len) for t in a.turns] == [(2, 10), (2, 1)]
    assert b.turns[0].text == "question?" and b.turns[0].answer_len == 7
    jsonl = tmp_path / "sg.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert [c.id for c in wl.load_sharegpt(jsonl, max_conversations=1)] == ["a"]
    out = tmp_path / "round.json"
    wl.write_sharegpt(convs, out)
    again = wl.load_sharegpt(out, tokenizer=WordTokenizer())
    assert [t.text for t in again[0].turns] == [t.text for t in a.turns]
