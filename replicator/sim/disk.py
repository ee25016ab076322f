"""The simulator's storage: files with a page cache, and journals with the ring's contract.

A ``SimFile`` keeps what is durable and the writes made since the last fsync. A
process kill keeps the page cache (every completed write stays). A power loss
keeps what was fsynced, and of each later write, in order, either all of it, a
torn prefix of whole sectors, or nothing (the kernel may or may not have written
it back). Small records the driver writes atomically and durably (management
information, applied pointers, a journal's meta file) are kept whole.

A ``SimJournal`` behaves as journal/ring.py promises: records appended after the
stored one, fsync on sync, discard durable at once, and a recovery that keeps the
longest run of intact records from the discarded pointer (a lost or torn record
ends it). It places records with the same RingSpace the ring uses and refuses an
append that does not fit, which the core must never ask for.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..core.effects import JEntry, Zeros
from ..core.journal_space import RingSpace, record_bytes
from ..core.node import JournalState
from ..errors import IntegrityError, RangeNotStored

SECTOR = 512


class SimFile:
    """One file: durable bytes plus the writes since the last fsync (in order)."""

    def __init__(self, size: int) -> None:
        self.durable = bytearray(size)
        self.current = bytearray(size)
        self.unsynced: list[tuple[int, bytes]] = []
        self.version = 0                 # bumped by every change of ``current``
        self.changes: list[tuple[int, int]] | None = None   # (offset, end) since read, if someone watches

    def write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > len(self.current):
            raise IntegrityError(f"write past the end of a {len(self.current)}-byte file")
        self.current[offset:end] = data
        self.unsynced.append((offset, bytes(data)))
        self.version += 1
        if self.changes is not None:
            self.changes.append((offset, end))

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.current[offset:offset + length])

    def fsync(self) -> None:
        self.durable[:] = self.current
        self.unsynced.clear()

    def power_loss(self, rnd: random.Random) -> int:
        """Drop the page cache; return how many unsynced writes were lost or torn."""
        damaged = 0
        for offset, data in self.unsynced:
            fate = rnd.random()
            if fate < 0.45:
                self.durable[offset:offset + len(data)] = data
            elif fate < 0.6 and len(data) > SECTOR:
                keep = rnd.randrange(1, -(-len(data) // SECTOR)) * SECTOR
                self.durable[offset:offset + keep] = data[:keep]
                damaged += 1
            else:
                damaged += 1
        self.unsynced.clear()
        self.current[:] = self.durable
        self.version += 1
        if self.changes is not None:
            self.changes.append((0, len(self.current)))
        return damaged


@dataclass
class _Record:
    seq: int
    volume: str
    offset: int
    data: bytes | Zeros
    pos: int
    durable: bool = False


@dataclass
class SimJournal:
    """A journal device for one group (SPEC 5.2 layout reduced to what recovery depends on)."""

    capacity: int
    counter: int = 1                 # next seq (durable, as in the meta file)
    discarded: int = 0               # durable
    head: int = 0
    records: list[_Record] = field(default_factory=list)   # live records, seq order
    space: RingSpace = field(init=False)

    def __post_init__(self) -> None:
        self.space = RingSpace(self.capacity, self.head)

    @property
    def stored(self) -> int:
        return self.records[-1].seq if self.records else self.discarded

    def _durable_stored(self) -> int:
        durable = [r.seq for r in self.records if r.durable]
        return durable[-1] if durable else self.discarded

    def append(self, entries: list[JEntry]) -> None:
        for e in entries:
            if e.seq != self.stored + 1:
                raise IntegrityError(f"journal append of seq {e.seq} after {self.stored}")
            size = record_bytes(e.data)
            where = self.space.place(size)
            if where is None:
                raise IntegrityError(f"journal full: the core appended {size} bytes that do not fit "
                                     f"({self.space.used()} of {self.capacity} used)")
            self.space.add(e.seq, where[0], size)
            data = e.data if isinstance(e.data, Zeros) else bytes(e.data)
            self.records.append(_Record(e.seq, e.volume, e.offset, data, where[0]))

    def sync(self) -> None:
        for r in self.records:
            r.durable = True

    def read(self, first: int, last: int) -> list[JEntry]:
        by_seq = {r.seq: r for r in self.records}
        if first <= self.discarded or last > self.stored or first > last:
            raise RangeNotStored(f"journal read {first}..{last}: holds {self.discarded + 1}..{self.stored}")
        return [JEntry(s, by_seq[s].volume, by_seq[s].offset, by_seq[s].data) for s in range(first, last + 1)]

    def discard(self, through: int, counter: int = 0) -> None:
        """Durable at once (the ring fsyncs its meta file before it frees anything)."""
        self.records = [r for r in self.records if r.seq > through]
        self.space.free_through(through)
        # The meta file's counter covers what is durable (numbers nobody else saw may be reused).
        durable = self._durable_stored()
        self.discarded = max(self.discarded, through)
        self.counter = max(self.counter, through + 1, counter, durable + 1)

    def continue_at(self, counter: int, head: int | None) -> None:
        self.counter = counter
        self.discarded = counter - 1
        if head is not None:
            self.head = head % self.capacity
            self.space = RingSpace(self.capacity, self.head)

    def crash(self, rnd: random.Random | None) -> None:
        """A process kill (``rnd`` None: everything written stays) or a power loss."""
        if rnd is None:
            return
        kept: list[_Record] = []
        for r in self.records:
            if not (r.durable or rnd.random() < 0.45):
                break
            kept.append(r)
        self.records = kept
        self.space = RingSpace(self.capacity, self.space.head)
        # Recovery rebuilds the ring from what it found (positions as written).
        self.space.live.clear()
        for r in kept:
            self.space.live.append((r.seq, r.pos, r.pos + record_bytes(r.data)))
        if kept:
            self.space.head = (kept[-1].pos + record_bytes(kept[-1].data)) % self.capacity

    def recovered(self) -> JournalState:
        lost = max(0, self.counter - 1 - self.stored)
        counter = max(self.stored + 1, self.counter)
        st = JournalState(counter=counter, stored=self.stored, discarded=self.discarded,
                          entries=[(r.seq, r.volume, r.offset, len(r.data)) for r in self.records],
                          head=self.space.head, slots=list(self.space.live), capacity_bytes=self.capacity)
        if lost:   # never reuse a number the secondary may hold: fold what was recovered
            st.lost_entries = lost
            st.folded = [(r.volume, r.offset, len(r.data)) for r in self.records]
            self.discard(self.stored, counter)
            st.stored = st.discarded = counter - 1
            st.entries, st.slots, st.head = [], [], self.space.head
        return st
