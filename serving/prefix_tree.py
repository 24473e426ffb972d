"""The router's global prefix tree (Preble's global radix tree): which replica caches which
token prefixes.

    tree = PrefixTree()
    tree.insert(ids, replica=0, now=t)      # replica 0 now holds ids (and so every prefix of it)
    tree.match(ids)                         # {replica: longest cached prefix length}
    tree.evict(0, capacity_tokens)          # age replica 0's least recently used leaves out

A radix tree over token ids: each edge holds a run of tokens, each node the replicas that hold
the prefix ending there and when each last used it. A replica holding a node holds all of its
ancestors.

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


class _Node:
    __slots__ = ("tokens", "children", "replicas", "counts", "parent")

    def __init__(self, tokens: tuple[int, ...], parent: "_Node | None"):
        self.tokens = tokens
        self.children: dict[int, _Node] = {}
        self.replicas: dict[int, float] = {}     # replica -> last use (monotonic seconds)
        self.counts: dict[int, int] = {}         # replica -> keyed holders covering this node
        self.parent = parent


class _Root(_Node):
    """The root of one salt's tree (parent None)."""
    __slots__ = ("salt",)

    def __init__(self, salt: str):
        super().__init__((), None)
        self.salt = salt


class PrefixTree:
    def __init__(self):
        self.root = _Root("")                    # the unsalted tree
        self._roots: dict[str, _Root] = {"": self.root}   # salt -> its tree (salted: while used)
        self._cached: dict[int, int] = {}        # replica -> tokens it holds in the tree
        self._holders: dict[int, dict] = {}      # replica -> {key: (salt, the tokens it holds)}

    def cached_tokens(self, replica: int) -> int:
        """Tokens the tree believes `replica` holds."""
        return self._cached.get(replica, 0)

    def salts(self) -> list[str]:
        """The salts the tree holds prefixes under ("" always listed)."""
        return list(self._roots)

    def insert(self, tokens: Sequence[int], replica: int, now: float, salt: str = "") -> None:
        """Record that `replica` holds `tokens` under `salt` (used at `now`), unkeyed (an
        estimate)."""
        tokens = _ints(tokens)
        if tokens:
            self._insert(tokens, replica, now, None, self._root(salt))

    def hold(self, tokens: Sequence[int], replica: int, key, now: float, salt: str = "") -> int:
        """Holder `key` of `replica` (one of its conversations) now holds exactly `tokens`
        under `salt` (empty tokens: nothing, whatever the salt), replacing what it held before.
        Returns the change in the tokens the tree credits `replica` with (negative: it learnt
        an eviction)."""
        tokens = _ints(tokens)
        holders = self._holders.setdefault(replica, {})
        old_salt, old = holders.get(key, (salt, ()))
        if not tokens:
            salt = old_salt
        if old == tokens and old_salt == salt:
            return 0
        before = self.cached_tokens(replica)
        same = _common(old, tokens, 0) if old_salt == salt else 0
        if tokens:
            self._insert(tokens, replica, now, same, self._root(salt))
            holders[key] = (salt, tokens)
        else:
            holders.pop(key, None)
        if len(old) > same and old_salt in self._roots:
            self._uncount(old, replica, same, self._roots[old_salt])
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
        for node in list(self._nodes()):
            if replica in node.replicas and not node.counts.get(replica) and \
                    node.parent is not None:
                freed += self._unmark(node, replica)
        return freed

    def match(self, tokens: Sequence[int], salt: str = "") -> dict[int, int]:
        """For each replica holding a prefix of `tokens` under `salt`: the length of the
        longest one."""
        out: dict[int, int] = {}
        node, i = self._roots.get(salt), 0
        if node is None:
            return out
        while i < len(tokens):
            child = node.children.get(int(tokens[i]))
            if child is None:
                break
            n = _common(child.tokens, tokens, i)
            for r in child.replicas:
                out[r] = i + n
            if n < len(child.tokens):
                break
            node, i = child, i + n
        return out

    def touch(self, tokens: Sequence[int], replica: int, now: float, salt: str = "") -> None:
        """Mark the part of `tokens` that `replica` holds under `salt` as used at `now`."""
        node, i = self._roots.get(salt), 0
        while node is not None and i < len(tokens):
            child = node.children.get(int(tokens[i]))
            if child is None or replica not in child.replicas:
                return
            child.replicas[replica] = now
            n = _common(child.tokens, tokens, i)
            if n < len(child.tokens):
                return
            node, i = child, i + n

    def evict(self, replica: int, capacity_tokens: int) -> int:
        """Forget `replica`'s least recently used leaves until it holds at most
        capacity_tokens (whole edges: it may end a little below). Returns tokens forgotten."""
        if self.cached_tokens(replica) <= capacity_tokens:
            return 0
        order = itertools.count()
        heap = [(n.replicas[replica], next(order), n) for n in self._leaves(replica)]
        heapq.heapify(heap)
        freed = 0
        while heap and self.cached_tokens(replica) > capacity_tokens:
            _, _, node = heapq.heappop(heap)
            freed += self._unmark(node, replica)
            parent = node.parent
            if parent.parent is not None and replica in parent.replicas and \
                    not any(replica in c.replicas for c in parent.children.values()):
                heapq.heappush(heap, (parent.replicas[replica], next(order), parent))
        return freed

    def drop_replica(self, replica: int) -> None:
        """Forget everything `replica` holds (it died or restarted), keyed holders too."""
        for node in list(self._nodes()):
            node.counts.pop(replica, None)
            if replica in node.replicas:
                self._unmark(node, replica)
        self._cached.pop(replica, None)
        self._holders.pop(replica, None)

    def num_nodes(self) -> int:
        return sum(1 for _ in self._nodes())

    # -- internals ------------------------------------------------------------------------------

    def _root(self, salt: str) -> _Root:
        root = self._roots.get(salt)
        if root is None:
            root = self._roots[salt] = _Root(salt)
        return root

    def _insert(self, tokens: tuple[int, ...], replica: int, now: float,
                count_from: int | None, root: _Root) -> None:
        """Mark the path of tokens (from `root`: a salt's tree) for replica; with count_from,
        also count one more keyed holder on each node of it ending past token count_from."""
        node, i = root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                child = _Node(tokens[i:], node)
                node.children[tokens[i]] = child
            else:
                n = _common(child.tokens, tokens, i)
                if n < len(child.tokens):
                    child = self._split(child, n)
            node = child
            i += len(node.tokens)
            self._mark(node, replica, now)
            if count_from is not None and i > count_from:
                node.counts[replica] = node.counts.get(replica, 0) + 1

    def _uncount(self, tokens: tuple[int, ...], replica: int, keep: int, root: _Root) -> None:
        """One keyed holder of replica no longer holds tokens (under root's salt) past token
        `keep`: count it off the nodes of their path ending past it; a node left with no holder
        loses the replica."""
        node, i, path = root, 0, []
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None or _common(child.tokens, tokens, i) < len(child.tokens):
                break
            node, i = child, i + len(child.tokens)
            if i > keep:
                path.append(node)
        for node in reversed(path):          # deepest first: pruning climbs from the leaves
            n = node.counts.get(replica, 0) - 1
            if n > 0:
                node.counts[replica] = n
                continue
            node.counts.pop(replica, None)
            if replica in node.replicas:
                self._unmark(node, replica)

    def _mark(self, node: _Node, replica: int, now: float) -> None:
        if replica not in node.replicas:
            self._cached[replica] = self._cached.get(replica, 0) + len(node.tokens)
        node.replicas[replica] = now

    def _unmark(self, node: _Node, replica: int) -> int:
        del node.replicas[replica]
        node.counts.pop(replica, None)
        n = len(node.tokens)
        self._cached[replica] -= n
        while node.parent is not None and not node.replicas and not node.children:
            del node.parent.children[node.tokens[0]]
            node = node.parent
        if node.parent is None and not node.children and node is not self.root:
            self._roots.pop(node.salt, None)          # a salt's tree left empty
        return n

    def _split(self, node: _Node, n: int) -> _Node:
        """Split node's edge after n tokens; returns the new upper node."""
        upper = _Node(node.tokens[:n], node.parent)
        upper.replicas = dict(node.replicas)
        upper.counts = dict(node.counts)
        node.parent.children[upper.tokens[0]] = upper
        node.tokens = node.tokens[n:]
        node.parent = upper
        upper.children[node.tokens[0]] = node
        return upper

    def _nodes(self):
        stack = [n for root in list(self._roots.values()) for n in root.children.values()]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _leaves(self, replica: int):
        return [n for n in self._nodes() if replica in n.replicas and
                not any(replica in c.replicas for c in n.children.values())]


def _ints(tokens: Sequence[int]) -> tuple[int, ...]:
    out = tuple(tokens)
    return out if all(type(t) is int for t in out[:1]) else tuple(map(int, out))


def _common(edge: tuple[int, ...], tokens: Sequence[int], start: int) -> int:
    n = min(len(edge), len(tokens) - start)
    if edge[:n] == tuple(tokens[start:start + n]):     # the usual case, at C speed
        return n
    for k in range(n):
        if edge[k] != tokens[start + k]:
            return k
    return n


__all__ = ["PrefixTree"]
