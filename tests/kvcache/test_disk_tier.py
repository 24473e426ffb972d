"""The disk tier through the engine (random:tiny, greedy float32, tiny device and host pools):
a conversation pushed off the device and out of host memory comes back from page files with
the tokens recomputation gives; a damaged file costs only its own conversation; the byte cap
holds; files of another layout are refused; flushed files survive a restart."""

import os

import pytest

from pensieve_jax.engine.config import SWAP_IN_MODES, EngineConfig
from pensieve_jax.engine.sampling import SamplingParams
from tests.engine.tiny_engine import conversation_turns, make, random_turns, settle

P = SamplingParams(max_tokens=8, ignore_eos=True)
PAGE_BYTES = 2 * 2 * 8 * 2 * 16 * 4       # tiny: 2 layers, page 8, 2 kv heads, dim 16, float32


@pytest.fixture(scope="module")
def stateless():
    e = make("stateless")
    yield e
    e.shutdown()


def disk_engine(directory=None, disk_pages=200, **kw):
    """20 device pages, a 4-page host tier and a disk tier (loads always: restore_policy)."""
    return make(**{"num_pages": 20, "host_cache_bytes": 4 * PAGE_BYTES,
                   "disk_cache_bytes": disk_pages * PAGE_BYTES, "disk_cache_dir": directory,
                   "swap_out_threshold": 0.0, "restore_policy": "load", **kw})


def first_turn(eng, name, seed):
    """Run a conversation's first turn; returns (its history, the next turn's new tokens)."""
    turns = random_turns(seed, 2, 30, 31)
    out = conversation_turns(eng, turns[:1], name, P)[0]
    return turns[0] + list(out.token_ids), turns[1]


def push_out(eng, seed=10, n=3):
    """Other conversations fill the device (and so host memory, and disk)."""
    for i in range(n):
        conversation_turns(eng, random_turns(seed + i, 1, 60, 61), f"other-{seed}-{i}", P)
    settle(eng)


def on_disk(eng, name):
    c = eng.store.conversations[name]
    return sorted(c.disk_pages) == list(range(len(c.pages))) and len(c.pages) > 0


def next_turn(eng, stateless, name, history, new):
    """Run a turn, check its tokens against the stateless engine; returns its usage and the
    history after it."""
    seq = history + new
    got = eng.submit(seq, P, conversation_id=name).result()
    assert list(got.token_ids) == stateless.generate(seq, P), name
    return got.usage, seq + list(got.token_ids)


@pytest.mark.parametrize("swap_in", SWAP_IN_MODES)
def test_a_returning_conversation_is_served_from_disk(stateless, swap_in):
    eng = disk_engine(swap_in=swap_in)
    history, new = first_turn(eng, "A", 1)
    push_out(eng)
    assert on_disk(eng, "A")
    # a cache report counts KV on disk as held: a router sends A back here
    assert eng.cache_scan({})["A"].token_ids == tuple(history)
    # page files are written in the background (served from memory meanwhile): read them back
    eng.call(lambda: eng.swapper.disk.poll(wait=True))
    usage, _ = next_turn(eng, stateless, "A", history, new)
    assert usage.cached_tokens == len(history) and usage.recomputed_tokens == 0
    assert usage.cached_host_tokens == 0 and usage.cached_disk_tokens == len(history)
    stats = settle(eng)
    assert stats["hit_tokens_by_tier"]["disk"] == len(history)
    disk = stats["disk"]
    assert disk["served_tokens"] == len(history) and disk["load_s"] > 0
    assert disk["loaded_files"] > 0
    assert disk["written_pages"] > 0 and disk["bad_files"] == 0 and stats["host_to_disk_pages"] > 0
    assert 0 < disk["used_bytes"] <= disk["capacity_bytes"]
    eng.shutdown()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_page_file_costs_only_its_conversation(stateless, tmp_path, damage):
    eng = disk_engine(str(tmp_path))
    a, a_new = first_turn(eng, "A", 1)
    b, b_new = first_turn(eng, "B", 2)
    push_out(eng, n=4)
    assert on_disk(eng, "A") and on_disk(eng, "B")
    eng.call(lambda: eng.swapper.disk.poll(wait=True))       # every page file written
    conv = eng.store.conversations["A"]
    name, _ = conv.disk_pages[0]
    damaged = sum(8 for n, _ in conv.disk_pages.values() if n == name)
    path = os.path.join(str(tmp_path), name)
    raw = open(path, "rb").read()
    if damage == "truncate":
        open(path, "wb").write(raw[:len(raw) - 100])
    elif damage == "flip":
        open(path, "wb").write(raw[:-50] + bytes([raw[-50] ^ 0x10]) + raw[-49:])
    else:
        os.remove(path)
    usage, _ = next_turn(eng, stateless, "A", a, a_new)
    assert usage.recomputed_tokens == damaged
    assert usage.cached_tokens == usage.cached_disk_tokens == len(a) - damaged
    usage, _ = next_turn(eng, stateless, "B", b, b_new)
    assert usage.recomputed_tokens == 0 and usage.cached_tokens == len(b)
    disk = settle(eng)["disk"]
    assert disk["bad_files"] == 1 and disk["served_tokens"] == len(a) - damaged + len(b)
    eng.call(lambda: eng.swapper.disk.poll(wait=True))       # deletes run in the background
    assert not os.path.exists(path)
    eng.shutdown()


