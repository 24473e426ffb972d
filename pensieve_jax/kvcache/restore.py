"""Bringing a conversation's KV back before its turn runs: from its own tiers (device, host,
disk), from pages other conversations hold (prompt sharing), or by recomputing one range
(usually a prefix). Page files are read and verified while the plan is made, so a torn or
corrupted one only widens that conversation's recompute range.

    plan = restorer.plan_restore(conv)    # where each page comes from; what to recompute
    ...                                   # the caller makes room for plan.new_pages
    loads = restorer.restore(conv)        # device pages for all; swap-ins / copies queued
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from pensieve_jax.kvcache.ledger import Conversation, PageLedger

__all__ = ["DiskIn", "RestorePlan", "Restorer", "SwapIn"]


class SwapIn(NamedTuple):
    host_page: int
    device_page: int
    conversation: Conversation
    index: int             # page index in the conversation (it may be gone by the time the
                           # copy lands: then the copy is skipped)


class DiskIn(NamedTuple):
    k: np.ndarray          # [layers, page_size, kv_heads, head_dim], read from a page file
    v: np.ndarray
    device_page: int
    conversation: Conversation
    index: int


class RestorePlan(NamedTuple):
    new_pages: int         # device pages to allocate
    front: tuple[int, int]  # token range [start, end) to recompute
    shared_tokens: int     # cached tokens taken from other conversations' pages


class Restorer:
    """Plans and carries out restores over the ledger's pages. Host -> device copies are queued
    in `swap_in`, disk -> device copies in `disk_in`, device -> device copies (copy on write)
    in `copies`, for the swapper (pensieve_jax/kvcache/swap.py) to run before the next step."""

    def __init__(self, ledger: PageLedger):
        self.ledger = ledger
        # (first token, tokens) -> True if recomputing them beats loading their page from host
        self.recompute_cheaper: Callable[[int, int], bool] | None = None
        # the same for pages in page files on disk
        self.disk_recompute_cheaper: Callable[[int, int], bool] | None = None
        self.swap_in: list[SwapIn] = []               # host -> device copies to make
        self.disk_in: list[DiskIn] = []               # disk -> device copies to make
        self.copies: list[tuple[int, int]] = []       # (device page, device page), to copy
        self.counts = dict.fromkeys(("copied_on_write_pages", "recomputed_not_loaded_pages",
                                     "disk_unreadable_pages"), 0)

    def take_copies(self) -> tuple[list[tuple[int, int]], list[SwapIn]]:
        """(device copies, swap-ins) queued since the last call."""
        copies, into = self.copies, self.swap_in
        self.copies, self.swap_in = [], []
        return copies, into

    def take_disk_loads(self) -> list[DiskIn]:
        """Disk -> device copies queued since the last call."""
        out, self.disk_in = self.disk_in, []
        return out

    def attach_shared(self, conv: Conversation, prompt: list[int]) -> int:
        """Extend conv's cached prefix of prompt with pages other conversations hold (whole
        pages shared; a page matching only in part is copied on write). Call after truncating
        conv to its own cached prefix. Returns the tokens gained."""
        limit = len(prompt) - 1         # the last prompt token always runs
        ledger, index = self.ledger, self.ledger.index
        if index is None or conv.num_computed >= limit:
            return 0
        nodes, partial = index.match(conv.salt, prompt, limit)
        ps = ledger.page_size
        total = index.matched_tokens(nodes, partial)
        gained = total - conv.num_computed
        if gained <= 0:
            return 0
        first = conv.num_computed // ps
        new_pages, new_host = [], {}
        for i in range(first, len(nodes)):       # take references before letting ours go
            if nodes[i].device >= 0:
                ledger.device.share([nodes[i].device])
                new_pages.append(nodes[i].device)
            else:
                ledger.host.share([nodes[i].host])
                new_host[i] = nodes[i].host
                new_pages.append(-1)
        if partial:
            ledger.device.share([partial.node.device])
        ledger.truncate(conv, first * ps)
        conv.pages.extend(new_pages)
        conv.host_pages.update(new_host)
        if partial:
            conv.cow = (len(conv.pages), partial.node.device)
            conv.pages.append(-1)
        conv.num_computed = total
        return gained

    def make_writable(self, conv: Conversation) -> None:
        """The page the next token goes into must be conv's alone: a shared one is copied
        first, and an indexed one leaves the index (its contents are about to change)."""
        ledger = self.ledger
        i = conv.num_computed // ledger.page_size
        if conv.num_computed % ledger.page_size == 0 or i >= len(conv.pages):
            return
        page = conv.pages[i]
        if page < 0:
            return                      # on host or recomputed: it arrives in a fresh page
        if ledger.device.ref_count(page) > 1:
            conv.cow, conv.pages[i] = (i, page), -1      # our reference now guards the source
        elif ledger.index is not None:
            ledger.index.forget_device(page)

    def plan_restore(self, conv: Conversation) -> RestorePlan:
        """Settle where each page of conv comes from before its turn runs: its own device or
        host page, a page the index holds (shared), or recomputation. The pages to recompute
        form one range (from the first page with no copy anywhere to the last), and anything
        conv holds inside it is let go. Idempotent; `restore` carries the plan out."""
        ledger, ps = self.ledger, self.ledger.page_size
        full = conv.num_computed // ps
        path = ledger.index.path(conv.salt, conv.token_ids, full * ps) if ledger.index else []

        def has_copy(i):
            return (conv.pages[i] >= 0 or i in conv.host_pages or i in conv.disk_pages or
                    (conv.cow is not None and conv.cow[0] == i) or
                    (i < len(path) and path[i].has_copy()))
        while True:
            missing = [i for i in range(len(conv.pages)) if not has_copy(i)]
            lo, hi = (missing[0], missing[-1] + 1) if missing else (len(conv.pages),) * 2
            if self.recompute_cheaper is not None or self.disk_recompute_cheaper is not None:
                lo, hi = self._recompute_instead_of_load(conv, path, lo, hi)
            unreadable = self._unreadable_disk_pages(conv, lo, hi)
            if not unreadable:
                break
            self.counts["disk_unreadable_pages"] += len(unreadable)
            for i in unreadable:         # missing now: the next round recomputes them
                ledger.release_page(conv, i)
        for i in range(lo, hi):
            ledger.release_page(conv, i)
        shared = 0
        for i, node in enumerate(path):
            if lo <= i < hi or conv.pages[i] >= 0 or i in conv.host_pages or i in conv.disk_pages:
                continue
            if node.device >= 0:
                ledger.device.share([node.device])
                conv.pages[i] = node.device
                shared += ps
            elif node.host >= 0:
                ledger.host.share([node.host])
                conv.host_pages[i] = node.host
                shared += ps
        front = (lo * ps, min(hi * ps, conv.num_computed)) if lo < hi else (0, 0)
        return RestorePlan(sum(1 for p in conv.pages if p < 0), front, shared)

    def _recompute_instead_of_load(self, conv: Conversation, path, lo: int, hi: int):
        """Grow the recompute range [lo, hi) over neighbouring pages that would come from host
        memory while recomputing them is cheaper than loading them (per page, front first when
        nothing is missing yet)."""
        ps, n = self.ledger.page_size, len(conv.pages)

        def loads(i):
            if conv.pages[i] >= 0 or (conv.cow is not None and conv.cow[0] == i):
                return False
            return i in conv.host_pages or i in conv.disk_pages or (
                i < len(path) and path[i].has_copy() and path[i].device < 0)

        def cheaper(i):
            fn = self.disk_recompute_cheaper if i in conv.disk_pages else self.recompute_cheaper
            return (loads(i) and fn is not None and
                    fn(i * ps, min(ps, conv.num_computed - i * ps)))
        if lo == hi:
            first = next((i for i in range(n) if loads(i)), None)
            if first is None or not cheaper(first):
                return lo, hi
            lo, hi = first, first + 1
            self.counts["recomputed_not_loaded_pages"] += 1
        while lo > 0 and cheaper(lo - 1):
            lo -= 1
            self.counts["recomputed_not_loaded_pages"] += 1
        while hi < n and cheaper(hi):
            hi += 1
            self.counts["recomputed_not_loaded_pages"] += 1
        return lo, hi

    def _unreadable_disk_pages(self, conv: Conversation, lo: int, hi: int) -> list[int]:
        """conv's disk pages outside [lo, hi) whose page file cannot be read, or holds other
        tokens (each file is read and verified once, then kept until its pages are taken)."""
        if not conv.disk_pages:
            return []
        ps, reads = self.ledger.page_size, self.ledger.disk.reads

        def tokens(i):
            return conv.token_ids[i * ps:min((i + 1) * ps, conv.num_computed)]
        return [i for i, (name, slot) in conv.disk_pages.items()
                if not lo <= i < hi and not reads.readable(name, slot, tokens(i))]

    def restore(self, conv: Conversation) -> int:
        """Give every page of conv a device page (after plan_restore and making room for its
        new_pages): host pages are queued for swap-in, copies on write for copying. Returns
        the number of pages to swap in, from host or disk (the conversation waits for them to
        land; its pages are offered to the index again once it has run)."""
        missing = [i for i, p in enumerate(conv.pages) if p < 0]
        loads, ps = 0, self.ledger.page_size
        for i, page in zip(missing, self.ledger.device.allocate(len(missing))):
            conv.pages[i] = page
            if i in conv.host_pages:
                self.swap_in.append(SwapIn(conv.host_pages.pop(i), page, conv, i))
                loads += 1
            elif i in conv.disk_pages:      # read by plan_restore (_unreadable_disk_pages)
                name, slot = conv.disk_pages.pop(i)
                num_tokens = min(ps, conv.num_computed - i * ps)
                k, v = self.ledger.disk.reads.take(name, slot, num_tokens)
                self.disk_in.append(DiskIn(k, v, page, conv, i))
                loads += 1
            elif conv.cow is not None and conv.cow[0] == i:
                self.copies.append((conv.cow[1], page))
                self.ledger.free_device([conv.cow[1]])  # the copy runs before any later write
                conv.cow = None
                self.counts["copied_on_write_pages"] += 1
        return loads
