"""The router's global prefix tree (Preble's global radix tree): which replica caches which
token prefixes.

    tree = PrefixTree()
    tree.insert(ids, replica=0, now=t)      # replica 0 now holds ids (and so every prefix of it)
    tree.match(ids)                         # {replica: longest cached prefix length}
    tree.evict(0, capacity_tokens)          # age replica 0's least recently used leaves out

A radix tree over token ids (serving/router/radix.py): each edge holds a run of tokens, each
node the replicas that hold the prefix ending there and when each last used it. A replica
holding a node holds all of its ancestors.

Two ways to know what a replica holds:

    tree.hold(ids, replica=0, key="session-1", now=t)   # conversation session-1 there holds ids
    tree.hold((), 0, "session-1", t)                    # ... and now nothing (evicted, ended)

Keyed holders (a replica's conversations, as its cache reports say, or as the router just
routed them): each node counts the holders of each replica covering it, and a replica holds a
node while its count is above 0, so one conversation letting go of a shared prefix leaves it
to the others. Unkeyed `insert`s are the estimate for replicas that do not report: they stay
until `evict` ages them out by LRU against the replica's capacity (or `drop_unheld` removes
them once the replica reports).

Cache salts (tenant isolation): a replica shares cached pages only between requests of the same
`cache_salt`, so the tree keeps one radix tree per salt, and `insert`, `hold`, `match` and
`touch` take the salt (default "": unsalted, the tree above). A prefix held under one salt is no
match for the same tokens under another. What a replica is credited with (`cached_tokens`),
`evict`, `drop_replica` and `drop_unheld` count every salt: they are one cache.

    tree.hold(ids, replica=0, key="session-2", now=t, salt="tenant-a")
    tree.match(ids, salt="tenant-a")       # {0: len(ids)}; tree.match(ids) is {} (unsalted)
"""

from __future__ import annotations

import heapq
import itertools
from typing import Sequence

from serving.router.radix import RadixForest, as_ints, common


class PrefixTree:
    def __init__(self):
        self.forest = RadixForest()
        self._holders: dict[int, dict] = {}      # replica -> {key: (salt, the tokens it holds)}

    def cached_tokens(self, replica: int) -> int:
        """Tokens the tree believes `replica` holds."""
        return self.forest.cached.get(replica, 0)

    def salts(self) -> list[str]:
        """The salts the tree holds prefixes under ("" always listed)."""
        return list(self.forest.roots)

    def insert(self, tokens: Sequence[int], replica: int, now: float, salt: str = "") -> None:
        """Record that `replica` holds `tokens` under `salt` (used at `now`), unkeyed (an
        estimate)."""
        tokens = as_ints(tokens)
        if tokens:
            self.forest.insert(tokens, replica, now, None, self.forest.tree(salt))

    def hold(self, tokens: Sequence[int], replica: int, key, now: float, salt: str = "") -> int:
        """Holder `key` of `replica` (one of its conversations) now holds exactly `tokens`
        under `salt` (empty tokens: nothing, whatever the salt), replacing what it held before.
        Returns the change in the tokens the tree credits `replica` with (negative: it learnt
        an eviction)."""
        tokens = as_ints(tokens)
        holders = self._holders.setdefault(replica, {})
        old_salt, old = holders.get(key, (salt, ()))
        if not tokens:
            salt = old_salt
        if old == tokens and old_salt == salt:
            return 0
        before = self.cached_tokens(replica)
        same = common(old, tokens, 0) if old_salt == salt else 0
        if tokens:
            self.forest.insert(tokens, replica, now, same, self.forest.tree(salt))
            holders[key] = (salt, tokens)
        else:
            holders.pop(key, None)
        if len(old) > same and old_salt in self.forest.roots:
            self.forest.uncount(old, replica, same, self.forest.roots[old_salt])
        return self.cached_tokens(replica) - before

    def holders(self, replica: int) -> dict:
        """{key: tokens} of `replica`'s keyed holders (any salt)."""
        return {key: tokens for key, (_, tokens) in self._holders.get(replica, {}).items()}

    def holder_salt(self, replica: int, key) -> str | None:
        """The salt holder `key` of `replica` holds its tokens under (None: no such holder)."""
        held = self._holders.get(replica, {}).get(key)
        return held[0] if held is not None else None

    def drop_unheld(self, replica: int) -> int:
        """Forget what `replica` holds only by unkeyed inserts (the estimate), keeping what its
        keyed holders hold. Returns the tokens forgotten."""
        freed = 0
        for node in list(self.forest.nodes()):
            if replica in node.replicas and not node.counts.get(replica) and \
                    node.parent is not None:
                freed += self.forest.unmark(node, replica)
        return freed

    def match(self, tokens: Sequence[int], salt: str = "") -> dict[int, int]:
        """For each replica holding a prefix of `tokens` under `salt`: the length of the
        longest one."""
        out: dict[int, int] = {}
        for node, start, n in self.forest.walk(tokens, salt):
            for r in node.replicas:
                out[r] = start + n
        return out

    def touch(self, tokens: Sequence[int], replica: int, now: float, salt: str = "") -> None:
        """Mark the part of `tokens` that `replica` holds under `salt` as used at `now`."""
        for node, _, _ in self.forest.walk(tokens, salt):
            if replica not in node.replicas:
                return
            node.replicas[replica] = now

    def evict(self, replica: int, capacity_tokens: int) -> int:
        """Forget `replica`'s least recently used leaves until it holds at most
        capacity_tokens (whole edges: it may end a little below). Returns tokens forgotten."""
        if self.cached_tokens(replica) <= capacity_tokens:
            return 0
        order = itertools.count()
        heap = [(n.replicas[replica], next(order), n) for n in self.forest.leaves(replica)]
        heapq.heapify(heap)
        freed = 0
        while heap and self.cached_tokens(replica) > capacity_tokens:
            _, _, node = heapq.heappop(heap)
            freed += self.forest.unmark(node, replica)
            parent = node.parent
            if parent.parent is not None and replica in parent.replicas and \
                    not any(replica in c.replicas for c in parent.children.values()):
                heapq.heappush(heap, (parent.replicas[replica], next(order), parent))
        return freed

    def drop_replica(self, replica: int) -> None:
        """Forget everything `replica` holds (it died or restarted), keyed holders too."""
        for node in list(self.forest.nodes()):
            node.counts.pop(replica, None)
            if replica in node.replicas:
                self.forest.unmark(node, replica)
        self.forest.cached.pop(replica, None)
        self._holders.pop(replica, None)

    def num_nodes(self) -> int:
        return sum(1 for _ in self.forest.nodes())


__all__ = ["PrefixTree"]
