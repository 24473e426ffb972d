"""Prompt sharing: a radix tree over cached token sequences, one edge per full KV page.

A node stands for the KV of one page-aligned token prefix. It points at the device page and/or
host page that currently hold it; the pages themselves are owned (reference-counted) by the
conversations using them, so the tree holds no references: when a page's last owner frees it
the store tells the tree (`forget_device` / `forget_host`) and the node loses that copy. A node
with no copy and no children is pruned.

    | rule                                  | why                                               |
    |---------------------------------------|---------------------------------------------------|
    | only full pages are inserted          | a partly filled page is still being written       |
    | a node's device page is never written | owners copy it first (copy on write)              |
    | roots are per cache salt              | requests with different salts never share pages   |

Match cost is one dict lookup per page of the prompt.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple


@dataclasses.dataclass(eq=False)
class Node:
    key: tuple[int, ...]
    parent: "Node | None"
    children: dict[tuple[int, ...], "Node"] = dataclasses.field(default_factory=dict)
    device: int = -1            # device page holding this prefix's last page, or -1
    host: int = -1              # host page holding it, or -1
    last_used: float = 0.0

    def has_copy(self) -> bool:
        return self.device >= 0 or self.host >= 0


class Partial(NamedTuple):
    """A cached page that shares only its first `num_tokens` tokens with the prompt."""

    node: Node
    num_tokens: int


class PrefixIndex:
    def __init__(self, page_size: int):
        self.page_size = page_size
        self._roots: dict[str, Node] = {}
        self._by_device: dict[int, Node] = {}
        self._by_host: dict[int, Node] = {}
        self.num_nodes = 0

    def _root(self, salt: str) -> Node:
        root = self._roots.get(salt)
        if root is None:
            root = self._roots[salt] = Node((), None)
        return root

    def _keys(self, tokens, num_pages: int):
        ps = self.page_size
        return (tuple(tokens[i * ps:(i + 1) * ps]) for i in range(num_pages))

    def path(self, salt: str, tokens, limit: int | None = None) -> list[Node]:
        """Nodes of the longest indexed prefix of tokens (whole pages, at most `limit` tokens);
        some may hold no copy (a gap: their KV is gone, a later page's is not)."""
        n = len(tokens) if limit is None else min(limit, len(tokens))
        node, out = self._roots.get(salt), []
        if node is None:
            return out
        for key in self._keys(tokens, n // self.page_size):
            node = node.children.get(key)
            if node is None:
                break
            out.append(node)
        return out

    def match(self, salt: str, tokens, limit: int) -> tuple[list[Node], Partial | None]:
        """The prefix of tokens[:limit] the index can serve: whole pages with a copy (device or
        host) from the start, then possibly one device page matching only part of the next
        page (to be copied on write)."""
        now = time.monotonic()
        nodes = []
        for node in self.path(salt, tokens, limit):
            if not node.has_copy():
                break
            node.last_used = now
            nodes.append(node)
        parent = nodes[-1] if nodes else self._roots.get(salt)
        start = len(nodes) * self.page_size
        rest = tokens[start:min(limit, start + self.page_size)]
        best = None
        if parent is not None and rest:
            for key, child in parent.children.items():
                if child.device < 0:
                    continue
                n = common_prefix(key, rest)
                if n > 0 and (best is None or n > best.num_tokens):
                    best = Partial(child, n)
        return nodes, best

    def matched_tokens(self, nodes: list[Node], partial: Partial | None) -> int:
        """Tokens a `match` result serves."""
        return len(nodes) * self.page_size + (partial.num_tokens if partial else 0)

    def insert(self, salt: str, tokens, pages: list[int]) -> None:
        """Record that device pages[i] hold the KV of tokens' page i (full pages only; a page
        given as -1 is skipped, an existing copy is kept)."""
        node = self._root(salt)
        now = time.monotonic()
        for key, page in zip(self._keys(tokens, len(tokens) // self.page_size), pages):
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = Node(key, node)
                self.num_nodes += 1
            if page >= 0 and child.device < 0 and page not in self._by_device:
                child.device = page
                self._by_device[page] = child
            child.last_used = now
            node = child
        self._prune(node)           # pages given as -1 at the end leave no copy-less leaf

    def moved_to_host(self, device_page: int, host_page: int) -> None:
        """The device page's contents were copied to host_page (before the device page goes)."""
        node = self._by_device.get(device_page)
        if node is not None and node.host < 0:
            node.host = host_page
            self._by_host[host_page] = node

    def is_indexed(self, device_page: int) -> bool:
        return device_page in self._by_device

    def forget_device(self, page: int) -> None:
        node = self._by_device.pop(page, None)
        if node is not None:
            node.device = -1
            self._prune(node)

    def forget_host(self, page: int) -> None:
        node = self._by_host.pop(page, None)
        if node is not None:
            node.host = -1
            self._prune(node)

    def _prune(self, node: Node) -> None:
        while node.parent is not None and not node.children and not node.has_copy():
            del node.parent.children[node.key]
            self.num_nodes -= 1
            node = node.parent

    def stats(self) -> dict[str, int]:
        return {"nodes": self.num_nodes, "device_pages": len(self._by_device),
                "host_pages": len(self._by_host)}


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