@pytest.mark.slow
def test_the_disk_cap_holds_and_every_turn_matches_recompute(stateless, tmp_path):
    """8 conversations of 3 turns through 20 device pages, 4 host pages and disk room for 12
    pages: files are dropped to stay under the cap, and outputs never change."""
    cap = 12 * PAGE_BYTES
    eng = disk_engine(str(tmp_path), disk_pages=12, max_num_seqs=4)
    turns = {f"u{i}": random_turns(700 + i, 3, 10, 30) for i in range(8)}
    history = {c: [] for c in turns}
    for k in range(3):
        for c, new in turns.items():
            usage, history[c] = next_turn(eng, stateless, c, history[c], new[k])
            assert (usage.cached_tokens + usage.prefilled_tokens + usage.recomputed_tokens ==
                    usage.prompt_tokens)
            assert eng.stats()["disk"]["used_bytes"] <= cap
            # files let go are unlinked in the background: on disk once those are done
            eng.call(lambda: eng.swapper.disk.poll(wait=True))
            on_disk = sum(os.path.getsize(e.path) for e in os.scandir(tmp_path))
            assert on_disk <= cap, on_disk
    stats = settle(eng)
    assert stats["host_to_disk_pages"] > 0 and stats["disk_dropped_pages"] > 0
    assert stats["disk"]["served_tokens"] > 0
    eng.shutdown()


def flush(eng):
    """What a server's shutdown does (issue 22): land every copy, then write page files."""
    return eng.call(lambda: (eng.steps.settle_copies(), eng.swapper.flush_to_disk())[1])


@pytest.mark.slow
def test_flushed_conversations_survive_a_restart(stateless, tmp_path):
    eng = disk_engine(str(tmp_path))
    history, new = first_turn(eng, "A", 1)
    _, history = next_turn(eng, stateless, "A", history, new)
    assert flush(eng) > 0
    eng.shutdown()
    again = disk_engine(str(tmp_path))
    assert again.stats()["disk"]["unclaimed_files"] > 0
    conv = again.call(lambda: again.store.reopen("A", history))
    assert conv.num_computed == len(history)
    assert again.cache_scan({})["A"].token_ids == tuple(history)      # held, on disk
    usage, _ = next_turn(again, stateless, "A", history, [7, 8, 9])
    assert usage.cached_tokens == usage.cached_disk_tokens == len(history)
    assert usage.recomputed_tokens == 0
    assert settle(again)["hit_tokens_by_tier"]["disk"] == len(history)
    again.shutdown()


@pytest.mark.slow
def test_page_files_of_another_layout_are_refused(stateless, tmp_path):
    eng = disk_engine(str(tmp_path))
    history, new = first_turn(eng, "A", 1)
    assert flush(eng) > 0
    eng.shutdown()
    other = disk_engine(str(tmp_path), page_size=16, num_pages=10)
    disk = other.stats()["disk"]
    assert disk["refused_files"] > 0 and disk["files"] == 0 and disk["used_bytes"] == 0
    assert other.call(lambda: other.store.reopen("A", history)).num_computed == 0
    usage, _ = next_turn(other, stateless, "A", history, new)
    assert usage.cached_tokens == 0 and usage.recomputed_tokens == len(history)
    other.shutdown()
    assert len(os.listdir(tmp_path)) > 0        # refused, not deleted


def test_disk_tier_options_are_checked():
    with pytest.raises(ValueError, match="host_cache_bytes"):
        EngineConfig(disk_cache_bytes=1 << 20)
    with pytest.raises(ValueError, match="disk_cache_bytes"):
        EngineConfig(disk_cache_bytes=-1, host_cache_bytes=1)
    with pytest.raises(ValueError, match="disk_cache_bytes is 0"):
        EngineConfig(disk_cache_dir="/tmp/x")
    with pytest.raises(ValueError, match="disk_cache_dir"):
        EngineConfig(disk_cache_bytes=1, host_cache_bytes=1, disk_cache_dir="  ")
