"""Which conversation holds which pages: device and host pages, their reference counts, and the
prefix index that offers full pages to other conversations.

    | Conversation field | meaning                                                          |
    |--------------------|------------------------------------------------------------------|
    | token_ids          | the conversation's token history: every turn's prompt and output  |
    |                    | so far (the current turn's last one may be a placeholder); the    |
    |                    | process's one copy of it, kept while its KV goes (issue 19)       |
    | num_computed       | tokens [0, num_computed) have had their KV computed               |
    | pages[i]           | device page of tokens [i*ps, (i+1)*ps), or -1 if not on device    |
    | host_pages[i]      | host page of page index i (when swapped out)                      |
    | disk_pages[i]      | (page file, slot) of page index i (when moved on to disk)         |
    | cow                | (i, device page): page i is to be copied from that page (a shared |
    |                    | page this conversation will write into), a reference held on it  |
    | salt               | cache salt: pages are shared only between equal salts            |
    | anonymous          | created for a request without an id: a later request whose prompt |
    |                    | starts with its tokens may adopt it (stateless clients)           |
    | busy / flushing    | a turn runs in it / that turn is done but for its cache flush     |

A page index is in one tier at a time: device, host or disk (or none: dropped, recomputed when
the conversation returns). Disk slots are never shared (kvcache/disk_cache.py).
Pages are reference-counted: with prompt sharing (`PrefixIndex`) one device or host page may be
held by many conversations. A page with more than one holder is never written (copy on write).
A page whose last holder lets it go leaves the index too.
"""

from __future__ import annotations

import dataclasses
import time

from pensieve_jax.kvcache.disk_cache import DiskCache
from pensieve_jax.kvcache.pages import PageAllocator
from pensieve_jax.kvcache.prefix_index import PrefixIndex, common_prefix

__all__ = ["Conversation", "PageLedger"]


@dataclasses.dataclass(eq=False)
class Conversation:
    id: str
    anonymous: bool
    salt: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    host_pages: dict[int, int] = dataclasses.field(default_factory=dict)
    disk_pages: dict[int, tuple[str, int]] = dataclasses.field(default_factory=dict)
    cow: tuple[int, int] | None = None
    shared_tokens: int = 0      # computed tokens it was given by a fork, not yet accounted
    num_computed: int = 0
    busy: bool = False          # a turn runs in it
    flushing: bool = False      # ... and that turn only has its last token's KV left to compute
    last_used: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def dropped(self) -> int:
        """Leading pages whose KV this conversation holds in no tier."""
        for i, p in enumerate(self.pages):
            if (p >= 0 or i in self.host_pages or i in self.disk_pages or
                    (self.cow and self.cow[0] == i)):
                return i
        return len(self.pages)


