"""The prefix index and the store's page sharing, without a model: reference counts, copy on
write, eviction order, and restoring from pages other conversations hold."""

from pensieve_jax.kvcache.pages import PageAllocator
from pensieve_jax.kvcache.conversations import ConversationStore
from pensieve_jax.kvcache.prefix_index import PrefixIndex

PS = 4


def test_match_whole_pages_then_a_partial_page():
    index = PrefixIndex(PS)
    tokens = list(range(12))
    index.insert("", tokens, [7, 8, 9])
    nodes, partial = index.match("", tokens + [99], limit=12)
    assert [n.device for n in nodes] == [7, 8, 9] and partial is None
    nodes, partial = index.match("", list(range(6)) + [50, 51, 52], limit=8)
    assert [n.device for n in nodes] == [7]                # page 1 matches 2 of its 4 tokens
    assert partial.node.device == 8 and partial.num_tokens == 2
    nodes, partial = index.match("", tokens, limit=7)        # limit caps whole pages
    assert [n.device for n in nodes] == [7] and partial.num_tokens == 3
    assert index.match("other-salt", tokens, 12) == ([], None)


def test_forgotten_pages_leave_gaps_and_prune_leaves():
    index = PrefixIndex(PS)
    index.insert("", list(range(12)), [1, 2, 3])
    index.forget_device(2)                          # a middle page's KV is gone
    assert [n.device for n in index.path("", list(range(12)))] == [1, -1, 3]
    assert [n.device for n in index.match("", list(range(12)), 12)[0]] == [1]
    index.moved_to_host(3, 40)
    index.forget_device(3)
    assert index.path("", list(range(12)))[2].host == 40
    index.forget_host(40)                           # the leaf and the empty middle go
    assert index.stats() == {"nodes": 1, "device_pages": 1, "host_pages": 0}
    index.insert("", list(range(8)), [-1, 5])       # -1: skipped, no copy recorded
    assert [n.device for n in index.path("", list(range(8)))] == [1, 5]


def store(num_pages=16, host_pages=0, chunk_pages=1):
    return ConversationStore(PageAllocator(num_pages), PS,
                             PageAllocator(host_pages) if host_pages else None,
                             chunk_pages=chunk_pages)


def computed(s, cid, tokens):
    """A conversation whose KV for tokens is on the device, offered to the index."""
    conv = s.get_or_create(cid, tokens)
    conv.token_ids = list(tokens)
    assert s.reserve(conv, len(tokens))
    conv.num_computed = len(tokens)
    s.release(conv, keep_kv=True)
    return conv


def test_a_new_conversation_shares_whole_pages_and_copies_a_partial_one():
    s = store()
    a = computed(s, "a", list(range(10)))           # pages 0, 1 full; page 2 partial
    b = s.get_or_create("b", [])
    b.token_ids = list(range(6)) + [77, 78]
    gained = s.attach_shared(b, b.token_ids)
    assert gained == 6 and b.num_computed == 6
    assert b.pages[0] == a.pages[0] and s.allocator.ref_count(a.pages[0]) == 2
    assert b.cow == (1, a.pages[1]) and b.pages[1] == -1    # diverges inside page 1
    s.make_writable(b)
    plan = s.plan_restore(b)
    assert plan.new_pages == 1 and plan.front == (0, 0)
    s.restore(b)
    assert b.pages[1] not in a.pages and s.take_transfers()[1] == [(a.pages[1], b.pages[1])]
    assert s.allocator.ref_count(a.pages[1]) == 1 and s.counts["copied_on_write_pages"] == 1


def test_a_shared_page_about_to_be_written_is_copied_first():
    s = store()
    a = computed(s, "a", list(range(8)))
    b = s.get_or_create("b", [])
    b.token_ids = list(range(8)) + [5]
    s.attach_shared(b, b.token_ids)
    assert b.pages == a.pages
    s.truncate(b, 6)                                 # b's history was edited inside page 1
    s.make_writable(b)
    assert b.cow == (1, a.pages[1]) and b.pages[1] == -1
    c = s.get_or_create("c", [])                     # a page only one holder has, indexed:
    c.token_ids = [9] * 8                            # it leaves the index before the write
    s.reserve(c, 8)
    c.num_computed = 8
    s.register(c)
    s.truncate(c, 5)
    s.make_writable(c)
    assert c.cow is None and not s.index.is_indexed(c.pages[1])


def test_private_pages_are_evicted_before_shared_ones():
    s = store(num_pages=8)
    a = computed(s, "a", list(range(12)))
    b = s.get_or_create("b", [])
    b.token_ids = list(range(8)) + [50, 51, 52, 53]
    s.attach_shared(b, b.token_ids)
    s.restore(b)
    b.busy = False
    assert s.reserve(b, 12)
    b.num_computed = 12
    # a: [shared, shared, private]; b: [shared, shared, private]; 4 pages used, 4 free
    assert s.make_room(6)
    assert a.pages[:2] == b.pages[:2] and min(a.pages[:2]) >= 0
    assert a.pages[2] == b.pages[2] == -1
    assert s.make_room(7)                            # now one holder lets its shared pages go
    assert s.counts["released_shared_pages"] >= 1 and s.allocator.num_free >= 7


def test_restore_takes_pages_back_from_the_index_and_recomputes_one_range():
    s = store(num_pages=8, host_pages=4)
    a = computed(s, "a", list(range(16)))
    b = computed(s, "b", list(range(16)))            # computed separately: private copies
    assert set(a.pages).isdisjoint(b.pages)
    for i in (0, 1, 3):
        s.ledger.release_page(b, i)                        # b lost pages 0, 1, 3; a has them all
    plan = s.plan_restore(b)
    assert plan.front == (0, 0) and plan.shared_tokens == 12
    assert b.pages[:2] == a.pages[:2] and b.pages[3] == a.pages[3]
    s.ledger.release_page(a, 1)                            # now no one has page 1 of the prefix
    s.ledger.release_page(b, 1)
    plan = s.plan_restore(b)
    assert plan.front == (4, 8) and plan.new_pages == 1 and b.pages[3] == a.pages[3]
    for conv in (a, b):
        s.ledger.release_page(conv, 3)                     # ... nor page 3: b's own page 2 between
    own_page_2 = b.pages[2]                          # them is recomputed too (one range)
    plan = s.plan_restore(b)
    assert plan.front == (4, 16) and plan.new_pages == 3
    assert b.pages[1:] == [-1] * 3 and s.allocator.ref_count(own_page_2) == 0
    s.restore(b)
    assert min(b.pages) >= 0


def test_registering_pages_that_left_the_device_adds_no_dead_index_nodes():
    """A conversation registered while its last pages are on host or dropped used to leave
    nodes with no copy and no children, never pruned: the index grew forever."""
    from pensieve_jax.kvcache.prefix_index import PrefixIndex
    index = PrefixIndex(4)
    index.insert("", list(range(12)), [5, -1, -1])
    assert index.stats() == {"nodes": 1, "device_pages": 1, "host_pages": 0}
    index.insert("", list(range(12)), [-1, -1, 7])         # a gap before a copy stays
    assert index.stats()["nodes"] == 3
    index.forget_device(7)
    index.forget_device(5)
    assert index.stats() == {"nodes": 0, "device_pages": 0, "host_pages": 0}
