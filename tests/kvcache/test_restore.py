"""Restorer on its own: planning where each page of a returning conversation comes from, and
carrying the plan out (swap-ins, copies on write, recompute instead of load)."""

from pensieve_jax.kvcache.ledger import Conversation, PageLedger
from pensieve_jax.kvcache.pages import PageAllocator
from pensieve_jax.kvcache.prefix_index import PrefixIndex
from pensieve_jax.kvcache.restore import RestorePlan, Restorer, SwapIn

PS = 4


def parts(device=8, host=4, sharing=True):
    led = PageLedger(PageAllocator(device), PS, PageAllocator(host),
                     PrefixIndex(PS) if sharing else None)
    return led, Restorer(led)


def computed(led, cid, num_tokens):
    conv = Conversation(cid, False, token_ids=list(range(num_tokens)))
    conv.pages = led.device.allocate(-(-num_tokens // PS))
    conv.num_computed = num_tokens
    led.register(conv)
    return conv


def to_host(led, conv, i):
    host = led.host.allocate(1)[0]
    led.index.moved_to_host(conv.pages[i], host)
    led.free_device([conv.pages[i]])
    conv.pages[i], conv.host_pages[i] = -1, host
    return host


def test_host_pages_are_planned_as_loads_and_queued_as_swap_ins():
    led, rs = parts()
    conv = computed(led, "a", 12)
    host = to_host(led, conv, 1)
    assert rs.plan_restore(conv) == RestorePlan(1, (0, 0), 0)
    assert rs.restore(conv) == 1 and min(conv.pages) >= 0 and conv.host_pages == {}
    copies, into = rs.take_copies()
    assert copies == [] and into == [SwapIn(host, conv.pages[1], conv, 1)]
    assert rs.take_copies() == ([], [])


def test_a_page_with_no_copy_anywhere_is_recomputed_with_what_lies_before_it():
    led, rs = parts(sharing=False)
    conv = computed(led, "a", 12)
    led.release_page(conv, 0)
    assert rs.plan_restore(conv) == RestorePlan(1, (0, 4), 0)


def test_recompute_cheaper_turns_a_load_into_a_recompute():
    led, rs = parts()
    conv = computed(led, "a", 12)
    to_host(led, conv, 0)
    rs.recompute_cheaper = lambda first, n: True
    plan = rs.plan_restore(conv)
    assert plan.front == (0, 4) and conv.host_pages == {}
    assert rs.counts["recomputed_not_loaded_pages"] == 1 and led.host.num_free == 4


def test_attach_shared_takes_whole_pages_and_copies_a_partial_one_on_write():
    led, rs = parts()
    src = computed(led, "src", 12)
    conv = Conversation("b", False)
    prompt = list(range(10)) + [99, 98]
    assert rs.attach_shared(conv, prompt) == 10
    assert conv.pages == [src.pages[0], src.pages[1], -1] and conv.cow == (2, src.pages[2])
    assert rs.restore(conv) == 0
    copies, _ = rs.take_copies()
    assert copies == [(src.pages[2], conv.pages[2])] and conv.cow is None
    assert rs.counts["copied_on_write_pages"] == 1
    assert led.device.ref_count(src.pages[2]) == 1


def test_make_writable_moves_a_shared_page_to_copy_on_write():
    led, rs = parts()
    src = computed(led, "src", 6)
    conv = Conversation("b", False, token_ids=list(range(6)), num_computed=6)
    led.device.share(src.pages)
    conv.pages = list(src.pages)
    rs.make_writable(conv)                # token 6 goes into page 1, which src holds too
    assert conv.pages[1] == -1 and conv.cow == (1, src.pages[1])
