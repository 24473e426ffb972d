"""multiturn.py and multiturn_lib/: the replay against a random:tiny engine, and the metrics it
reports."""

import json
import math

import pytest

import multiturn
import workload as wl
from multiturn_lib.engine_target import EngineTarget
from multiturn_lib.grpc_target import GrpcTarget
from multiturn_lib.hf_peer import strip_out
from multiturn_lib.measure import measure
from multiturn_lib.metrics import compare_policies, summarize_pass, throughput_at_latency
from multiturn_lib.precompile import enable_compile_cache, warm_up
from multiturn_lib.report import merge_results
from multiturn_lib.runners import engine_options
from multiturn_lib.turns import TurnRecord

pytestmark = pytest.mark.slow   # long: `make test-all` runs it (not `make test`)


def record(conv, turn, submit, e2e, tokens=10, ttft=0.1, **usage):
    return TurnRecord(conv, turn, submit, ttft, e2e, tokens,
                      {"prompt_tokens": 5, "completion_tokens": tokens, **usage})


def test_summarize_pass_window_and_turns():
    recs = [record(i % 3, i // 3, submit=float(i), e2e=1.0, ttft=0.1 * (i // 3),
                   cached_tokens=i // 3, prefilled_tokens=5 - i // 3) for i in range(30)]
    s = summarize_pass(recs, wall_s=31.0)
    assert s["whole_run"]["requests"] == 30
    assert s["whole_run"]["requests_per_s"] == pytest.approx(30 / 31)
    assert s["steady"]["requests"] < 30                      # ramp and drain left out
    assert s["steady"]["normalized_latency_s_per_token"]["p90"] == pytest.approx(0.1)
    assert [r["turn"] for r in s["ttft_by_turn"]] == list(range(10))
    assert s["ttft_by_turn"][4]["mean"] == pytest.approx(0.4)
    assert s["tokens"]["prompt_tokens"] == 150
    tiers = s["prompt_tokens_by_tier"]
    assert tiers["device_hit"] + tiers["prefilled"] == pytest.approx(1.0)
    assert tiers["host_hit"] == tiers["recomputed"] == 0


def test_throughput_at_equal_latency():
    stateless = [(1.0, 0.05), (2.0, 0.10), (3.0, 0.30)]
    stateful = [(1.0, 0.04), (4.0, 0.06), (8.0, 0.20)]
    assert throughput_at_latency(stateless, 0.20) == (pytest.approx(2.5), True)
    assert throughput_at_latency(stateful, 0.13) == (pytest.approx(6.0), True)
    assert throughput_at_latency(stateful, 1.0) == (8.0, False)      # a lower bound
    assert throughput_at_latency(stateful, 0.01) == (0.0, True)
    rows = compare_policies({"stateless": stateless, "stateful": stateful})
    # at 0.05 s/token: stateful 1 + 3 * 0.5 = 2.5 req/s vs 1; at 0.10: 4 + 4 * 0.04 / 0.14 vs 2
    assert [r["ratio"] for r in rows][:2] == [pytest.approx(2.5),
                                              pytest.approx((4.0 + 4.0 * 0.04 / 0.14) / 2.0)]
    assert rows[2]["ratio_is_lower_bound"]


def test_engine_options():
    assert engine_options(["host_cache_bytes=1000", "eviction_policy=lru", "x=0.5"]) == \
        {"host_cache_bytes": 1000, "eviction_policy": "lru", "x": 0.5}


def test_parse_rate_and_strip_out():
    assert multiturn.parse_rate("inf") == math.inf and multiturn.parse_rate("0.5") == 0.5
    assert strip_out(["--out", "x.json", "--rate", "1", "--out=y"]) == ["--rate", "1"]


def test_replay_against_engine(tiny_engine):
    convs = wl.sharegpt(3, seed=4, scale=0.05, max_context=120)
    workload = wl.schedule(convs, rate=math.inf, think_time_s=0.0, seed=0)
    target = EngineTarget(tiny_engine)
    p = measure(target, workload, seed=0, users=2, warmup_passes=1, progress=False,
                label="test", keep_outputs=True)
    assert p["steady"]["requests"] >= 1 and p["whole_run"]["requests"] == workload.num_turns
    assert len(p["turns"]) == workload.num_turns
    assert sum(r["n"] for r in p["ttft_by_turn"]) == workload.num_turns
    answers = [t.answer_len for c in convs for t in c.turns]
    assert p["tokens"]["completion_tokens"] == sum(answers)          # ignore_eos: exact lengths
    if any(len(c.turns) > 1 for c in convs):
        assert p["tokens"]["cached_tokens"] > 0                       # later turns hit the cache
    assert p["tokens"]["recomputed_tokens"] == 0
    assert len(p["warmup_passes"]) == 1
    assert p["compilations_while_measured"] >= 0 and "device" in p["pages"]
    assert [len(o) for _, o in sorted(p["_outputs"].items())] == [len(c.turns) for c in convs]
    assert not tiny_engine.stats()["running"]


def test_replay_through_grpc(tiny_engine):
    server_mod = pytest.importorskip("serving.server")
    convs = wl.sharegpt(2, seed=5, scale=0.05, max_context=100, max_turns=3)
    workload = wl.schedule(convs, rate=math.inf, think_time_s=0.0, seed=0)
    with server_mod.BackgroundServer(tiny_engine) as server:
        target = GrpcTarget(server.target, tiny_engine.model.config.vocab_size)
        p = measure(target, workload, seed=0, users=None, warmup_passes=0, progress=False,
                    label="grpc", max_retries=0)
        target.client.close()
    assert p["whole_run"]["requests"] == workload.num_turns
    answers = [t.answer_len for c in convs for t in c.turns]
    assert p["tokens"]["completion_tokens"] == sum(answers)
    if any(len(c.turns) > 1 for c in convs):     # the server adopted each conversation's cache
        assert p["tokens"]["cached_tokens"] > 0 and p["tokens"]["recomputed_tokens"] == 0
    assert not tiny_engine.stats()["running"]


def test_warm_up_covers_a_replay(tiny_engine):
    # --precompile all: the engine's whole program set (token buckets 1 8 16 32 48 64 on CPU)
    # before any pass
    convs = wl.sharegpt(4, seed=9, scale=0.1, max_context=200)
    pre = warm_up(tiny_engine)
    assert tiny_engine.runner.programs.token_buckets == (1, 8, 16, 32, 48, 64)
    assert pre["ready"] and pre["programs"] == len(tiny_engine.runner.programs.shapes) == 6
    assert pre["seconds"] >= 0 and pre["warm_up_s"] is not None
    assert warm_up(tiny_engine)["seconds"] < pre["warm_up_s"] + 1    # idempotent
    workload = wl.schedule(convs, rate=math.inf, think_time_s=0.0, seed=0)
    p = measure(EngineTarget(tiny_engine), workload, seed=0, users=2, warmup_passes=1,
                progress=False, label="warm", max_retries=0)
    assert p["warmup_passes"][0]["compilations"] == 0
    assert p["compilations_while_measured"] == 0
    assert tiny_engine.stats()["programs"]["compilations_after_ready"] == 0
    steps = p["model_steps"]
    assert steps["steps"] > 0 and steps["decode"]["steps"] > 0


def test_precompile_option_and_compile_cache(monkeypatch):
    parser = multiturn.make_parser()
    assert parser.parse_args([]).precompile == "all"
    assert parser.parse_args(["--precompile", "grid"]).precompile == "grid"   # old value: all
    assert parser.parse_args([]).compile_cache is None
    from pensieve_jax.runner import compile_cache     # the package's switch ("none": off for good)
    seen = []
    monkeypatch.setattr(compile_cache, "enable", lambda path=None: seen.append(path) or "dir")
    assert enable_compile_cache("none") == enable_compile_cache(None) == "dir"
    assert seen == ["none", None]


def test_merge_results(tmp_path):
    def point(rps, p90):
        return {"steady": {"requests_per_s": rps,
                           "normalized_latency_s_per_token": {"p90": p90, "mean": p90}}}
    workload = {"name": "sharegpt", "conversations": 4}
    a = {"command": "a", "workload": workload,
         "runs": {"stateful": [point(1.0, 0.05), point(4.0, 0.1)],
                  "stateless": [point(1.0, 0.1), point(1.5, 0.4)]}}
    b = {"command": "b", "workload": workload, "runs": {"hf": [point(1.2, 0.2)]}}
    paths = []
    for name, r in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(r))
        paths.append(str(tmp_path / name))
    out = tmp_path / "merged.json"
    merged = multiturn.main(["--merge", *paths, "--out", str(out), "--no-plots"])
    assert set(merged["runs"]) == {"stateful", "stateless", "hf"}
    assert merged["stateful_vs_stateless_at_equal_p90_latency"][0]["ratio"] == pytest.approx(4.0)
    assert merged["stateful_vs_hf_at_equal_p90_latency"][0]["ratio_is_lower_bound"]
    assert json.loads(out.read_text())["merged_from"][1]["command"] == "b"
    b["workload"] = {"name": "other"}
    (tmp_path / "b.json").write_text(json.dumps(b))
    with pytest.raises(SystemExit):
        merge_results(paths)
