"""The router's global prefix tree (Preble's global radix tree): which replica caches which
token prefixes.

    tree = PrefixTree()
    tree.insert(ids, replica=0, now=t)      # replica 0 now holds ids (and so every prefix of it)
    tree.match(ids)                         # {replica: longest cached prefix length}
    tree.evict(0, capacity_tokens)          # age replica 0's least recently used leaves out

A radix tree over token ids: each edge holds a run of tokens, each node the replicas that hold
the prefix ending there and when each last used it. A replica holding a node holds all of its
ancestors. The tree only knows what the router routed: replicas do not report evictions, so
`evict` ages entries out by LRU against an estimate of each replica's capacity.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Sequence


class _Node:
    __slots__ = ("tokens", "children", "replicas", "parent")

    def __init__(self, tokens: tuple[int, ...], parent: "_Node | None"):
        self.tokens = tokens
        self.children: dict[int, _Node] = {}
        self.replicas: dict[int, float] = {}     # replica -> last use (monotonic seconds)
        self.parent = parent


class PrefixTree:
    def __init__(self):
        self.root = _Node((), None)
        self._cached: dict[int, int] = {}        # replica -> tokens it holds in the tree

    def cached_tokens(self, replica: int) -> int:
        """Tokens the tree believes `replica` holds."""
        return self._cached.get(replica, 0)

    def insert(self, tokens: Sequence[int], replica: int, now: float) -> None:
        """Record that `replica` holds `tokens` (used at `now`)."""
        node, i, tokens = self.root, 0, tuple(int(t) for t in tokens)
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

    def match(self, tokens: Sequence[int]) -> dict[int, int]:
        """For each replica holding a prefix of `tokens`: the length of the longest one."""
        out: dict[int, int] = {}
        node, i = self.root, 0
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

    def touch(self, tokens: Sequence[int], replica: int, now: float) -> None:
        """Mark the part of `tokens` that `replica` holds as used at `now`."""
        node, i = self.root, 0
        while i < len(tokens):
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
            if parent is not self.root and replica in parent.replicas and \
                    not any(replica in c.replicas for c in parent.children.values()):
                heapq.heappush(heap, (parent.replicas[replica], next(order), parent))
        return freed

    def drop_replica(self, replica: int) -> None:
        """Forget everything `replica` holds (it died or restarted)."""
        for node in list(self._nodes()):
            if replica in node.replicas:
                self._unmark(node, replica)
        self._cached.pop(replica, None)

    def num_nodes(self) -> int:
        return sum(1 for _ in self._nodes())

    # -- internals ------------------------------------------------------------------------------

    def _mark(self, node: _Node, replica: int, now: float) -> None:
        if replica not in node.replicas:
            self._cached[replica] = self._cached.get(replica, 0) + len(node.tokens)
        node.replicas[replica] = now

    def _unmark(self, node: _Node, replica: int) -> int:
        del node.replicas[replica]
        n = len(node.tokens)
        self._cached[replica] -= n
        while node is not self.root and not node.replicas and not node.children:
            del node.parent.children[node.tokens[0]]
            node = node.parent
        return n

    def _split(self, node: _Node, n: int) -> _Node:
        """Split node's edge after n tokens; returns the new upper node."""
        upper = _Node(node.tokens[:n], node.parent)
        upper.replicas = dict(node.replicas)
        node.parent.children[upper.tokens[0]] = upper
        node.tokens = node.tokens[n:]
        node.parent = upper
        upper.children[node.tokens[0]] = node
        return upper

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _leaves(self, replica: int):
        return [n for n in self._nodes() if replica in n.replicas and
                not any(replica in c.replicas for c in n.children.values())]


def _common(edge: tuple[int, ...], tokens: Sequence[int], start: int) -> int:
    n = min(len(edge), len(tokens) - start)
    for k in range(n):
        if edge[k] != tokens[start + k]:
            return k
    return n


__all__ = ["PrefixTree"]
