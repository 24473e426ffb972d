"""The disk tier without an engine: host chunks move to page files instead of being dropped,
the byte cap and the policy decide what leaves disk, restore plans read and verify files (a bad
one only widens the recompute range), and files outlive the process (claim / reopen)."""

import os
import shutil
import time

import numpy as np
import pytest

from pensieve_jax.kvcache import disk_restart, page_file
from pensieve_jax.kvcache.conversations import ConversationStore
from pensieve_jax.kvcache.disk_cache import DiskCache
from pensieve_jax.kvcache.eviction import LRUPolicy
from pensieve_jax.kvcache.page_file import PageLayout
from pensieve_jax.kvcache.pages import PageAllocator
from pensieve_jax.kvcache.transfer_costs import TransferCosts

PS = 4
LAYOUT = PageLayout("float32", PS, 2, 1, 4, "m")
SHAPE = (LAYOUT.num_layers, PS, 1, 4)


def file_size(num_pages, conv="a", first=0):
    header = page_file.encode_header(LAYOUT, conv, "", list(range(first, first + num_pages)),
                                     [list(range(PS))] * num_pages)
    return page_file.file_bytes(header, LAYOUT, num_pages)


def make_store(tmp_path, device=4, host=2, disk_pages=100, chunk_pages=1, sharing=False):
    disk = DiskCache(str(tmp_path), disk_pages * file_size(1) + 64, LAYOUT)
    return ConversationStore(PageAllocator(device), PS, PageAllocator(host), LRUPolicy(),
                             chunk_pages, sharing=sharing, disk=disk), disk


def idle(store, cid, num_tokens, start=0):
    conv = store.get_or_create(cid, [])
    conv.token_ids = list(range(start, start + num_tokens))
    assert store.reserve(conv, num_tokens)
    conv.num_computed = num_tokens
    store.release(conv, keep_kv=True)
    return conv


def page_data(conv_seed, n):
    k = np.full((LAYOUT.num_layers, n, *SHAPE[1:]), conv_seed, np.float32)
    k += np.arange(n, dtype=np.float32)[None, :, None, None, None]
    return k, -k


def write_all(disk, seed=1.0):
    """Write every pending file with recognisable pages (what the swapper would do)."""
    files = disk.take_writes()
    for f in files:
        k, v = page_data(seed, len(f.pages))
        k += np.asarray(f.pages, np.float32)[None, :, None, None, None] * 10
        assert disk.write(f, k, -k)
    disk.poll(wait=True)
    return files


def test_host_chunks_move_to_disk_instead_of_being_dropped(tmp_path):
    store, disk = make_store(tmp_path)
    a = idle(store, "a", 16)
    device = list(a.pages)
    assert store.make_room(4)
    assert a.pages == [-1] * 4 and sorted(a.disk_pages) == [0, 1] and sorted(a.host_pages) == [2, 3]
    assert store.counts["host_to_disk_pages"] == 2 and store.counts["host_dropped_pages"] == 0
    files = disk.take_writes()
    # pages 0 and 1 never reached host memory: their copies to host were cancelled and the
    # page files read them from the device instead
    assert [f.sources for f in files] == [(("device", device[0]),), (("device", device[1]),)]
    assert [d for d, _ in store.take_transfers()[0]] == device[2:]
    assert all(f.state == "pending" for f in files)
    assert files[0].tokens == (tuple(range(4)),) and files[1].pages == (1,)


