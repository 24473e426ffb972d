"""The disk tier: page files (page_file.py) in one directory, at most `capacity_bytes` of them.

A page file holds one chunk (consecutive page indices) of one conversation. Each slot of a file
is held by at most one conversation (`Conversation.disk_pages[i] == (name, slot)`); a file goes
when its last slot is let go. Files no conversation holds are *unclaimed*: written by
`flush_to_disk` or found in the directory at start (an earlier process's); disk_restart.claim
hands them to a conversation reopened with the same history; they are the first to go when
room is needed.

    f = disk.plan(conv_id, salt, pages, tokens, sources)   # the evictor, while scheduling
    disk.add(f)                                            # bytes reserved; write pending
    disk.write(f, k, v)                  # the swapper, before the next step: in the background
    disk.poll()                          # finished writes taken in (each step)
    disk.reads.readable(name, slot, tokens)        # restore plan: read + verify once
    k, v = disk.reads.take(name, slot, n)          # restore: the slot's pages (disk_reads.py)

Writes and unlinks run on worker threads (background_writes.py); a file being written is served
from memory. `used_bytes` (never above the cap) counts files held, pending, being written, and
let go while being written until that write ends; a file let go otherwise stops counting at
once, while its unlink may lag a few milliseconds. A file that cannot be read (torn, corrupted,
another layout, a failed write) is marked bad and logged; its pages count as missing, so only
its conversation recomputes them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
import uuid
import weakref

import numpy as np

from pensieve_jax.kvcache import page_file
from pensieve_jax.kvcache.background_writes import BackgroundWrites
from pensieve_jax.kvcache.disk_reads import DiskReads
from pensieve_jax.kvcache.page_file import PageLayout

log = logging.getLogger(__name__)

__all__ = ["DiskCache", "DiskFile"]

Source = tuple[str, int]       # ("host", host page) or ("device", device page)
# served_tokens: tokens whose KV a restore took from disk; bad_files: torn, corrupted or
# missing files found when reading (their pages were recomputed); refused_files: another layout
COUNTERS = ("written_files", "written_pages", "written_bytes", "loaded_files", "loaded_pages",
            "loaded_bytes", "served_tokens", "bad_files", "refused_files", "failed_writes",
            "claimed_pages", "dropped_unclaimed_files", "loaded_unwritten_files")


@dataclasses.dataclass(eq=False)
class DiskFile:
    """One page file, as the cache knows it."""
    name: str
    conversation_id: str
    salt: str                            # sha256 of the cache salt
    pages: tuple[int, ...]               # page index of each slot in its conversation
    tokens: tuple[tuple[int, ...], ...]  # token ids each slot holds KV for
    nbytes: int
    written: float
    held: set[int] = dataclasses.field(default_factory=set)   # slots a conversation holds
    state: str = "pending"               # "pending" (write queued), "writing", "written", "bad"
    header: bytes = b""                  # "pending": what write() puts first
    sources: tuple[Source, ...] = ()     # "pending": where each slot's pages are now


def make_directory(directory: str | None) -> str:
    """directory, created if need be (None: a new temporary directory)."""
    if directory is None:
        return tempfile.mkdtemp(prefix="pensieve-kv-")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"disk_cache_dir {str(directory)[:100]!r} is not a directory")
    os.makedirs(directory, exist_ok=True)
    return os.fspath(directory)


class DiskCache:
    """Page files under `directory` (None: a temporary directory removed at exit), at most
    capacity_bytes of them (0: no disk tier)."""

    def __init__(self, directory: str | None, capacity_bytes: int, layout: PageLayout):
        self.capacity_bytes = capacity_bytes
        self.layout = layout
        self.enabled = capacity_bytes > 0
        self.files: dict[str, DiskFile] = {}
        self.used_bytes = 0
        self._pending: list[DiskFile] = []
        self.writes = BackgroundWrites()
        self.reads = DiskReads(self)          # reads: readable, take (restore plans)
        self._doomed: dict[str, int] = {}      # let go while being written: name -> bytes
        self.stats = {**dict.fromkeys(COUNTERS, 0), "write_s": 0.0, "load_s": 0.0}
        self.directory = make_directory(directory) if self.enabled else ""
        if self.enabled and directory is None:
            weakref.finalize(self, shutil.rmtree, self.directory, True)
        elif self.enabled:
            self._scan()

    # -- room ---------------------------------------------------------------------------------

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def plan(self, conversation_id: str, salt: str, pages: list[int],
             tokens: list[list[int]], sources: list[Source]) -> DiskFile:
        """A page file for pages of a conversation, not yet added (see add)."""
        header = page_file.encode_header(self.layout, conversation_id, salt, pages, tokens)
        name = page_file.file_name(conversation_id, pages[0], uuid.uuid4().hex[:8])
        return DiskFile(name, conversation_id, page_file.salt_digest(salt), tuple(pages),
                        tuple(tuple(t) for t in tokens),
                        page_file.file_bytes(header, self.layout, len(pages)), time.time(),
                        set(range(len(pages))), "pending", header, tuple(sources))

    def add(self, f: DiskFile, queue: bool = True) -> None:
        """Reserve f's bytes (the caller made room) and queue its write (queue=False: the
        caller writes it, or it is on disk already)."""
        self.files[f.name] = f
        self.used_bytes += f.nbytes
        if queue:
            self._pending.append(f)

    def take_writes(self) -> list[DiskFile]:
        """Files added since the last call whose write is still to be done."""
        out, self._pending = [f for f in self._pending if f.name in self.files], []
        return out

    def drop_unclaimed(self, before: float | None = None) -> bool:
        """Delete the oldest file no conversation holds (written before `before`, a time.time(),
        if given); False if there is none."""
        free = [f for f in self.files.values()
                if not f.held and (before is None or f.written < before)]
        if not free:
            return False
        self.remove(min(free, key=lambda f: f.written))
        self.stats["dropped_unclaimed_files"] += 1
        return True

    # -- writes -------------------------------------------------------------------------------

    def write(self, f: DiskFile, k: np.ndarray, v: np.ndarray) -> bool:
        """Start writing a pending file's pages k, v [layers, slots, ...] in the background
        (served from k, v until written; see poll). False if it was let go meanwhile."""
        if self.files.get(f.name) is not f or f.state != "pending":
            return False
        self.writes.submit(f.name, self.path(f.name), f.header, k, v)
        f.state, f.header, f.sources = "writing", b"", ()
        return True

    def poll(self, wait: bool = False) -> None:
        """Take in the writes that finished (wait: all of them). A failed one is bad (its pages
        are recomputed when needed); one let go while it was written is deleted now."""
        for name, result in self.writes.done(wait):
            f = self.files.get(name)
            if f is None:                     # let go while written: its bytes go only now
                self.used_bytes -= self._doomed.pop(name, 0)
                self._delete(name)
                self._delete(name + ".tmp")
            if isinstance(result, OSError):
                log.warning("disk tier: writing %s failed (%s); its pages will be recomputed",
                            name, result)
                self.stats["failed_writes"] += 1
                if f is not None:
                    f.state = "bad"
                continue
            self.stats["write_s"] += result
            if f is None:
                continue
            f.state = "written"
            self.stats["written_files"] += 1
            self.stats["written_pages"] += len(f.pages)
            self.stats["written_bytes"] += f.nbytes

    def fail(self, f: DiskFile) -> None:
        """A pending file whose pages could not be read back for writing."""
        if f.state == "pending":
            f.state = "bad"
            self.stats["failed_writes"] += 1

    def release(self, name: str, slot: int) -> None:
        """The conversation holding slot lets it go; the file goes with its last slot."""
        f = self.files.get(name)
        if f is not None:
            f.held.discard(slot)
            if not f.held:
                self.remove(f)

    # -- across restarts (and disk_restart.py) -------------------------------------------------

    def _scan(self) -> None:
        """Index the page files an earlier process left (unclaimed), oldest ones dropped past
        the cap; files of another layout are refused (page_file.scan_directory)."""
        found, refused, bad = page_file.scan_directory(self.directory, self.layout)
        self.stats["refused_files"] += refused
        self.stats["bad_files"] += bad
        for name, h, nbytes in found:
            self.add(DiskFile(name, h.conversation_id, h.salt, h.pages, h.tokens, nbytes,
                              h.written, set(), "written"), queue=False)
        while self.used_bytes > self.capacity_bytes and self.drop_unclaimed():
            pass

    # -- bookkeeping --------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def remove(self, f: DiskFile) -> None:
        """Forget f and delete its file."""
        if self.files.pop(f.name, None) is None:
            return
        self.reads.forget(f.name)
        if f.state == "writing" and not self.writes.cancel(f.name):
            self._doomed[f.name] = f.nbytes      # deleted, its bytes freed, when written: poll
            return
        self.used_bytes -= f.nbytes
        if f.state not in ("pending", "writing"):
            self._delete(f.name)

    def _delete(self, name: str) -> None:
        self.writes.delete(self.path(name))

    def report(self) -> dict:
        """Counters, bytes used and files by state."""
        states = {s: 0 for s in ("pending", "writing", "written", "bad")}
        for f in self.files.values():
            states[f.state] += 1
        return dict(self.stats, enabled=self.enabled, capacity_bytes=self.capacity_bytes,
                    used_bytes=self.used_bytes, files=len(self.files), files_by_state=states,
                    unclaimed_files=sum(1 for f in self.files.values() if not f.held),
                    directory=self.directory)
