"""ConversationTable: idle expiry after ttl_s and a cap (least recently used idle first), on a
fake clock; never an entry with a turn in flight."""

import pytest

from serving.router import Conversation, ConversationTable

from .clock import FakeClock


def conv(i) -> Conversation:
    return Conversation(f"c{i}", [], [])


def test_table_expires_idle_entries_after_ttl():
    clock = FakeClock()
    table = ConversationTable(ttl_s=10.0, clock=clock)
    a, b, c = conv(0), conv(1), conv(2)
    table.touch(a.id, a)
    clock.advance(5)
    table.touch(b.id, b)
    table.touch(c.id, c)
    c.busy = True                                   # a turn in flight
    clock.advance(6)                                # a: 11 s idle, b: 6 s
    assert table.is_expired(a) and not table.is_expired(b)
    assert table.expire() == [a] and list(table) == ["c1", "c2"]
    clock.advance(100)
    assert table.expire() == [b] and list(table) == ["c2"]      # c is busy: kept
    c.busy = False
    table.touch(c.id, c)                            # its turn ended: idle from now
    clock.advance(9)
    assert table.expire() == []
    clock.advance(2)
    assert table.expire() == [c] and len(table) == 0
    assert ConversationTable().expire() == []       # no TTL: never
    with pytest.raises(ValueError):
        ConversationTable(ttl_s=0)


def test_table_cap_drops_least_recently_used_idle():
    clock = FakeClock()
    table = ConversationTable(max_entries=2, clock=clock)
    a, b, c, d = (conv(i) for i in range(4))
    for x in (a, b):
        table.touch(x.id, x)
        clock.advance(1)
    table.touch(a.id, a)                            # a used again: b is now the oldest
    table.touch(c.id, c)
    assert table.trim() == [b] and list(table) == ["c0", "c2"]
    a.busy = True                                   # the oldest has a turn in flight
    table.touch(d.id, d)
    assert table.trim() == [c] and list(table) == ["c0", "c3"]
    table.touch(b.id, b)
    assert table.trim() == [d] and list(table) == ["c0", "c1"]   # a still skipped
    unbounded = ConversationTable(max_entries=0)
    for i in range(5):
        unbounded.touch(f"x{i}", conv(i))
    assert unbounded.trim() == [] and len(unbounded) == 5