def test_a_restore_loads_written_files_and_recomputes_pending_ones(tmp_path):
    store, disk = make_store(tmp_path)
    a = idle(store, "a", 16)
    assert store.make_room(4)
    pending = disk.take_writes()
    k, v = page_data(1.0, 1)
    assert disk.write(pending[1], k, v)        # page 1 written; page 0's write still to come
    a.busy = True
    plan = store.plan_restore(a)
    assert plan.front == (0, 4) and list(a.disk_pages) == [1]
    assert store.counts["disk_unreadable_pages"] == 1
    assert store.make_room(plan.new_pages)
    assert store.restore(a) == 3                       # page 1 from disk, pages 2, 3 from host
    loads = store.restorer.take_disk_loads()
    assert [(d.index, d.device_page) for d in loads] == [(1, a.pages[1])]
    assert np.array_equal(loads[0].k, k[:, 0]) and np.array_equal(loads[0].v, v[:, 0])
    disk.poll(wait=True)                       # the file written meanwhile goes too
    assert a.disk_pages == {} and disk.files == {} and os.listdir(tmp_path) == []
    assert disk.report()["served_tokens"] == 4 and disk.used_bytes == 0


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "swap"])
def test_a_bad_file_costs_only_its_conversation(tmp_path, damage):
    store, disk = make_store(tmp_path, device=8, host=1)
    a, b = idle(store, "a", 8), idle(store, "b", 8, start=100)
    assert store.make_room(8)
    write_all(disk)
    assert sorted(a.disk_pages) == [0, 1] and sorted(b.disk_pages) == [0]
    path = disk.path(a.disk_pages[0][0])
    raw = open(path, "rb").read()
    if damage == "truncate":
        open(path, "wb").write(raw[:len(raw) // 2])
    elif damage == "flip":
        open(path, "wb").write(raw[:-8] + bytes([raw[-8] ^ 0xFF]) + raw[-7:])
    elif damage == "delete":
        os.remove(path)
    else:                                      # a valid file, holding another page's KV
        shutil.copy(disk.path(b.disk_pages[0][0]), path)
    for conv in (a, b):
        conv.busy = True
        store.plan_restore(conv)
    assert sorted(a.disk_pages) == [1] and store.plan_restore(a).front == (0, 4)
    assert sorted(b.disk_pages) == [0] and store.plan_restore(b).front == (0, 0)
    disk.poll(wait=True)                       # deletes run in the background
    assert disk.report()["bad_files"] == 1 and not os.path.exists(path)


def test_the_cap_holds_and_the_policy_picks_what_leaves_disk(tmp_path):
    """Disk room for 3 one-page files (LRU policy): the least recently used chunk on disk makes
    room for a newer one; a chunk worth less than everything on disk is dropped instead."""
    store, disk = make_store(tmp_path, device=8, host=1, disk_pages=3)
    now = time.monotonic()
    convs = [idle(store, f"c{i}", 4, start=10 * i) for i in range(5)]
    for i, c in enumerate(convs):
        c.last_used = now - 100 + 10 * i                # c0 idle longest

    def tiers():
        return {c.id: ("disk" if c.disk_pages else "host" if c.host_pages else
                       "device" if max(c.pages) >= 0 else "dropped") for c in convs}
    assert store.make_room(8)
    assert tiers() == {"c0": "dropped", "c1": "disk", "c2": "disk", "c3": "disk", "c4": "host"}
    assert store.counts["disk_dropped_pages"] == 1 and store.counts["host_dropped_pages"] == 0
    convs.append(idle(store, "old", 4, start=60))
    convs[-1].last_used = now - 1000                   # worth less than anything on disk
    assert store.make_room(8)
    assert tiers()["c1"] == "dropped" and tiers()["c4"] == "disk" and tiers()["old"] == "host"
    convs.append(idle(store, "new", 4, start=70))
    assert store.make_room(8)
    assert tiers() == {"c0": "dropped", "c1": "dropped", "c2": "disk", "c3": "disk",
                       "c4": "disk", "old": "dropped", "new": "host"}
    assert store.counts["disk_dropped_pages"] == 2 and store.counts["host_dropped_pages"] == 1
    assert disk.used_bytes <= disk.capacity_bytes and len(disk.files) == 3
    write_all(disk)
    disk.poll(wait=True)
    assert sum(os.path.getsize(disk.path(n)) for n in os.listdir(tmp_path)) == disk.used_bytes


def test_dropping_a_chunk_drops_the_disk_pages_in_front_of_it(tmp_path):
    store, disk = make_store(tmp_path, device=4, host=1, disk_pages=1)
    a = idle(store, "a", 16)
    assert store.make_room(4)
    assert a.dropped >= 1 and all(i >= a.dropped for i in (*a.disk_pages, *a.host_pages))


def test_flushed_files_survive_a_restart_and_are_claimed_by_history(tmp_path):
    disk = DiskCache(str(tmp_path), 1 << 20, LAYOUT)
    k, v = page_data(3.0, 2)
    tokens = list(range(7))
    assert disk_restart.write_unclaimed(disk, "chat-1", "s", [0, 1], [tokens[:4], tokens[4:]],
                                        k, v)
    assert disk_restart.write_unclaimed(disk, "chat-2", "s", [0], [[9, 9, 9, 9]],
                                        k[:, :1], v[:, :1])
    disk.poll(wait=True)
    open(tmp_path / "torn.kvp.tmp", "wb").write(b"x")
    store = ConversationStore(PageAllocator(8), PS, PageAllocator(2),
                              disk=DiskCache(str(tmp_path), 1 << 20, LAYOUT))
    assert not (tmp_path / "torn.kvp.tmp").exists()
    assert store.ledger.disk.report()["unclaimed_files"] == 2
    conv = store.reopen("chat-1", tokens + [50, 51], "s")
    assert conv.num_computed == 7 and conv.pages == [-1, -1] and sorted(conv.disk_pages) == [0, 1]
    assert store.reopen("chat-2", [9, 9, 9, 8], "s").num_computed == 0    # other tokens
    other_salt = ConversationStore(PageAllocator(8), PS, PageAllocator(2),
                                   disk=DiskCache(str(tmp_path), 1 << 20, LAYOUT))
    assert other_salt.reopen("chat-1", tokens, "t").num_computed == 0
    with pytest.raises(ValueError, match="already exists"):
        store.reopen("chat-1", tokens, "s")
    conv.busy = True
    assert store.plan_restore(conv).front == (0, 0) and store.restore(conv) == 2
    loads = store.restorer.take_disk_loads()
    assert np.array_equal(np.stack([d.k for d in loads], 1), k)


def test_files_of_another_layout_are_refused_and_left_alone(tmp_path):
    disk = DiskCache(str(tmp_path), 1 << 20, LAYOUT)
    disk_restart.write_unclaimed(disk, "chat-1", "", [0], [[1, 2, 3, 4]], *page_data(1.0, 1))
    disk.poll(wait=True)
    other = DiskCache(str(tmp_path), 1 << 20, PageLayout("float32", PS, 2, 1, 4, "another"))
    assert other.files == {} and other.used_bytes == 0
    assert other.report()["refused_files"] == 1 and len(os.listdir(tmp_path)) == 1


def test_the_cap_holds_at_start_oldest_unclaimed_files_go(tmp_path):
    disk = DiskCache(str(tmp_path), 1 << 20, LAYOUT)
    for i in range(4):
        disk_restart.write_unclaimed(disk, f"chat-{i}", "", [0], [[i] * 4], *page_data(1.0, 1))
        disk.poll(wait=True)               # (distinct write times: the oldest go first)
    small = DiskCache(str(tmp_path), 2 * file_size(1, "chat-0") + 8, LAYOUT)
    small.poll(wait=True)
    assert sorted(f.conversation_id for f in small.files.values()) == ["chat-2", "chat-3"]
    assert len(os.listdir(tmp_path)) == 2 and small.used_bytes <= small.capacity_bytes


def test_load_or_recompute_from_disk_uses_the_measured_speeds(tmp_path):
    rates = TransferCosts(LAYOUT.page_bytes)
    assert not rates.disk_recompute_cheaper(0, PS)            # speeds unknown: load
    rates.calibrate_disk(str(tmp_path), LAYOUT)
    assert rates.disk_read_bytes_per_s > 0 and os.listdir(tmp_path) == []
    rates.prefill_s_per_token = 1e-12
    assert rates.disk_recompute_cheaper(0, PS)
    rates.prefill_s_per_token = 10.0
    assert not rates.disk_recompute_cheaper(0, PS)
    rates.disk_read(1000, 1.0)
    assert rates.disk_read_bytes_per_s < 1e12
    assert TransferCosts(1, "recompute").disk_recompute_cheaper(0, 1)
    assert not TransferCosts(1, "load").disk_recompute_cheaper(0, 1)


def test_a_disk_cache_dir_that_is_a_file_is_a_clear_error(tmp_path):
    path = tmp_path / "f"
    path.write_text("")
    with pytest.raises(ValueError, match="disk_cache_dir"):
        DiskCache(str(path), 100, LAYOUT)