class PageLedger:
    """The page pools (device, and host when there is a host tier), the disk tier's page files
    (None: no disk tier) and the prefix index (None: no prompt sharing), kept consistent as
    conversations take, share and let go of pages."""

    def __init__(self, device: PageAllocator, page_size: int,
                 host: PageAllocator | None = None, index: PrefixIndex | None = None,
                 disk: DiskCache | None = None):
        self.device = device
        self.host = host
        self.disk = disk
        self.page_size = page_size
        self.index = index

    def free_device(self, pages) -> None:
        """Drop one reference on each device page (a page no one holds leaves the index)."""
        for p in pages:
            self.device.free([p])
            if self.index is not None and self.device.ref_count(p) == 0:
                self.index.forget_device(p)

    def free_host(self, pages) -> None:
        """Drop one reference on each host page (a page no one holds leaves the index)."""
        for p in pages:
            self.host.free([p])
            if self.index is not None and self.host.ref_count(p) == 0:
                self.index.forget_host(p)

    def release_page(self, conv: Conversation, i: int) -> None:
        """conv no longer holds page i in any tier."""
        if i < len(conv.pages) and conv.pages[i] >= 0:
            self.free_device([conv.pages[i]])
            conv.pages[i] = -1
        if i in conv.host_pages:
            self.free_host([conv.host_pages.pop(i)])
        if i in conv.disk_pages:
            self.disk.release(*conv.disk_pages.pop(i))
        if conv.cow and conv.cow[0] == i:
            self.free_device([conv.cow[1]])
            conv.cow = None

    def truncate(self, conv: Conversation, num_tokens: int) -> None:
        """Keep KV for tokens [0, num_tokens) only; pages past them go back to their pools."""
        conv.num_computed = min(conv.num_computed, num_tokens)
        keep = -(-conv.num_computed // self.page_size)
        for i in sorted(set(range(keep, len(conv.pages))) |
                        {i for i in (*conv.host_pages, *conv.disk_pages) if i >= keep}):
            self.release_page(conv, i)
        del conv.pages[keep:]

    def rewind(self, conv: Conversation, token_ids: list[int]) -> None:
        """conv's token history becomes exactly token_ids: the KV of the computed prefix they
        share stays, the rest goes back to its pools."""
        self.truncate(conv, common_prefix(conv.token_ids[:conv.num_computed], token_ids))
        conv.token_ids, conv.last_used = list(token_ids), time.monotonic()

    def register(self, conv: Conversation) -> None:
        """Offer conv's full computed pages to other conversations (prompt sharing)."""
        if self.index is not None:
            n = conv.num_computed // self.page_size * self.page_size
            self.index.insert(conv.salt, conv.token_ids[:n], conv.pages[:n // self.page_size])

    def fork(self, src: Conversation, conv: Conversation, num_tokens: int) -> None:
        """conv (new) starts from src's KV of its first num_tokens tokens: the leading pages src
        holds on device or host are shared, a partly used last page is copied on write."""
        ps = self.page_size
        num_tokens = min(num_tokens, src.num_computed)
        for i in range(-(-num_tokens // ps)):
            partial = (i + 1) * ps > num_tokens
            if i < len(src.pages) and src.pages[i] >= 0:
                self.device.share([src.pages[i]])
                if partial:
                    conv.cow = (i, src.pages[i])
                    conv.pages.append(-1)
                else:
                    conv.pages.append(src.pages[i])
            elif i in src.host_pages and not partial:
                self.host.share([src.host_pages[i]])
                conv.host_pages[i] = src.host_pages[i]
                conv.pages.append(-1)
            else:
                break
            conv.num_computed = min(num_tokens, (i + 1) * ps)
        conv.token_ids = list(src.token_ids[:conv.num_computed])
        conv.shared_tokens = conv.num_computed

    def sources(self, conv: Conversation) -> list[tuple[str, int]]:
        """Where each leading page of conv's computed tokens can be read: ("device", page) or
        ("host", page), its own copy or else the index's, up to the first page with no copy
        anywhere."""
        ps = self.page_size
        n_pages = -(-conv.num_computed // ps)
        full = conv.num_computed // ps
        path = self.index.path(conv.salt, conv.token_ids, full * ps) if self.index else []
        out = []
        for i in range(min(n_pages, len(conv.pages))):
            if conv.pages[i] >= 0:
                out.append(("device", conv.pages[i]))
            elif i in conv.host_pages:
                out.append(("host", conv.host_pages[i]))
            elif conv.cow is not None and conv.cow[0] == i:
                out.append(("device", conv.cow[1]))
            elif i < len(path) and path[i].device >= 0:
                out.append(("device", path[i].device))
            elif i < len(path) and path[i].host >= 0:
                out.append(("host", path[i].host))
            else:
                break
        return out

    def held_tokens(self, conv: Conversation) -> int:
        """Leading tokens of conv whose KV has a copy on device or host (see `sources`); the
        index is walked only if conv's own tiers miss a page."""
        ps = self.page_size
        n_pages = min(-(-conv.num_computed // ps), len(conv.pages))
        pages, host, cow = conv.pages, conv.host_pages, conv.cow
        if any(pages[i] < 0 and i not in host and (cow is None or cow[0] != i)
               for i in range(n_pages)):
            n_pages = len(self.sources(conv))
        return min(conv.num_computed, n_pages * ps)

    def shared_device_pages(self) -> int:
        """Device pages held by more than one conversation."""
        return sum(1 for p in range(self.device.num_pages) if self.device.ref_count(p) > 1)
