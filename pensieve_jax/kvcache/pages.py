"""Host-side page allocator for a KV page pool (the device's, or the host tier's): a free list
with reference counts."""

from __future__ import annotations


class OutOfPages(RuntimeError):
    pass


class PageAllocator:
    """Hands out page ids [0, num_pages). A page returns to the free list when its count hits 0.
    tier: the pool's name in Engine.stats()["pages"] ("device", "host")."""

    def __init__(self, num_pages: int, tier: str = "device"):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages, self.tier = num_pages, tier
        self._free = list(range(num_pages - 1, -1, -1))
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise OutOfPages(f"need {n} KV pages, {len(self._free)} free of {self.num_pages}")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def ref_count(self, page: int) -> int:
        return self._refs[page]

    def share(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] == 0:
                raise ValueError(f"page {p} is free; cannot share it")
            self._refs[p] += 1

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] == 0:
                raise ValueError(f"page {p} freed twice")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)

    def report_stats(self) -> dict[str, dict[str, dict[str, int]]]:
        """pages: {tier: pages used, free, total} (a Reporter, model/reporting.py)."""
        used = self.num_pages - len(self._free)
        return {"pages": {self.tier: {"used": used, "free": len(self._free),
                                      "total": self.num_pages}}}
