"""The radix trees under the router's prefix tree (serving/router/prefix_tree.py): one tree of
token runs per cache salt, each node marked with the replicas holding the prefix ending there.

A `Node`'s edge holds a run of tokens; `replicas` maps each replica holding the node to when it
last used it, `counts` each replica to its keyed holders covering the node. A replica holding a
node holds all of its ancestors. `RadixForest` keeps the trees (a salt's tree exists while it
holds something; the unsalted one always), how many tokens each replica holds over all of them,
and the structural edits: marking a path, splitting an edge, unmarking and pruning a node.
"""

from __future__ import annotations

from typing import Iterator, Sequence


class Node:
    __slots__ = ("tokens", "children", "replicas", "counts", "parent")

    def __init__(self, tokens: tuple[int, ...], parent: "Node | None"):
        self.tokens = tokens
        self.children: dict[int, Node] = {}
        self.replicas: dict[int, float] = {}     # replica -> last use (monotonic seconds)
        self.counts: dict[int, int] = {}         # replica -> keyed holders covering this node
        self.parent = parent


class Root(Node):
    """The root of one salt's tree (parent None)."""
    __slots__ = ("salt",)

    def __init__(self, salt: str):
        super().__init__((), None)
        self.salt = salt


class RadixForest:
    """One radix tree per salt, and the tokens each replica holds over all of them."""

    def __init__(self):
        self.root = Root("")                     # the unsalted tree
        self.roots: dict[str, Root] = {"": self.root}   # salt -> its tree (salted: while used)
        self.cached: dict[int, int] = {}         # replica -> tokens it holds in the trees

    def tree(self, salt: str) -> Root:
        """The root of `salt`'s tree, made if it has none yet."""
        root = self.roots.get(salt)
        if root is None:
            root = self.roots[salt] = Root(salt)
        return root

    def insert(self, tokens: tuple[int, ...], replica: int, now: float,
               count_from: int | None, root: Root) -> None:
        """Mark the path of tokens (from `root`: a salt's tree) for replica; with count_from,
        also count one more keyed holder on each node of it ending past token count_from."""
        node, i = root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                child = Node(tokens[i:], node)
                node.children[tokens[i]] = child
            else:
                n = common(child.tokens, tokens, i)
                if n < len(child.tokens):
                    child = self.split(child, n)
            node = child
            i += len(node.tokens)
            self.mark(node, replica, now)
            if count_from is not None and i > count_from:
                node.counts[replica] = node.counts.get(replica, 0) + 1

    def uncount(self, tokens: tuple[int, ...], replica: int, keep: int, root: Root) -> None:
        """One keyed holder of replica no longer holds tokens (under root's salt) past token
        `keep`: count it off the nodes of their path ending past it; a node left with no holder
        loses the replica."""
        node, i, path = root, 0, []
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None or common(child.tokens, tokens, i) < len(child.tokens):
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
                self.unmark(node, replica)

    def walk(self, tokens: Sequence[int], salt: str) -> Iterator[tuple[Node, int, int]]:
        """The nodes along `tokens` in `salt`'s tree: (node, tokens before it, tokens of its
        edge that match). Stops after the first edge that matches only in part."""
        node, i = self.roots.get(salt), 0
        while node is not None and i < len(tokens):
            child = node.children.get(int(tokens[i]))
            if child is None:
                return
            n = common(child.tokens, tokens, i)
            yield child, i, n
            if n < len(child.tokens):
                return
            node, i = child, i + n

    def mark(self, node: Node, replica: int, now: float) -> None:
        if replica not in node.replicas:
            self.cached[replica] = self.cached.get(replica, 0) + len(node.tokens)
        node.replicas[replica] = now

    def unmark(self, node: Node, replica: int) -> int:
        """Take `replica` off node, pruning what is left empty. Returns the tokens it lost."""
        del node.replicas[replica]
        node.counts.pop(replica, None)
        n = len(node.tokens)
        self.cached[replica] -= n
        while node.parent is not None and not node.replicas and not node.children:
            del node.parent.children[node.tokens[0]]
            node = node.parent
        if node.parent is None and not node.children and node is not self.root:
            self.roots.pop(node.salt, None)          # a salt's tree left empty
        return n

    def split(self, node: Node, n: int) -> Node:
        """Split node's edge after n tokens; returns the new upper node."""
        upper = Node(node.tokens[:n], node.parent)
        upper.replicas = dict(node.replicas)
        upper.counts = dict(node.counts)
        node.parent.children[upper.tokens[0]] = upper
        node.tokens = node.tokens[n:]
        node.parent = upper
        upper.children[node.tokens[0]] = node
        return upper

    def nodes(self) -> Iterator[Node]:
        """Every node of every salt's tree (roots not included)."""
        stack = [n for root in list(self.roots.values()) for n in root.children.values()]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def leaves(self, replica: int) -> list[Node]:
        """The nodes `replica` holds and holds no child of."""
        return [n for n in self.nodes() if replica in n.replicas and
                not any(replica in c.replicas for c in n.children.values())]


def as_ints(tokens: Sequence[int]) -> tuple[int, ...]:
    out = tuple(tokens)
    return out if all(type(t) is int for t in out[:1]) else tuple(map(int, out))


def common(edge: tuple[int, ...], tokens: Sequence[int], start: int) -> int:
    """How many leading tokens of `edge` equal tokens[start:]."""
    n = min(len(edge), len(tokens) - start)
    if edge[:n] == tuple(tokens[start:start + n]):     # the usual case, at C speed
        return n
    for k in range(n):
        if edge[k] != tokens[start + k]:
            return k
    return n


__all__ = ["Node", "RadixForest", "Root", "as_ints", "common"]
