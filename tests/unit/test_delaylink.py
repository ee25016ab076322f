"""The WAN delay line's queue (replicator/delaylink.DelayLine): pure logic, no devices."""
from __future__ import annotations

from replicator.delaylink import DelayLine


def test_a_packet_is_due_after_the_delay() -> None:
    line = DelayLine(delay_s=0.02)
    assert line.push(b"p1", now=10.0)
    assert line.pop_due(10.019) == []
    assert line.next_due() == 10.02
    assert line.pop_due(10.02) == [b"p1"]
    assert line.next_due() is None and line.bytes == 0


def test_packets_keep_their_order_when_the_delay_shrinks() -> None:
    line = DelayLine(delay_s=0.1)
    line.push(b"early", now=0.0)
    line.delay_s = 0.0
    line.push(b"late", now=0.01)          # would be due at once, but must not overtake
    assert line.pop_due(0.05) == []
    assert line.pop_due(0.1) == [b"early", b"late"]


def test_a_full_buffer_drops_instead_of_growing() -> None:
    line = DelayLine(delay_s=1.0, max_bytes=10)
    assert line.push(b"x" * 6, now=0.0)
    assert not line.push(b"y" * 6, now=0.0)
    assert line.dropped == 1 and line.bytes == 6
    assert line.push(b"z" * 4, now=0.0)
