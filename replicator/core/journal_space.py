"""Where records go in a journal's ring (SPEC 5.3 free-journal info), as arithmetic only.

The journal's data file is a circular buffer over ``[0, capacity)``. Live
records, oldest first, occupy ``[tail, head)`` going round; a record never spans
the end of the ring, so one that does not fit in the space left at the end skips
it (the gap stays in use until the record before it is freed). journal/ring.py
places its records with this class, and the core keeps a copy of it to know,
before it asks, that an append will fit.
"""
from __future__ import annotations

from collections import deque

from .effects import Zeros

RECORD_HEADER_BYTES = 40   # journal/entry.py HEADER_SIZE (a unit test checks they agree)
ZERO_RECORD_DATA_BYTES = 8  # a ZERO record carries only its length (journal/entry.py)


def record_bytes(data: "bytes | memoryview | Zeros") -> int:
    """Bytes a record of ``data`` (a write's, or a zeroing) takes in the ring."""
    return RECORD_HEADER_BYTES + (ZERO_RECORD_DATA_BYTES if isinstance(data, Zeros) else len(data))


class RingSpace:
    """Free head, free tail and the live records of a ring of ``capacity`` bytes."""

    def __init__(self, capacity: int, head: int = 0) -> None:
        self.capacity = capacity
        self.head = head % capacity if capacity else 0
        self.live: deque[tuple[int, int, int]] = deque()   # (seq, pos, end), oldest first

    @property
    def tail(self) -> int:
        return self.live[0][1] if self.live else self.head

    def used(self) -> int:
        """Bytes not free: live records plus an end gap they skip."""
        if not self.live:
            return 0
        return (self.head - self.tail) % self.capacity or self.capacity

    def place(self, size: int) -> tuple[int, int | None] | None:
        """(position, wrap-marker position or None) for a record of ``size`` bytes; None if full."""
        return _place(self.capacity, self.head, self.tail, bool(self.live), size)

    def add(self, seq: int, pos: int, size: int) -> None:
        """A record of ``size`` bytes was placed at ``pos`` (from ``place``)."""
        self.live.append((seq, pos, pos + size))
        self.head = (pos + size) % self.capacity

    def free_through(self, seq: int) -> None:
        """Records up to ``seq`` are discarded (durably): their space may be reused."""
        while self.live and self.live[0][0] <= seq:
            self.live.popleft()

    def fits(self, sizes: list[int]) -> int:
        """How many of the records ``sizes`` (in order) would fit, without placing them."""
        head, tail, live = self.head, self.tail, bool(self.live)
        n = 0
        for size in sizes:
            where = _place(self.capacity, head, tail, live, size)
            if where is None:
                break
            if not live:
                tail, live = where[0], True
            head = (where[0] + size) % self.capacity
            n += 1
        return n


def _place(capacity: int, head: int, tail: int, live: bool, size: int) -> tuple[int, int | None] | None:
    """RingSpace.place for a ring whose live records (if ``live``) span [tail, head)."""
    if size > capacity:
        return None
    free = capacity - (((head - tail) % capacity or capacity) if live else 0)
    end_room = capacity - head
    if size <= end_room:
        return (head, None) if size <= free else None
    if not live or end_room + size <= free:     # skip the end gap, continue at 0
        return 0, (head if end_room >= RECORD_HEADER_BYTES else None)
    return None
