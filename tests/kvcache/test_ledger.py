"""PageLedger on its own: references, truncation, forks, and where a conversation's pages can be
read (its own tiers, else the prefix index)."""

from pensieve_jax.kvcache.ledger import Conversation, PageLedger
from pensieve_jax.kvcache.pages import PageAllocator
from pensieve_jax.kvcache.prefix_index import PrefixIndex

PS = 4


def ledger(device=8, host=4, sharing=True):
    return PageLedger(PageAllocator(device), PS, PageAllocator(host) if host else None,
                      PrefixIndex(PS) if sharing else None)


def holding(led, cid, num_tokens, register=True):
    """A conversation whose first num_tokens tokens' KV is on fresh device pages."""
    conv = Conversation(cid, False, token_ids=list(range(num_tokens)))
    conv.pages = led.device.allocate(-(-num_tokens // PS))
    conv.num_computed = num_tokens
    if register:
        led.register(conv)
    return conv


def test_truncate_frees_pages_past_the_kept_tokens_and_the_index_forgets_them():
    led = ledger()
    conv = holding(led, "a", 12)
    conv.host_pages[2] = led.host.allocate(1)[0]
    led.truncate(conv, 5)                 # pages 0, 1 kept (token 4 is in page 1)
    assert len(conv.pages) == 2 and conv.num_computed == 5 and conv.host_pages == {}
    assert led.device.num_free == 6 and led.host.num_free == 4
    assert [n.device for n in led.index.path("", list(range(12)))] == conv.pages


def test_release_page_lets_go_of_every_tier_and_the_copy_on_write_source():
    led = ledger()
    a = holding(led, "a", 8)
    b = Conversation("b", False)
    led.device.share([a.pages[1]])
    b.pages, b.cow = [-1, -1], (1, a.pages[1])
    led.release_page(b, 1)
    assert b.cow is None and led.device.ref_count(a.pages[1]) == 1


def test_fork_shares_full_pages_and_copies_a_partial_one_on_write():
    led = ledger()
    src = holding(led, "src", 10)         # pages 0, 1 full; page 2 holds tokens 8, 9
    conv = Conversation("fork", True)
    led.fork(src, conv, 9)
    assert conv.pages == [src.pages[0], src.pages[1], -1] and conv.cow == (2, src.pages[2])
    assert conv.num_computed == conv.shared_tokens == 9 and conv.token_ids == list(range(9))
    assert all(led.device.ref_count(p) == 2 for p in src.pages)
    assert led.shared_device_pages() == 3


def test_sources_and_held_tokens_fall_back_on_the_index():
    led = ledger()
    a = holding(led, "a", 12)
    b = holding(led, "b", 12, register=False)
    led.release_page(b, 1)                # b lost page 1; the index still has a's
    assert led.sources(b) == [("device", b.pages[0]), ("device", a.pages[1]),
                              ("device", b.pages[2])]
    assert led.held_tokens(b) == 12
    led.release_page(a, 1)                # no copy of page 1 anywhere: b holds its first page
    assert led.sources(b) == [("device", b.pages[0])] and led.held_tokens(b) == 4


def test_held_tokens_counts_host_pages_and_a_partial_last_page():
    led = ledger(sharing=False)
    conv = holding(led, "a", 10)
    led.free_device([conv.pages[0]])
    conv.pages[0], conv.host_pages[0] = -1, led.host.allocate(1)[0]
    assert led.sources(conv)[0] == ("host", conv.host_pages[0])
    assert led.held_tokens(conv) == 10
