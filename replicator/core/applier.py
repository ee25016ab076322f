"""Ordered apply at the secondary (SPEC 2.7 formalization, 5.9 apply; invariants 12, 13, 18).

Entries arrive with sequence numbers, possibly out of order and from two sources
(V1 and V2 during a migration). ``OrderedApplier`` buffers them and hands out only
the contiguous run that starts right after the last applied number, so the
secondary is always a write-order-consistent prefix. No I/O: the caller applies
the returned entries and then calls ``applied()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..errors import StateError

T = TypeVar("T")


@dataclass
class OrderedApplier(Generic[T]):
    """Reorder buffer keyed by sequence number, bounded in bytes."""

    last_applied: int = 0
    buffer_bytes_max: int = 256 << 20
    stop_before_highest: bool = False  # Fig. 27 policy: apply up to one less than the run's end
    _buffer: dict[int, tuple[T, int]] = field(default_factory=dict)
    buffered_bytes: int = 0
    highest_received: int = 0

    def offer(self, seq: int, item: T, nbytes: int) -> bool:
        """Buffer one entry; False if it was a duplicate or already applied (ignored)."""
        if seq <= self.last_applied or seq in self._buffer:
            return False
        if self.buffered_bytes + nbytes > self.buffer_bytes_max and seq != self.last_applied + 1:
            raise StateError(f"reorder buffer full ({self.buffered_bytes} bytes)")
        self._buffer[seq] = (item, nbytes)
        self.buffered_bytes += nbytes
        self.highest_received = max(self.highest_received, seq)
        return True

    def ready(self, limit: int = 1 << 30) -> list[tuple[int, T]]:
        """The contiguous run after ``last_applied`` (removed from the buffer), oldest first."""
        run: list[tuple[int, T]] = []
        seq = self.last_applied + 1
        while seq in self._buffer and len(run) < limit:
            run.append((seq, self._buffer[seq][0]))
            seq += 1
        if self.stop_before_highest and run and seq not in self._buffer:
            run.pop()
        for s, _ in run:
            self.buffered_bytes -= self._buffer.pop(s)[1]
        return run

    def applied(self, seq: int) -> None:
        """Record that everything up to ``seq`` is applied (never moves backwards)."""
        if seq < self.last_applied:
            raise StateError(f"applied pointer cannot move back from {self.last_applied} to {seq}")
        self.last_applied = seq

    def reset(self, last_applied: int) -> None:
        """Drop everything buffered and restart after ``last_applied`` (a resync barrier)."""
        self._buffer.clear()
        self.buffered_bytes = 0
        self.last_applied = last_applied
        self.highest_received = last_applied

    @property
    def waiting(self) -> int:
        """Entries received but not yet applicable (a gap before them)."""
        return len(self._buffer)

    def peek_run(self, bytes_max: int) -> list[tuple[int, T]]:
        """The contiguous run after ``last_applied`` (left in the buffer), at most ``bytes_max``
        data bytes but at least one entry; honours the Fig. 27 policy."""
        run: list[tuple[int, T]] = []
        seq, total = self.last_applied + 1, 0
        while seq in self._buffer:
            item, nbytes = self._buffer[seq]
            if run and total + nbytes > bytes_max:
                break
            run.append((seq, item))
            total += nbytes
            seq += 1
        if self.stop_before_highest and run and seq not in self._buffer:
            run.pop()
        return run

    def drop_through(self, seq: int) -> None:
        """Remove buffered entries up to ``seq`` (they were applied)."""
        for s in range(self.last_applied + 1, seq + 1):
            entry = self._buffer.pop(s, None)
            if entry is not None:
                self.buffered_bytes -= entry[1]
