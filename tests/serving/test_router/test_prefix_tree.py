"""The router's global prefix tree: matching, splitting, LRU eviction, keyed holders, salts."""

from serving.router.prefix_tree import PrefixTree


def test_tree_match_split_and_counts():
    t = PrefixTree()
    t.insert([1, 2, 3, 4], 0, 1.0)
    t.insert([1, 2, 5], 1, 2.0)
    t.insert([1, 2, 3, 9, 9], 0, 3.0)
    assert t.match([1, 2, 3, 4, 7]) == {0: 4, 1: 2}
    assert t.match([1, 2, 5, 6]) == {0: 2, 1: 3}
    assert t.match([7]) == {}
    assert (t.cached_tokens(0), t.cached_tokens(1)) == (6, 3)


def test_tree_evicts_least_recently_used_leaves():
    t = PrefixTree()
    t.insert([1, 2, 3, 4], 0, 1.0)
    t.insert([1, 2, 3, 9, 9], 0, 3.0)
    t.touch([1, 2, 3, 4], 0, 5.0)                  # [4] is now the most recent
    assert t.evict(0, 4) == 2                      # [9, 9] goes first
    assert t.match([1, 2, 3, 9, 9]) == {0: 3}
    assert t.match([1, 2, 3, 4]) == {0: 4}
    assert t.evict(0, 0) == 4 and t.num_nodes() == 0


def test_tree_drop_replica_keeps_others():
    t = PrefixTree()
    t.insert([1, 2, 3], 0, 1.0)
    t.insert([1, 2, 3], 1, 1.0)
    t.drop_replica(0)
    assert t.match([1, 2, 3]) == {1: 3} and t.cached_tokens(0) == 0


def test_tree_keyed_holders_share_prefixes():
    """Each replica conversation is a holder: a prefix stays credited while any holder of that
    replica covers it, and hold() returns the change of what the replica is credited with."""
    t = PrefixTree()
    assert t.hold([1, 2, 3, 4], 0, "a", 1.0) == 4
    assert t.hold([1, 2, 3, 9, 9], 0, "b", 1.0) == 2          # shares [1, 2, 3] with a
    assert t.hold([1, 2, 3, 4], 1, "a", 1.0) == 4             # same key, another replica
    assert t.hold([], 0, "a", 2.0) == -1                       # a evicted: [4] goes, not [1, 2, 3]
    assert t.match([1, 2, 3, 4]) == {0: 3, 1: 4}
    assert t.hold([1, 2], 0, "b", 2.0) == -3                   # b's tail evicted
    assert t.hold([1, 2, 7], 0, "b", 3.0) == 1                 # ... and grown another way
    assert t.match([1, 2, 7]) == {0: 3, 1: 2} and t.cached_tokens(0) == 3
    assert t.holders(0) == {"b": (1, 2, 7)}
    t.insert([5, 5], 0, 3.0)                                   # an unkeyed estimate
    assert t.drop_unheld(0) == 2 and t.match([5, 5]) == {}
    assert t.hold([], 0, "b", 4.0) == -3 and t.cached_tokens(0) == 0
    t.drop_replica(1)
    assert t.num_nodes() == 0 and t.holders(1) == {}



def test_tree_keeps_salts_apart():
    t = PrefixTree()
    t.insert([1, 2, 3, 4], 0, 1.0)                         # unsalted: as ever
    t.insert([1, 2, 3, 4], 1, 1.0, salt="a")
    assert t.match([1, 2, 3, 4]) == {0: 4}
    assert t.match([1, 2, 3, 4], salt="a") == {1: 4}
    assert t.match([1, 2, 3, 4], salt="b") == {}
    assert t.hold([1, 2, 9], 0, "s-1", 2.0, salt="a") == 3  # nothing shared with "" on 0
    assert t.match([1, 2, 9], salt="a") == {0: 3, 1: 2} and t.match([1, 2, 9]) == {0: 2}
    assert (t.cached_tokens(0), t.cached_tokens(1)) == (7, 4)   # every salt: one cache
    assert t.holders(0) == {"s-1": (1, 2, 9)} and t.holder_salt(0, "s-1") == "a"
    assert sorted(t.salts()) == ["", "a"]
    assert t.hold([], 0, "s-1", 3.0) == -3                  # let go, whatever the salt
    assert t.match([1, 2, 9], salt="a") == {1: 2} and t.cached_tokens(0) == 4
    assert t.evict(1, 0) == 4 and t.salts() == [""]          # an emptied salt's tree goes
    t.drop_replica(0)
    assert t.num_nodes() == 0
