"""The disk tier's page file: one chunk of one conversation's KV pages, self-describing and
checksummed, written atomically (temporary file, fsync, rename, fsync of the directory).

    | bytes          | what                                                               |
    |----------------|--------------------------------------------------------------------|
    | 8              | MAGIC                                                              |
    | 4              | header length h (little-endian uint32)                             |
    | h              | header, JSON (below)                                               |
    | 4              | crc32 of the header                                                |
    | data_bytes     | k then v, each [layers, pages, page_size, kv_heads, head_dim], C   |
    | 4              | crc32 of the data                                                  |

Header: {"version", "layout": PageLayout as a dict, "conversation_id", "salt": sha256 of the
cache salt, "pages": page index of each slot in the conversation, "tokens": the token ids each
slot holds KV for, "data_bytes", "written": unix time}. A file whose layout differs from the
reader's (another model, dtype or page shape) raises LayoutMismatch; a torn or corrupted one
PageFileError: the caller treats both as missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
import time
import zlib
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"PJKVPAGE"
VERSION = 1
SUFFIX = ".kvp"
_U32 = struct.Struct("<I")


class PageFileError(ValueError):
    """A page file that cannot be used: torn, corrupted, or not a page file."""


class LayoutMismatch(PageFileError):
    """A page file written for another model or KV page layout."""


@dataclasses.dataclass(frozen=True)
class PageLayout:
    """What a page file's bytes mean: K (or V) of one page is [num_layers, page_size,
    num_kv_heads, head_dim] of dtype; model: a fingerprint of the model that wrote it."""
    dtype: str
    page_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    model: str = ""

    @property
    def page_shape(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.page_size, self.num_kv_heads, self.head_dim)

    @property
    def np_dtype(self) -> np.dtype:
        import jax.numpy as jnp        # bfloat16 and friends are known through jax's ml_dtypes
        return np.dtype(jnp.dtype(self.dtype))

    @property
    def page_bytes(self) -> int:
        """K and V of one page."""
        return 2 * int(np.prod(self.page_shape)) * self.np_dtype.itemsize


class PageFileHeader(NamedTuple):
    conversation_id: str
    salt: str                         # sha256 of the cache salt
    pages: tuple[int, ...]
    tokens: tuple[tuple[int, ...], ...]
    written: float


def salt_digest(salt: str) -> str:
    return hashlib.sha256(salt.encode()).hexdigest()[:32]


def file_name(conversation_id: str, first_page: int, unique: str) -> str:
    """A file name safe for any conversation id (the header holds the id itself)."""
    digest = hashlib.sha256(conversation_id.encode()).hexdigest()[:16]
    return f"{digest}-{first_page:06d}-{unique}{SUFFIX}"


def encode_header(layout: PageLayout, conversation_id: str, salt: str, pages: list[int],
                  tokens: list[list[int]]) -> bytes:
    """MAGIC, length, header and its checksum: everything before the data."""
    data_bytes = len(pages) * layout.page_bytes
    body = json.dumps({"version": VERSION, "layout": dataclasses.asdict(layout),
                       "conversation_id": conversation_id, "salt": salt_digest(salt),
                       "pages": list(pages), "tokens": [list(map(int, t)) for t in tokens],
                       "data_bytes": data_bytes, "written": time.time()}).encode()
    return MAGIC + _U32.pack(len(body)) + body + _U32.pack(zlib.crc32(body))


def file_bytes(header: bytes, layout: PageLayout, num_pages: int) -> int:
    return len(header) + num_pages * layout.page_bytes + _U32.size


def write_atomic(path: str, header: bytes, k: np.ndarray, v: np.ndarray) -> int:
    """Write header + k + v + checksum to path so that a reader sees the whole file or none of
    it (a crash leaves at most a *.tmp file). Returns the bytes written."""
    kb, vb = np.ascontiguousarray(k).tobytes(), np.ascontiguousarray(v).tobytes()
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(kb)
        f.write(vb)
        f.write(_U32.pack(zlib.crc32(vb, zlib.crc32(kb))))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")
    return len(header) + len(kb) + len(vb) + _U32.size


def fsync_dir(directory: str) -> None:
    """Make a rename in directory durable (where the platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _parse_header(raw: bytes, layout: PageLayout, path: str) -> tuple[dict[str, Any], int]:
    if len(raw) < len(MAGIC) + 2 * _U32.size or raw[:len(MAGIC)] != MAGIC:
        raise PageFileError(f"{path}: not a page file (bad magic or too short)")
    (n,) = _U32.unpack_from(raw, len(MAGIC))
    start = len(MAGIC) + _U32.size
    if len(raw) < start + n + _U32.size:
        raise PageFileError(f"{path}: truncated header")
    body = raw[start:start + n]
    if _U32.unpack_from(raw, start + n)[0] != zlib.crc32(body):
        raise PageFileError(f"{path}: header checksum mismatch")
    try:
        head = json.loads(body)
        theirs = PageLayout(**head["layout"])
    except (ValueError, TypeError, KeyError) as e:
        raise PageFileError(f"{path}: unreadable header ({type(e).__name__})") from None
    if head.get("version") != VERSION:
        raise PageFileError(f"{path}: page file version {head.get('version')!r}, "
                            f"this reader knows {VERSION}")
    if theirs != layout:
        differ = [f.name for f in dataclasses.fields(layout)
                  if getattr(theirs, f.name) != getattr(layout, f.name)]
        raise LayoutMismatch(f"{path}: written for another layout (differs in "
                             f"{', '.join(differ)})")
    return head, start + n + _U32.size


def _header_of(head: dict[str, Any]) -> PageFileHeader:
    return PageFileHeader(str(head["conversation_id"]), str(head["salt"]),
                          tuple(int(p) for p in head["pages"]),
                          tuple(tuple(int(t) for t in ts) for ts in head["tokens"]),
                          float(head["written"]))


def read_header(path: str, layout: PageLayout, max_bytes: int = 1 << 24) -> PageFileHeader:
    """The header of a page file (its data is not read, nor checked)."""
    with open(path, "rb") as f:
        prefix = f.read(len(MAGIC) + _U32.size)
        if len(prefix) < len(MAGIC) + _U32.size:
            raise PageFileError(f"{path}: truncated header")
        (n,) = _U32.unpack_from(prefix, len(MAGIC))
        raw = prefix + f.read(min(n, max_bytes) + _U32.size)
    head, _ = _parse_header(raw, layout, path)
    return _header_of(head)


def read_page_file(path: str, layout: PageLayout
                   ) -> tuple[PageFileHeader, np.ndarray, np.ndarray]:
    """Header, k and v [layers, pages, page_size, kv_heads, head_dim] of a page file, every
    checksum verified."""
    with open(path, "rb") as f:
        raw = f.read()
    head, at = _parse_header(raw, layout, path)
    header = _header_of(head)
    data_bytes = len(header.pages) * layout.page_bytes
    if head.get("data_bytes") != data_bytes or len(header.tokens) != len(header.pages):
        raise PageFileError(f"{path}: header does not match its page count")
    if len(raw) != at + data_bytes + _U32.size:
        raise PageFileError(f"{path}: {len(raw)} bytes, expected {at + data_bytes + _U32.size} "
                            "(torn write?)")
    data = memoryview(raw)[at:at + data_bytes]
    if _U32.unpack_from(raw, at + data_bytes)[0] != zlib.crc32(data):
        raise PageFileError(f"{path}: data checksum mismatch")
    shape = (layout.num_layers, len(header.pages), *layout.page_shape[1:])
    arr = np.frombuffer(data, dtype=layout.np_dtype).reshape((2, *shape))
    return header, arr[0].copy(), arr[1].copy()


def scan_directory(directory: str, layout: PageLayout
                   ) -> tuple[list[tuple[str, PageFileHeader, int]], int, int]:
    """The page files of directory: (name, header, bytes) of each one of `layout`, then how
    many were refused (another layout) and how many unreadable (both logged, left alone).
    Temporaries of interrupted writes are removed."""
    found, refused, bad = [], 0, 0
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name.endswith(SUFFIX + ".tmp"):
            os.remove(entry.path)
        elif entry.name.endswith(SUFFIX) and entry.is_file():
            try:
                found.append((entry.name, read_header(entry.path, layout),
                              entry.stat().st_size))
            except (OSError, PageFileError) as e:
                log.warning("disk tier: skipping %s", e)
                refused += isinstance(e, LayoutMismatch)
                bad += not isinstance(e, LayoutMismatch)
    return found, refused, bad
