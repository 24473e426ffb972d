"""The disk tier's page file: round trip, checksums, torn writes and layouts it must refuse."""

import dataclasses
import os

import numpy as np
import pytest

from pensieve_jax.kvcache import page_file
from pensieve_jax.kvcache.page_file import LayoutMismatch, PageFileError, PageLayout

LAYOUT = PageLayout("float32", 4, 2, 2, 8, "model-a")


def pages(n, seed=0, layout=LAYOUT):
    rng = np.random.default_rng(seed)
    shape = (layout.num_layers, n, *layout.page_shape[1:])
    return (rng.standard_normal(shape).astype(layout.np_dtype),
            rng.standard_normal(shape).astype(layout.np_dtype))


def write(tmp_path, n=2, layout=LAYOUT, name="a.kvp"):
    k, v = pages(n, layout=layout)
    header = page_file.encode_header(layout, "conv/ü 1", "salt", list(range(3, 3 + n)),
                                     [[1, 2, 3, 4]] * (n - 1) + [[5, 6]])
    path = str(tmp_path / name)
    nbytes = page_file.write_atomic(path, header, k, v)
    assert nbytes == os.path.getsize(path) == page_file.file_bytes(header, layout, n)
    return path, k, v


def test_round_trip_keeps_pages_ids_and_tokens(tmp_path):
    path, k, v = write(tmp_path)
    header, k2, v2 = page_file.read_page_file(path, LAYOUT)
    assert np.array_equal(k, k2) and np.array_equal(v, v2)
    assert header.conversation_id == "conv/ü 1" and header.pages == (3, 4)
    assert header.tokens == ((1, 2, 3, 4), (5, 6))
    assert header.salt == page_file.salt_digest("salt") != "salt"
    assert page_file.read_header(path, LAYOUT) == header
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_bfloat16_round_trip(tmp_path):
    layout = dataclasses.replace(LAYOUT, dtype="bfloat16")
    path, k, v = write(tmp_path, layout=layout)
    _, k2, _ = page_file.read_page_file(path, layout)
    assert k2.dtype == layout.np_dtype and np.array_equal(k.view(np.uint16), k2.view(np.uint16))


@pytest.mark.parametrize("damage", ["truncate_data", "truncate_header", "flip_data",
                                    "flip_header", "empty", "garbage"])
def test_damaged_files_are_refused(tmp_path, damage):
    path, _, _ = write(tmp_path)
    raw = bytearray(open(path, "rb").read())
    if damage == "truncate_data":
        raw = raw[:-10]
    elif damage == "truncate_header":
        raw = raw[:20]
    elif damage == "flip_data":
        raw[-100] ^= 0x01
    elif damage == "flip_header":
        raw[30] ^= 0x01
    elif damage == "empty":
        raw = b""
    else:
        raw = b"not a page file at all" * 10
    open(path, "wb").write(bytes(raw))
    with pytest.raises(PageFileError):
        page_file.read_page_file(path, LAYOUT)


@pytest.mark.parametrize("field,value", [("dtype", "bfloat16"), ("page_size", 8),
                                         ("num_layers", 3), ("num_kv_heads", 1),
                                         ("head_dim", 16), ("model", "model-b")])
def test_a_file_of_another_layout_is_refused_naming_what_differs(tmp_path, field, value):
    path, _, _ = write(tmp_path)
    other = dataclasses.replace(LAYOUT, **{field: value})
    with pytest.raises(LayoutMismatch, match=field):
        page_file.read_page_file(path, other)
    with pytest.raises(LayoutMismatch, match=field):
        page_file.read_header(path, other)


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path, k, _ = write(tmp_path)

    def fail(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", fail)
    header = page_file.encode_header(LAYOUT, "x", "", [0, 1], [[1], [2]])
    with pytest.raises(OSError):
        page_file.write_atomic(path, header, k * 0, k * 0)
    monkeypatch.undo()
    _, k2, _ = page_file.read_page_file(path, LAYOUT)      # the old contents, intact
    assert np.array_equal(k, k2)


def test_file_names_are_safe_for_any_conversation_id():
    name = page_file.file_name("../../etc/passwd\x00", 12, "abcd")
    assert "/" not in name and "\x00" not in name and name.endswith("-000012-abcd.kvp")
