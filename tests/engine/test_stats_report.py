"""Engine.stats() is collected from the parts' reports (model/reporting.py): its keys are the
snapshot the server metrics, HTTP, benchmarks and tests read; every part reports its own
entries, no entry is reported by two parts, and the derived entries agree with the rest."""

from __future__ import annotations

import pytest

from pensieve_jax.engine.stats import derived, reporters
from pensieve_jax.model.reporting import Reporter, merge_reports
from pensieve_jax.runner.compile_watch import CompileWatch
from tests.engine.tiny_engine import PAGE_BYTES, conversation_turns, make, random_turns, settle

# Engine.stats() of a random:tiny engine with a host and a disk tier, as dotted key paths (a
# list or None value is a leaf), taken from the code before the parts reported their entries
DISK = ["disk.bad_files", "disk.capacity_bytes", "disk.claimed_pages", "disk.directory",
        "disk.dropped_unclaimed_files", "disk.enabled", "disk.failed_writes", "disk.files",
        "disk.files_by_state.bad", "disk.files_by_state.pending", "disk.files_by_state.writing",
        "disk.files_by_state.written", "disk.load_s", "disk.loaded_bytes", "disk.loaded_files",
        "disk.loaded_pages", "disk.loaded_unwritten_files", "disk.refused_files",
        "disk.served_tokens", "disk.unclaimed_files", "disk.used_bytes", "disk.write_s",
        "disk.written_bytes", "disk.written_files", "disk.written_pages"]
SNAPSHOT = sorted(DISK + [
    "attention", "attention_check.attention", "attention_check.fallback",
    "attention_check.platform", "attention_check.requested", "attention_check.self_check",
    "cache_policy", "cached_host_tokens", "cached_shared_tokens", "cached_tokens",
    "cached_tokens_resident", "compilations", "completion_tokens", "conversations",
    "copied_on_write_pages", "device_dropped_pages", "device_to_host_pages",
    "disk_dropped_pages", "disk_unreadable_pages", "evicted_tokens", "eviction_policy",
    "failed_steps", "finished", "hit_tokens", "hit_tokens_by_tier.device",
    "hit_tokens_by_tier.disk", "hit_tokens_by_tier.host", "host_dropped_pages",
    "host_to_disk_pages", "loop.busy_fetches", "loop.drains", "loop.overlap", "loop.plan_s",
    "loop.post_s", "loop.run_s", "loop.steps", "loop.wait_s", "max_model_len", "miss_tokens",
    "page_size", "pages.device.free", "pages.device.total", "pages.device.used",
    "pages.host.free", "pages.host.total", "pages.host.used", "preemptions",
    "prefilled_tokens", "programs.compilations_after_ready", "programs.compile_s",
    "programs.compiled", "programs.compiled_after_ready", "programs.count",
    "programs.cpu_kernels",
    "programs.padded_tokens", "programs.padding_ratio", "programs.page_chunk",
    "programs.ready", "programs.real_tokens", "programs.shapes",
    "programs.step_programs_after_ready", "programs.warm", "programs.warm_up_s",
    "prompt_tokens", "recomputed_not_loaded_pages", "recomputed_tokens",
    "released_shared_pages", "requests", "resident_tokens.device", "resident_tokens.disk",
    "resident_tokens.host", "running", "sharing.device_pages", "sharing.enabled",
    "sharing.hit_ratio", "sharing.host_pages", "sharing.nodes", "sharing.shared_hit_tokens",
    "sharing.shared_pages", "step_tokens", "steps", "swap.disk_read_bytes_per_s",
    "swap.h2d_bytes_per_s", "swap.in_bytes", "swap.in_hidden_pages", "swap.in_layered_pages",
    "swap.in_pages", "swap.in_s", "swap.in_step_load_error", "swap.in_wait_s",
    "swap.out_bytes", "swap.out_hidden_pages", "swap.out_pages", "swap.out_wait_s",
    "swap.prefill_s_per_token", "swap.restore_policy", "waiting"])
# without a disk tier "disk" is {"enabled": False}
SNAPSHOT_NO_DISK = sorted(set(SNAPSHOT) - set(DISK) | {"disk.enabled"})


def leaves(stats: dict, prefix: str = "") -> dict:
    """{dotted key path: value} of every leaf (nested dicts walked, anything else a leaf)."""
    out = {}
    for key, value in stats.items():
        out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict)
                   else {prefix + key: value})
    return out


def paths(stats: dict) -> list[str]:
    return sorted(leaves(stats))


@pytest.fixture(scope="module")
def tiered(tmp_path_factory):
    """Two conversations of two turns each, settled, on an engine with host and disk tiers
    (warmed up as a server's, one step program: enough here)."""
    engine = make(host_cache_bytes=8 * PAGE_BYTES, disk_cache_bytes=64 * PAGE_BYTES,
                  disk_cache_dir=str(tmp_path_factory.mktemp("disk")), token_buckets=(16,),
                  precompile=True)
    for cid in ("a", "b"):
        conversation_turns(engine, random_turns(1, 2), cid)
    settle(engine)
    yield engine
    engine.shutdown()


