"""The journal of one consistency group at its primary: a persistent ring (SPEC 5.2, 5.3).

Entries (entry.py) live in one preallocated data file ``NAME.journal`` used as a
circular buffer. The journal management information of SPEC 5.3 (sequence
counter, stored/transferred/applied/discarded pointers, free head/tail) lives in
memory and in ``NAME.meta``. The meta file is rewritten atomically whenever space
is freed. Opening an existing journal scans the ring from the discarded pointer
and stops at the first invalid record. journal/FORMAT.md documents the bytes and
the recovery rules.

Deferred discard (SPEC 5.10): space is freed only by ``mark_applied`` (or
``fold_unapplied``), never by a transfer, so entries after ``applied`` can always
be sent again.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from replicator.core.effects import Zeros
from replicator import pagecache
from replicator.core.journal_space import RingSpace
from replicator.errors import IntegrityError, RangeNotStored, StateError, UsageError

from .entry import (ENTRY, HEADER_SIZE, MAGIC, MAX_DATA_BYTES, U32_MAX, U64_MAX, WRAP, ZERO, CorruptEntry,
                    Entry, Header, decode, decode_header, encode_header, encode_wrap, zero_data, zeroed_length)

log = logging.getLogger(__name__)

META_FORMAT = 1
DEFAULT_CAPACITY_BYTES = 64 << 20
MIN_CAPACITY_BYTES = 256
MAX_CAPACITY_BYTES = 1 << 40
MAX_VOLUMES = 1 << 16


class JournalFull(StateError):
    """No room for an entry in the journal. Nothing was changed: fold and suspend the pair."""


class _Slot(NamedTuple):
    """One live entry in the in-memory index: where its record is, and what it describes."""

    pos: int
    epoch: int
    volume_id: int
    offset: int
    length: int              # data bytes after the header
    span: int                # bytes of the volume it changes (a ZERO record's zeroed length)
    zero: bool = False

    @property
    def end(self) -> int:
        """The byte just after the record (records never span the end of the ring)."""
        return self.pos + HEADER_SIZE + self.length


@dataclass(frozen=True)
class Recovery:
    """What opening the journal found on disk (``Journal.last_recovery``)."""

    entries: int = 0          # live entries found by the scan
    dropped_bytes: int = 0    # bytes of the torn or corrupt record the scan stopped at
    lost_entries: int = 0     # seq numbers the meta file knew as stored but the data file lacks
    folded: tuple[tuple[str, int, int], ...] = ()  # (volume, offset, length) folded because of a loss
    reason: str = "created"   # why the scan stopped


@dataclass(frozen=True)
class _Meta:
    """A validated meta file."""

    capacity: int
    epoch: int
    tail_epoch: int
    counter: int
    stored: int
    transferred: int
    applied: int
    discarded: int
    head: int
    tail: int
    volumes: dict[str, int]


def _parse_meta(raw: Any, where: str) -> _Meta:
    """Check every field of a meta object; raise IntegrityError naming what is wrong."""
    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"journal meta {where} is corrupt: {why}")

    def num(obj: Any, key: str, low: int = 0, high: int = U64_MAX) -> int:
        value = obj.get(key) if isinstance(obj, dict) else None
        if type(value) is not int or not low <= value <= high:
            raise bad(f"{key}={value!r} is not an integer in {low}..{high}")
        return value

    if not isinstance(raw, dict):
        raise bad("not a JSON object")
    if raw.get("format") != META_FORMAT:
        raise bad(f"format {raw.get('format')!r}, expected {META_FORMAT}")
    capacity = num(raw, "capacity_bytes", MIN_CAPACITY_BYTES, MAX_CAPACITY_BYTES)
    seqs, positions = {}, {}
    for key in ("stored", "transferred", "applied", "discarded"):
        seqs[key] = num(raw.get(key), "seq")
        positions[key] = num(raw.get(key), "pos", 0, capacity - 1)
    head = num(raw.get("free"), "head", 0, capacity - 1)
    tail = num(raw.get("free"), "tail", 0, capacity - 1)
    counter = num(raw, "counter", 1)
    if not seqs["discarded"] <= seqs["applied"] <= seqs["transferred"] <= seqs["stored"] < counter:
        raise bad(f"pointers out of order: {seqs}, counter {counter}")
    if positions["discarded"] != tail:
        raise bad(f"discarded.pos {positions['discarded']} != free.tail {tail}")
    volumes = raw.get("volumes")
    if not isinstance(volumes, dict) or not all(
            isinstance(k, str) and k and type(v) is int and 1 <= v <= U32_MAX for k, v in volumes.items()):
        raise bad("volumes is not a table of names to ids")
    if len(set(volumes.values())) != len(volumes):
        raise bad("two volumes share an id")
    return _Meta(capacity, num(raw, "epoch", 0, U32_MAX), num(raw, "tail_epoch", 0, U32_MAX), counter,
                 seqs["stored"], seqs["transferred"], seqs["applied"], seqs["discarded"], head, tail,
                 dict(volumes))


def _pwrite_all(fd: int, buffers: Sequence[bytes | memoryview], pos: int) -> None:
    """Write ``buffers`` back to back at ``pos``, finishing a short write."""
    total = sum(map(len, buffers))
    done = pagecache.pwritev(fd, buffers, pos, total)
    if done < total:  # only on odd filesystems or a full disk; finish with plain pwrites
        rest = memoryview(b"".join(bytes(b) for b in buffers))[done:]
        while rest:
            n = os.pwrite(fd, rest, pos + done)
            if n <= 0:
                raise OSError(errno.EIO, "short write to journal")
            rest, done = rest[n:], done + n


class Journal:
    """A persistent ring of journal entries with the SPEC 5.3 pointers; safe to share between threads.

    ``discarded <= applied <= transferred <= stored < counter`` always holds. In
    this journal ``applied == discarded``, because applying frees at once.
    """

    def __init__(self, directory: Path, name: str, capacity_bytes: int = DEFAULT_CAPACITY_BYTES) -> None:
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise UsageError(f"bad journal name {name!r}")
        if not MIN_CAPACITY_BYTES <= capacity_bytes <= MAX_CAPACITY_BYTES:
            raise UsageError(f"journal capacity {capacity_bytes} bytes is outside "
                             f"{MIN_CAPACITY_BYTES}..{MAX_CAPACITY_BYTES}")
        self.directory = Path(directory)
        self.name = name
        self.data_path = self.directory / f"{name}.journal"
        self.meta_path = self.directory / f"{name}.meta"
        self._tmp_path = self.directory / f"{name}.meta.tmp"
        self._lock = threading.Lock()       # guards every field below
        self._meta_lock = threading.Lock()  # serialises meta rewrites; always taken before _lock
        self._fd = -1
        self._closed = False
        self._capacity = capacity_bytes
        self._epoch = 1
        self._counter = 1
        self._stored = self._transferred = self._applied = self._discarded = 0
        self._space = RingSpace(capacity_bytes)   # free head and tail (the same arithmetic the core uses)
        self._synced = 0                          # every entry up to here has been fdatasynced
        self._meta_counter = 1                    # the counter the meta file says
        self._index: dict[int, _Slot] = {}  # seq -> slot, for discarded+1 .. stored, in order
        self._data_bytes = 0                # data bytes of the live entries
        self._ids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self.directory.mkdir(parents=True, exist_ok=True)
        self._tmp_path.unlink(missing_ok=True)
        self.last_recovery: Recovery
        if self.meta_path.exists():
            self.last_recovery = self._open_existing(capacity_bytes)
        else:
            self._create()
            self.last_recovery = Recovery()

    # ------------------------------------------------------------------ pointers
    @property
    def counter(self) -> int:
        """The next sequence number to assign (the first is 1)."""
        with self._lock:
            return self._counter

    @property
    def stored(self) -> int:
        with self._lock:
            return self._stored

    @property
    def transferred(self) -> int:
        with self._lock:
            return self._transferred

    @property
    def applied(self) -> int:
        with self._lock:
            return self._applied

    @property
    def discarded(self) -> int:
        with self._lock:
            return self._discarded

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        """Bytes of the ring not free: live records plus any end gap they skip."""
        with self._lock:
            return self._used()

    @property
    def pending_entries(self) -> int:
        """Entries stored but not yet applied at the secondary."""
        with self._lock:
            return self._stored - self._applied

    @property
    def pending_bytes(self) -> int:
        """Data bytes of the entries stored but not yet applied."""
        with self._lock:
            return self._data_bytes

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ operations
    def append(self, volume: str, offset: int, data: bytes | memoryview | Zeros) -> int:
        """Store one host write (SPEC 5.6, S2401-S2404), or a zeroing (a ZERO record), and return
        its sequence number. Raises JournalFull, changing nothing, when there is no room.
        """
        return self._append([(volume, offset, data)], None)

    def _append(self, writes: Sequence[tuple[str, int, bytes | memoryview | Zeros]], first_seq: int | None) -> int:
        """Append ``writes`` in order (numbered from ``first_seq`` if given, which must be the
        counter); records that lie back to back go in one pwritev. Returns the last number.
        On an error the records of the failing run and after it are not stored (nothing of them
        stays in memory); JournalFull on the first record changes nothing."""
        prepared = [self._prepare(volume, offset, data) for volume, offset, data in writes]
        with self._lock:
            self._check_first(first_seq)
            if len(prepared) == 1:
                return self._append_one(*prepared[0])
            run: list[bytes | memoryview] = []
            run_slots: list[tuple[int, _Slot, int]] = []
            run_at = run_end = -1
            ring = RingSpace(self._capacity, self._space.head)   # where this append's records go
            if self._space.live:                                  # (only the tail matters)
                ring.live.append(self._space.live[0])
            for volume_id, offset, view, span, zero, size in prepared:
                seq = self._counter + len(run_slots)
                pos, wrap_at = self._place(size, ring)
                ring.add(seq, pos, size)
                if run and (wrap_at is not None or pos != run_end):
                    self._write_run(run, run_at, run_slots)
                    run, run_slots = [], []
                    seq = self._counter
                if wrap_at is not None:
                    _pwrite_all(self._fd, [encode_wrap(seq, epoch=self._epoch)], wrap_at)
                if not run:
                    run_at = pos
                run += (encode_header(seq, volume_id, offset, view, epoch=self._epoch,
                                      type=ZERO if zero else ENTRY), view)
                run_slots.append((seq, _Slot(pos, self._epoch, volume_id, offset, len(view), span, zero), size))
                run_end = pos + size
            if run:
                self._write_run(run, run_at, run_slots)
            return self._stored

    def _prepare(self, volume: str, offset: int,
                 data: bytes | memoryview | Zeros) -> tuple[int, int, memoryview, int, bool, int]:
        """(volume id, offset, record data, span, zero, record bytes) of a write to append."""
        zero = isinstance(data, Zeros)
        view = memoryview(zero_data(len(data)) if zero else data).cast("B")  # type: ignore[arg-type]
        size = HEADER_SIZE + len(view)
        if len(view) > MAX_DATA_BYTES or size > self._capacity:
            raise JournalFull(f"journal {self.name}: an entry of {len(view)} bytes can never fit "
                              f"in {self._capacity} bytes")
        if not 0 <= offset <= U64_MAX:
            raise UsageError(f"journal {self.name}: offset {offset} out of range")
        return self._volume_id(volume, size), offset, view, len(data), zero, size

    def _check_first(self, first_seq: int | None) -> None:
        self._check_open()
        if first_seq is not None and first_seq != self._counter:
            raise IntegrityError(f"journal {self.name}: entry {first_seq} appended where "
                                 f"{self._counter} is next")

    def _append_one(self, volume_id: int, offset: int, view: memoryview, span: int, zero: bool,
                    size: int) -> int:
        """``_append`` of one record (a host write's, the common case), in one pwrite (callers
        hold _lock)."""
        seq = self._counter
        pos, wrap_at = self._place(size)
        if wrap_at is not None:
            _pwrite_all(self._fd, [encode_wrap(seq, epoch=self._epoch)], wrap_at)
        header = encode_header(seq, volume_id, offset, view, epoch=self._epoch, type=ZERO if zero else ENTRY)
        self._write_run([header, view], pos, [(seq, _Slot(pos, self._epoch, volume_id, offset, len(view), span, zero),
                                              size)])
        return seq

    def _write_run(self, run: list[bytes | memoryview], at: int, slots: list[tuple[int, _Slot, int]]) -> None:
        """Write back-to-back records, then count them stored (callers hold _lock)."""
        _pwrite_all(self._fd, run, at)
        for seq, slot, size in slots:
            self._index[seq] = slot
            self._space.add(seq, slot.pos, size)
            self._data_bytes += slot.length
            self._stored = seq
            self._counter = seq + 1

    def read(self, from_seq: int, max_bytes: int = 4 << 20, max_entries: int = 1024) -> list[Entry]:
        """Stored entries from ``from_seq`` upward, read from the data file (SPEC 5.8, 5.11).

        Returns at most ``max_entries`` entries and ``max_bytes`` data bytes, but
        always at least one. Raises RangeNotStored, with no side effect, if
        ``from_seq`` is above ``stored`` or already discarded (SPEC invariant 27).
        """
        if max_entries < 1 or max_bytes < 0:
            raise UsageError(f"journal read limits must be positive: {max_bytes} bytes, {max_entries} entries")
        with self._lock:
            self._check_open()
            if not self._discarded < from_seq <= self._stored:
                raise RangeNotStored(self._not_stored(from_seq))
            picked: list[tuple[int, _Slot]] = []
            total = 0
            for seq in range(from_seq, min(self._stored, from_seq + max_entries - 1) + 1):
                slot = self._index[seq]
                if picked and total + slot.length > max_bytes:
                    break
                picked.append((seq, slot))
                total += slot.length
        # Read outside the lock so host writes are not held up. A concurrent discard
        # may let a slot be overwritten meanwhile. The seq and crc checks catch it.
        return self._load(picked)

    def mark_transferred(self, seq: int) -> None:
        """Record that entries up to ``seq`` were sent (SPEC 5.10 S2801); monotone, clamped to stored."""
        with self._lock:
            self._check_open()
            self._transferred = max(self._transferred, min(seq, self._stored))

    def mark_applied(self, seq: int) -> None:
        """Record that the secondary applied up to ``seq``, then discard and free those entries (Fig. 30).

        Monotone, clamped to stored. The meta file is durable before the space is reused.
        """
        with self._meta_lock:
            with self._lock:
                self._check_open()
                target = min(seq, self._stored)
                if target <= self._applied:
                    return
                meta = self._snapshot(discarded=target)
            self._write_meta(meta)  # appends may go on meanwhile; they cannot reach the space yet
            with self._lock:
                self._discard_through(target)

    def unapplied_extents(self) -> list[tuple[str, int, int]]:
        """(volume, offset, length) of every entry not yet applied, changing nothing.

        A caller folding the journal marks these in its bitmaps first, then calls
        ``fold_unapplied``: a crash in between loses no dirty region.
        """
        with self._lock:
            self._check_open()
            return [(self._names[s.volume_id], s.offset, s.span)
                    for seq, s in self._index.items() if seq > self._applied]

    def fold_unapplied(self) -> list[tuple[str, int, int]]:
        """Discard every unapplied entry and return its (volume, offset, length).

        For a full journal: the caller marks these in the differential bitmap and
        suspends. The counter keeps counting.
        """
        with self._meta_lock, self._lock:
            self._check_open()
            folded = [(self._names[s.volume_id], s.offset, s.span)
                      for seq, s in self._index.items() if seq > self._applied]
            if self._stored > self._discarded:
                self._write_meta(self._snapshot(discarded=self._stored))
                self._discard_through(self._stored)
            if folded:
                log.info("journal %s: folded %d unapplied entries, counter stays %d",
                         self.name, len(folded), self._counter)
            return folded

    def meta(self) -> dict[str, Any]:
        """A JSON-safe snapshot of the journal management information (SPEC 5.3), for S906."""
        with self._lock:
            return self._snapshot(counter=self._counter)

    def adopt(self, meta: dict[str, Any]) -> None:
        """Continue another journal's counter and address space (SPEC 5.6, 5.12, invariant 25).

        Only on a journal that holds no entries. The next append gets seq
        ``meta["counter"]``. If the capacities match, it goes at the old free head.
        """
        m = _parse_meta(meta, "handed over for adoption")
        with self._meta_lock, self._lock:
            self._check_open()
            if self._index:
                raise StateError(f"journal {self.name} holds entries {self._discarded + 1}..{self._stored}; "
                                 "only an empty journal can adopt another's counter")
            if m.counter < self._counter:
                raise StateError(f"journal {self.name}: adopting counter {m.counter} would move "
                                 f"its counter back from {self._counter}")
            head = self._space.head
            if m.capacity == self._capacity:
                head = m.head
            else:
                log.warning("journal %s: capacity %d differs from the adopted journal's %d; "
                            "continuing the counter but not the byte positions",
                            self.name, self._capacity, m.capacity)
            self._write_meta(self._snapshot(counter=m.counter, discarded=m.counter - 1, head=head))
            self._counter = m.counter
            self._stored = self._transferred = self._applied = self._discarded = m.counter - 1
            self._synced = m.counter - 1
            self._space = RingSpace(self._capacity, head)

    # ------------------------------------------------------------------ what the node's core asks for
    def append_numbered(self, entries: Sequence[Any]) -> None:
        """Append entries the core numbered (``seq``, ``volume``, ``offset``, ``data``), in order."""
        for i in range(1, len(entries)):
            if entries[i].seq != entries[i - 1].seq + 1:
                raise IntegrityError(f"journal {self.name}: entries {entries[i - 1].seq} and {entries[i].seq} "
                                     f"are not consecutive")
        if entries:
            self._append([(e.volume, e.offset, e.data) for e in entries], entries[0].seq)

    def discard(self, through: int) -> None:
        """Free every entry up to ``through`` durably; beyond the last stored one (a fold of entries
        whose append failed), also continue numbering after it."""
        if through <= self.stored:
            self.mark_applied(through)
            return
        with self._meta_lock, self._lock:
            self._check_open()
            counter = max(self._counter, through + 1)
            self._write_meta(self._snapshot(counter=counter, discarded=through, head=self._space.head))
            if self._stored > self._discarded:
                self._discard_through(self._stored)
            self._counter = counter
            self._stored = self._transferred = self._applied = self._discarded = through
            self._synced = max(self._synced, through)

    def continue_from(self, counter: int, head: int | None) -> None:
        """A new, empty journal numbers from ``counter`` (a handover, SPEC 5.6), at byte ``head``."""
        with self._meta_lock, self._lock:
            self._check_open()
            if self._index:
                raise StateError(f"journal {self.name} is not empty")
            if head is not None:
                self._space = RingSpace(self._capacity, head)
            self._write_meta(self._snapshot(counter=counter, discarded=counter - 1, head=self._space.head))
            self._counter = counter
            self._stored = self._transferred = self._applied = self._discarded = self._synced = counter - 1

    def state(self) -> dict[str, Any]:
        """What recovery found, for the node's core: pointers, live entries, their places in the ring."""
        with self._lock:
            rec = self.last_recovery
            return {"counter": self._counter, "stored": self._stored, "discarded": self._discarded,
                    "entries": [(q, self._names[x.volume_id], x.offset, x.span) for q, x in self._index.items()],
                    "head": self._space.head, "slots": list(self._space.live), "capacity_bytes": self._capacity,
                    "lost_entries": rec.lost_entries, "folded": list(rec.folded)}

    def sync(self) -> None:
        """Make every appended entry durable (NBD flush / FUA)."""
        with self._lock:
            self._check_open()
            fd, covered = self._fd, self._stored
        os.fdatasync(fd)
        with self._lock:
            self._synced = max(self._synced, covered)

    def close(self) -> None:
        """Sync, write a fresh meta file and close. Safe to call twice."""
        with self._meta_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                os.fdatasync(self._fd)
                self._synced = self._stored
                self._write_meta(self._snapshot())
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Journal {self.name} counter={self._counter} stored={self._stored} "
                f"transferred={self._transferred} applied={self._applied} discarded={self._discarded} "
                f"used={self._used()}/{self._capacity}>")

    # ------------------------------------------------------------------ space (callers hold _lock)
    def _used(self) -> int:
        return self._space.used()

    def _place(self, size: int, ring: RingSpace | None = None) -> tuple[int, int | None]:
        """Where a record of ``size`` bytes goes, and where its wrap marker goes (if any).

        The record takes bytes from the free head onward (of ``ring``: the journal's space with
        the records of an append in progress). It never reaches a live entry. Raises JournalFull.
        """
        where = (ring or self._space).place(size)
        if where is None:
            free = self._capacity - self._used()
            raise JournalFull(f"journal {self.name} is full: {size} bytes needed, {free} of {self._capacity} "
                              f"free, {self._stored - self._applied} entries waiting to be applied")
        return where

    def _discard_through(self, seq: int) -> None:
        """Free entries up to ``seq`` in memory. The meta file must already say so."""
        for s in range(self._discarded + 1, seq + 1):
            self._data_bytes -= self._index.pop(s).length
        self._discarded = seq
        self._applied = max(self._applied, seq)
        self._transferred = max(self._transferred, seq)
        self._space.free_through(seq)

    def _check_open(self) -> None:
        if self._closed:
            raise StateError(f"journal {self.name} is closed")

    def _not_stored(self, from_seq: int) -> str:
        return (f"requested range not stored: seq {from_seq} of journal {self.name} "
                f"(it holds {self._discarded + 1}..{self._stored})")

    def _volume_id(self, volume: str, size: int) -> int:
        """The id of ``volume``; a new name is written to the meta file before its first entry."""
        volume_id = self._ids.get(volume)
        if volume_id is not None:
            return volume_id
        if not isinstance(volume, str) or not volume:
            raise UsageError(f"bad volume name {volume!r}")
        with self._meta_lock, self._lock:
            self._check_open()
            volume_id = self._ids.get(volume)
            if volume_id is None:
                self._place(size)  # a full journal raises before the table changes
                if len(self._ids) >= MAX_VOLUMES:
                    raise StateError(f"journal {self.name} already names {MAX_VOLUMES} volumes")
                volume_id = max(self._names, default=0) + 1
                self._ids[volume], self._names[volume_id] = volume_id, volume
                try:
                    self._write_meta(self._snapshot())
                except BaseException:
                    del self._ids[volume], self._names[volume_id]
                    raise
            return volume_id

    # ------------------------------------------------------------------ reading records
    def _load(self, picked: list[tuple[int, _Slot]]) -> list[Entry]:
        """Read and verify the records of ``picked``, one pread per back-to-back run."""
        out: list[Entry] = []
        i = 0
        while i < len(picked):
            j = i + 1
            while j < len(picked) and picked[j][1].pos == picked[j - 1][1].end:
                j += 1
            start = picked[i][1].pos
            buf = memoryview(os.pread(self._fd, picked[j - 1][1].end - start, start))
            for seq, slot in picked[i:j]:
                rel = slot.pos - start
                try:
                    header, data = decode(buf[rel:rel + HEADER_SIZE + slot.length])
                    got = (header.type, header.seq, header.epoch, header.volume_id, header.offset, header.length)
                    want = (ZERO if slot.zero else ENTRY, seq, slot.epoch, slot.volume_id, slot.offset, slot.length)
                    problem = "" if got == want else f"record {got} where {want} was expected"
                except CorruptEntry as exc:
                    problem = str(exc)
                if problem:
                    with self._lock:
                        discarded_meanwhile = seq <= self._discarded
                    if not discarded_meanwhile:
                        raise CorruptEntry(f"journal {self.name}: entry {seq} at byte {slot.pos}: {problem}")
                    if out:
                        return out
                    raise RangeNotStored(self._not_stored(seq))
                out.append(Entry(seq, self._names[slot.volume_id], slot.offset,
                                 Zeros(slot.span) if slot.zero else data))
            i = j
        return out

    # ------------------------------------------------------------------ meta file
    def _snapshot(self, *, counter: int | None = None, discarded: int | None = None,
                  head: int | None = None) -> dict[str, Any]:
        """The meta object for the current state, or for it with the given changes applied."""
        discarded = self._discarded if discarded is None else discarded
        if counter is None:
            # Numbers of entries never synced were never sent: after a power loss they may be used
            # again. The file's counter covers what is durable (and never goes back).
            counter = max(self._meta_counter, min(self._synced, self._stored) + 1, discarded + 1)
        head = self._space.head if head is None else head
        top = counter - 1                 # the file names no entry above its counter
        applied = min(max(self._applied, discarded), top)
        transferred = min(max(self._transferred, applied), top)
        stored = min(max(self._stored, transferred), top)
        nxt = self._index.get(discarded + 1)
        tail = nxt.pos if nxt is not None else head

        def after(seq: int) -> int:
            return tail if seq <= discarded else self._index[seq].end % self._capacity

        return {
            "format": META_FORMAT, "name": self.name, "capacity_bytes": self._capacity,
            "epoch": self._epoch, "tail_epoch": nxt.epoch if nxt is not None else self._epoch,
            "counter": counter,
            "stored": {"seq": stored, "pos": after(stored)},
            "transferred": {"seq": transferred, "pos": after(transferred)},
            "applied": {"seq": applied, "pos": after(applied)},
            "discarded": {"seq": discarded, "pos": tail},
            "free": {"head": head, "tail": tail},
            "volumes": dict(self._ids),
        }

    def _write_meta(self, meta: dict[str, Any]) -> None:
        """Replace the meta file atomically and durably: temp file, fsync, rename, fsync directory."""
        self._meta_counter = max(self._meta_counter, int(meta["counter"]))
        data = memoryview((json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
        fd = os.open(self._tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self._tmp_path, self.meta_path)
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _load_meta(self) -> _Meta:
        try:
            raw = json.loads(self.meta_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise IntegrityError(
                f"journal meta {self.meta_path} is unreadable or not JSON ({exc}); restore it, or delete "
                f"{self.meta_path.name} and {self.data_path.name} to start an empty journal and resync") from None
        return _parse_meta(raw, str(self.meta_path))

    # ------------------------------------------------------------------ create and recover
    def _create(self) -> None:
        fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, 0)  # a data file without a meta file never held an acknowledged entry
            try:
                os.posix_fallocate(fd, 0, self._capacity)
            except OSError:
                os.ftruncate(fd, self._capacity)
            os.fsync(fd)
            self._fd = fd
            self._write_meta(self._snapshot())
        except BaseException:
            os.close(fd)
            self._fd = -1
            raise
        log.info("journal %s: created, %d bytes", self.name, self._capacity)

    def _open_existing(self, requested_capacity: int) -> Recovery:
        meta = self._load_meta()
        if meta.capacity != requested_capacity:
            log.info("journal %s: keeping its capacity of %d bytes (asked for %d)",
                     self.name, meta.capacity, requested_capacity)
        self._capacity = meta.capacity
        try:
            fd = os.open(self.data_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise IntegrityError(f"journal {self.name}: {self.meta_path} exists but the data file "
                                 f"{self.data_path} is missing") from None
        try:
            size = os.fstat(fd).st_size
            if size < meta.capacity:
                log.warning("journal %s: data file is %d bytes, expected %d; extending it",
                            self.name, size, meta.capacity)
                os.ftruncate(fd, meta.capacity)
            self._fd = fd
            self._ids = dict(meta.volumes)
            self._names = {v: k for k, v in meta.volumes.items()}
            return self._recover(meta)
        except BaseException:
            os.close(fd)
            self._fd = -1
            raise

    def _probe(self, at: int, expected: int, min_epoch: int, allow_wrap: bool) -> tuple[Header | None, int, str]:
        """Check the record at ``at``: (header, 0, "") if it continues the chain, else (None, dropped, why)."""
        raw = os.pread(self._fd, HEADER_SIZE, at)
        try:
            header = decode_header(raw)
        except CorruptEntry as exc:
            if raw[:len(MAGIC)] == MAGIC:
                return None, HEADER_SIZE, f"corrupt header at byte {at}: {exc}"
            return None, 0, "end of journal"
        if header.seq != expected or header.epoch < min_epoch:
            return None, 0, "end of journal"  # zeros, an older lap, or a tail dropped by an earlier recovery
        if header.type == WRAP and not allow_wrap:
            return None, HEADER_SIZE, f"misplaced wrap marker for seq {expected} at byte {at}"
        size = header.record_bytes
        if at + size > self._capacity:
            return None, self._capacity - at, f"entry {expected} at byte {at} runs past the end of the ring"
        try:
            decode(raw if size == HEADER_SIZE else os.pread(self._fd, size, at))
        except CorruptEntry as exc:
            return None, size, f"entry {expected} at byte {at} is torn or corrupt: {exc}"
        if header.type != WRAP and header.volume_id not in self._names:
            return None, size, f"entry {expected} at byte {at} names unknown volume id {header.volume_id}"
        return header, 0, ""

    def _recover(self, meta: _Meta) -> Recovery:
        """Scan the ring from the discarded pointer and rebuild the index and pointers (FORMAT.md)."""
        cap = self._capacity
        index: dict[int, _Slot] = {}
        expected, min_epoch = meta.discarded + 1, meta.tail_epoch
        pos, consumed = meta.tail, 0
        while True:
            at = pos if cap - pos >= HEADER_SIZE else 0
            header, dropped, reason = self._probe(at, expected, min_epoch, allow_wrap=at != 0)
            if header is not None and header.type == WRAP:
                at, min_epoch = 0, header.epoch
                header, dropped, reason = self._probe(0, expected, min_epoch, allow_wrap=False)
            if header is None:
                break
            step = header.record_bytes + (0 if at == pos or not index else cap - pos)
            if consumed + step > cap:
                dropped, reason = 0, "the scan went round the whole ring"
                break
            consumed += step
            zero = header.type == ZERO
            span = zeroed_length(os.pread(self._fd, header.length, at + HEADER_SIZE)) if zero else header.length
            index[expected] = _Slot(at, header.epoch, header.volume_id, header.offset, header.length, span, zero)
            expected, min_epoch = expected + 1, header.epoch
            pos = (at + header.record_bytes) % cap

        stored, found = expected - 1, len(index)
        self._index = index
        self._data_bytes = sum(s.length for s in index.values())
        self._space = RingSpace(cap, pos)
        for seq, slot in index.items():
            self._space.live.append((seq, slot.pos, slot.end))
        self._meta_counter = meta.counter
        self._counter = max(stored + 1, meta.counter)
        self._stored = stored
        self._discarded = self._applied = self._transferred = meta.discarded  # entries after it are resent
        self._epoch = max([meta.epoch, meta.tail_epoch] + [s.epoch for s in index.values()]) + 1
        if self._epoch > U32_MAX:
            raise IntegrityError(f"journal {self.name}: epoch counter exhausted")
        if dropped:
            log.warning("journal %s: recovery stopped before seq %d and dropped %d bytes: %s",
                        self.name, expected, dropped, reason)
        lost = self._counter - 1 - stored
        folded: tuple[tuple[str, int, int], ...] = ()
        if lost:
            # Never reuse a number the secondary may hold: keep the counter, fold what is left.
            folded = tuple((self._names[s.volume_id], s.offset, s.length) for s in index.values())
            log.error("journal %s: %d entries (seq %d..%d) the meta file knew as stored are gone; "
                      "folding the %d recovered entries, the pair needs a resync",
                      self.name, lost, stored + 1, self._counter - 1, len(folded))
            self._discard_through(stored)
            self._stored = self._transferred = self._applied = self._discarded = self._counter - 1
        self._write_meta(self._snapshot())
        log.info("journal %s: recovered %d entries after seq %d, counter %d",
                 self.name, found, meta.discarded, self._counter)
        return Recovery(found, dropped, lost, folded, reason)
