"""Evictor on its own: which idle chunk leaves first, where it goes (host or dropped), and the
swap-outs it queues."""

import time

from pensieve_jax.kvcache.eviction import Evictor, LRUPolicy
from pensieve_jax.kvcache.ledger import Conversation, PageLedger
from pensieve_jax.kvcache.pages import PageAllocator
from pensieve_jax.kvcache.prefix_index import PrefixIndex

PS = 4


def parts(device=6, host=0, chunk_pages=1, sharing=False):
    led = PageLedger(PageAllocator(device), PS, PageAllocator(host) if host else None,
                     PrefixIndex(PS) if sharing else None)
    convs = {}
    return led, convs, Evictor(led, convs, LRUPolicy(), chunk_pages)


def idle(led, convs, cid, num_pages, last_used):
    conv = convs[cid] = Conversation(cid, False, token_ids=list(range(num_pages * PS)))
    conv.pages = led.device.allocate(num_pages)
    conv.num_computed = num_pages * PS
    conv.last_used = last_used
    led.register(conv)
    return conv


def test_the_least_recently_used_front_chunk_is_dropped_first_without_a_host_tier():
    led, convs, ev = parts()
    now = time.monotonic()
    old, new = idle(led, convs, "old", 3, now - 10), idle(led, convs, "new", 3, now)
    assert ev.make_room(1)
    assert old.pages[0] == -1 and min(old.pages[1:]) >= 0 and min(new.pages) >= 0
    assert ev.counts["device_dropped_pages"] == 1 and ev.take_swap_outs() == []
    assert old.dropped == 1


def test_busy_conversations_are_never_victims():
    led, convs, ev = parts(device=2)
    idle(led, convs, "busy", 2, 0.0).busy = True
    assert not ev.make_room(1)


def test_chunks_go_to_the_host_tier_and_are_queued_as_swap_outs():
    led, convs, ev = parts(device=4, host=4, chunk_pages=2)
    conv = idle(led, convs, "a", 4, 0.0)
    device = list(conv.pages[:2])
    assert ev.make_room(2)
    assert conv.pages[:2] == [-1, -1] and sorted(conv.host_pages) == [0, 1]
    assert ev.take_swap_outs() == [(device[i], conv.host_pages[i]) for i in (0, 1)]
    assert ev.take_swap_outs() == [] and ev.counts["device_to_host_pages"] == 2


def test_a_full_host_tier_drops_its_own_front_chunk_but_swap_out_ahead_never_drops():
    led, convs, ev = parts(device=4, host=2, chunk_pages=2)
    conv = idle(led, convs, "a", 4, 0.0)
    ev.swap_out_ahead(2)                  # host has room for one chunk: ahead of need
    assert led.device.num_free == 2 and len(conv.host_pages) == 2
    ev.swap_out_ahead(4)                  # no host room left: nothing is dropped ahead of need
    assert led.device.num_free == 2 and ev.counts["host_dropped_pages"] == 0
    assert ev.make_room(4)                # on demand: the host chunk goes to make room there
    assert ev.counts["host_dropped_pages"] == 2 and sorted(conv.host_pages) == [2, 3]


def test_shared_pages_go_last_one_holder_at_a_time():
    led, convs, ev = parts(device=4, sharing=True)
    a = idle(led, convs, "a", 2, 0.0)
    b = convs["b"] = Conversation("b", False, token_ids=list(a.token_ids))
    led.device.share(a.pages)
    b.pages, b.num_computed = list(a.pages), a.num_computed
    private = idle(led, convs, "c", 2, time.monotonic())
    assert ev.make_room(2)                # the private pages go first, though more recent
    assert private.pages == [-1, -1] and ev.counts["released_shared_pages"] == 0
    assert ev.make_room(4)
    assert ev.counts["released_shared_pages"] >= 1
    assert all(led.device.ref_count(p) <= 1 for p in range(4))