def test_stats_keys_are_the_snapshot(tiered):
    assert paths(tiered.stats()) == SNAPSHOT
    plain = make(num_pages=16, token_buckets=(16,))
    try:
        assert paths(plain.stats()) == SNAPSHOT_NO_DISK
    finally:
        plain.shutdown()


def test_derived_entries_agree_with_the_reported_ones(tiered):
    s = tiered.stats()
    assert (s["requests"], s["finished"], s["conversations"]) == (4, 4, 2)
    assert s["hit_tokens"] == s["cached_tokens"] == sum(s["hit_tokens_by_tier"].values()) > 0
    assert s["miss_tokens"] == s["prefilled_tokens"] + s["recomputed_tokens"]
    assert s["hit_tokens"] + s["miss_tokens"] == s["prompt_tokens"]
    assert s["sharing"]["hit_ratio"] == s["cached_tokens"] / s["prompt_tokens"]
    assert s["sharing"]["shared_hit_tokens"] == s["cached_shared_tokens"]
    assert s["compilations"] == s["programs"]["compiled"] == 1
    programs = s["programs"]
    assert programs["padding_ratio"] == round(programs["padded_tokens"] / programs["real_tokens"],
                                              4)
    assert programs["warm"] is programs["ready"] is True and programs["warm_up_s"] > 0
    assert s["pages"]["device"]["used"] + s["pages"]["device"]["free"] == 64
    assert s["pages"]["host"] == {"used": 0, "free": 8, "total": 8}
    assert s["loop"]["steps"] == s["steps"] > 0 and s["loop"]["overlap"] is True
    assert s["disk"]["enabled"] is True and s["swap"]["in_step_load_error"] is None


def test_every_part_reports_its_own_entries(tiered):
    """Each part is a Reporter; no two report the same entry; what each reports is in
    Engine.stats() as it reported it (measured seconds aside)."""
    parts = tiered.parts
    every = reporters(parts, tiered.steps)
    assert all(isinstance(r, Reporter) for r in every)
    assert {id(p) for p in (tiered.turns, parts.store, parts.swapper, parts.runner,
                            parts.attention, parts.allocator, parts.host, parts.scheduler,
                            tiered.steps, parts.warm_up, parts.warm_up.watch)} \
        <= set(map(id, every))
    reports = tiered.call(lambda: [r.report_stats() for r in every])
    merged = leaves(merge_reports(reports))         # raises if two parts report one entry
    stats = leaves(tiered.stats())     # settled: only seconds waited for (idle) copies grow
    assert set(merged) <= set(SNAPSHOT)
    counted = {path for path in merged if not path.endswith("_s")}
    assert {path: stats[path] for path in counted} == {path: merged[path] for path in counted}


def test_the_engine_adds_only_its_configuration_and_the_derived_entries(tiered):
    """Every entry of stats() but three configuration entries and the derived ones comes from
    a part's report: the engine counts nothing itself."""
    reports = tiered.call(lambda: [r.report_stats() for r in reporters(tiered.parts,
                                                                        tiered.steps)])
    reported = set(leaves(merge_reports(reports)))
    derived_paths = set(leaves(derived(tiered.stats())))
    own = {"cache_policy", "page_size", "max_model_len"}
    assert reported.isdisjoint(own) and reported.isdisjoint(derived_paths)
    assert sorted(reported | own | derived_paths) == SNAPSHOT


def test_each_part_reports_its_own_counts(tiered):
    """The scheduler, the step loop, the warm-up and the compile watch report what they hold
    (the watch's names as a copy)."""
    parts, loop = tiered.parts, tiered.steps
    sched = tiered.call(parts.scheduler.report_stats)
    assert sched == {"running": 0, "waiting": 0, "preemptions": parts.scheduler.num_preemptions}
    assert tiered.call(loop.report_stats)["loop"] == dict(loop.times, overlap=True)
    assert parts.warm_up.report_stats() == {"programs": {"warm_up_s": tiered.warm_up_s}}
    watch = CompileWatch()
    assert watch.report_stats() == {"programs": {"compilations_after_ready": 0,
                                                 "compiled_after_ready": []}}
    watch.record("f", 0.5)
    report = watch.report_stats()
    assert report == {"programs": {"compilations_after_ready": 1, "compiled_after_ready": ["f"]}}
    report["programs"]["compiled_after_ready"].append("g")
    assert watch.names == ["f"]


def test_a_key_reported_twice_is_an_error_naming_it():
    assert merge_reports([{"a": 1, "p": {"x": 1}}, {"b": 2, "p": {"y": 2}}]) == \
        {"a": 1, "b": 2, "p": {"x": 1, "y": 2}}
    with pytest.raises(ValueError, match="'a'"):
        merge_reports([{"a": 1}, {"a": 1}])
    with pytest.raises(ValueError, match="p.x"):
        merge_reports([{"p": {"x": 1}}, {"p": {"x": 2}}])
    with pytest.raises(ValueError, match="p"):
        merge_reports([{"p": {"x": 1}}, {"p": 3}])


def test_merged_reports_are_copies():
    inner = {"x": 1}
    merged = merge_reports([{"p": inner}])
    merged["p"]["x"] = 2
    assert inner == {"x": 1}
