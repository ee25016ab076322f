"""The journal ring (journal/ring.py): API, pointers, space, reopen, fold, adopt, threads (SPEC 5.2, 5.3)."""
from __future__ import annotations

import json
import random
import threading
import zlib
from pathlib import Path

import pytest

from journal import Entry, Journal, JournalFull
from journal.entry import HEADER_SIZE, decode
from replicator.errors import IntegrityError, RangeNotStored, StateError, UsageError

REC = HEADER_SIZE + 100  # record size of a 100-byte entry


def pointers(j: Journal) -> tuple[int, ...]:
    return (j.counter, j.stored, j.transferred, j.applied, j.discarded, j.used_bytes, j.pending_bytes)


def check_invariants(j: Journal) -> None:
    assert j.discarded <= j.applied <= j.transferred <= j.stored < j.counter
    assert j.pending_entries == j.stored - j.applied
    assert 0 <= j.used_bytes <= j.capacity_bytes


@pytest.fixture
def journal(tmp_path: Path):
    j = Journal(tmp_path, "g1", 4096)
    yield j
    j.close()


# ---------------------------------------------------------------- basics
def test_new_journal_is_empty(journal: Journal, tmp_path: Path):
    assert (journal.counter, journal.stored, journal.applied, journal.discarded) == (1, 0, 0, 0)
    assert journal.used_bytes == journal.pending_bytes == journal.pending_entries == 0
    assert (tmp_path / "g1.journal").stat().st_size == 4096
    assert json.loads((tmp_path / "g1.meta").read_text())["counter"] == 1


def test_append_read_round_trip(journal: Journal):
    assert journal.append("v1", 4096, b"a" * 100) == 1
    assert journal.append("v2", 0, b"") == 2
    assert journal.append("v1", 1 << 40, bytearray(b"c" * 7)) == 3
    assert (journal.counter, journal.stored) == (4, 3)
    assert journal.read(1) == [Entry(1, "v1", 4096, b"a" * 100), Entry(2, "v2", 0, b""),
                               Entry(3, "v1", 1 << 40, b"c" * 7)]
    assert journal.read(3) == [Entry(3, "v1", 1 << 40, b"c" * 7)]
    assert journal.pending_entries == 3 and journal.pending_bytes == 107
    assert journal.used_bytes == 3 * HEADER_SIZE + 107


def test_records_keep_zlibs_crc32_and_reads_are_views_of_one_read(journal: Journal, tmp_path: Path):
    """The accelerated CRC-32 is zlib's (journals written before it still verify), and a read
    hands out views of the bytes it read, not copies."""
    journal.append("v", 0, b"a" * 2000)
    journal.append("v", 8192, b"b" * 300)
    raw = (tmp_path / "g1.journal").read_bytes()
    assert int.from_bytes(raw[HEADER_SIZE - 4:HEADER_SIZE], "little") == \
        zlib.crc32(b"a" * 2000, zlib.crc32(raw[:HEADER_SIZE - 4]))
    got = journal.read(1)
    assert [bytes(e.data) for e in got] == [b"a" * 2000, b"b" * 300]
    assert all(isinstance(e.data, memoryview) for e in got)
    assert got[0].data.obj is got[1].data.obj          # one pread for the back-to-back records


def test_read_limits(journal: Journal):
    for i in range(10):
        journal.append("v", i, bytes(100))
    assert [e.seq for e in journal.read(2, max_entries=3)] == [2, 3, 4]
    assert [e.seq for e in journal.read(2, max_bytes=250)] == [2, 3]
    assert [e.seq for e in journal.read(5, max_bytes=1)] == [5]  # at least one
    assert [e.seq for e in journal.read(9)] == [9, 10]
    with pytest.raises(UsageError):
        journal.read(1, max_entries=0)


def test_entries_are_read_from_the_file(journal: Journal, tmp_path: Path):
    journal.append("v", 0, b"x" * 100)
    with open(tmp_path / "g1.journal", "r+b") as f:  # someone else changes the bytes on disk
        f.seek(HEADER_SIZE + 5)
        f.write(b"y")
    with pytest.raises(IntegrityError, match="entry 1"):
        journal.read(1)


def test_read_out_of_range_raises_without_side_effects(journal: Journal):
    with pytest.raises(RangeNotStored, match="requested range not stored"):
        journal.read(1)
    for i in range(5):
        journal.append("v", i, bytes(10))
    journal.mark_applied(2)
    journal.mark_transferred(4)
    before, meta = pointers(journal), journal.meta()
    for bad in (0, 1, 2, 6, 100):
        with pytest.raises(RangeNotStored, match="requested range not stored"):
            journal.read(bad)
    assert pointers(journal) == before and journal.meta() == meta
    assert [e.seq for e in journal.read(3)] == [3, 4, 5]


# ---------------------------------------------------------------- pointers
def test_mark_transferred_and_applied_are_monotone_and_clamped(journal: Journal):
    for i in range(6):
        journal.append("v", i, bytes(10))
    journal.mark_transferred(3)
    journal.mark_transferred(2)
    assert journal.transferred == 3
    journal.mark_transferred(99)
    assert journal.transferred == 6
    journal.mark_applied(2)
    assert (journal.applied, journal.discarded, journal.transferred) == (2, 2, 6)
    journal.mark_applied(1)
    assert journal.applied == 2
    journal.mark_applied(99)
    assert (journal.applied, journal.discarded, journal.stored, journal.counter) == (6, 6, 6, 7)
    assert journal.used_bytes == 0 and journal.pending_bytes == 0
    check_invariants(journal)


def test_applied_pulls_transferred_along(journal: Journal):
    for i in range(4):
        journal.append("v", i, bytes(10))
    journal.mark_applied(3)
    assert journal.transferred == 3
    check_invariants(journal)


def test_mark_applied_persists_discarded(journal: Journal, tmp_path: Path):
    for i in range(4):
        journal.append("v", i, bytes(10))
    journal.mark_applied(2)
    meta = json.loads((tmp_path / "g1.meta").read_text())
    assert meta["discarded"]["seq"] == 2 and meta["applied"]["seq"] == 2
    assert meta["free"]["tail"] == meta["discarded"]["pos"] == 2 * (HEADER_SIZE + 10)


def test_random_operations_keep_invariants(tmp_path: Path):
    rnd = random.Random(7)
    j = Journal(tmp_path, "g", 2048)
    written: dict[int, tuple[str, int, bytes]] = {}
    for _ in range(3000):
        op = rnd.random()
        if op < 0.6:
            data = rnd.randbytes(rnd.randrange(0, 300))
            vol, off = rnd.choice("abc"), rnd.randrange(1 << 30)
            before = pointers(j)
            try:
                written[j.append(vol, off, data)] = (vol, off, data)
            except JournalFull:
                assert pointers(j) == before
                assert j.capacity_bytes - j.used_bytes < 2 * (HEADER_SIZE + len(data))
        elif op < 0.75:
            j.mark_transferred(rnd.randrange(j.counter + 2))
        elif op < 0.9:
            j.mark_applied(rnd.randrange(j.counter + 2))
        elif op < 0.98 and j.stored > j.discarded:
            start = rnd.randrange(j.discarded + 1, j.stored + 1)
            for e in j.read(start, max_bytes=rnd.randrange(1000)):
                assert (e.volume, e.offset, e.data) == written[e.seq]
        elif op < 0.99:
            j.fold_unapplied()
        else:
            j.close()
            j = Journal(tmp_path, "g", 2048)
        check_invariants(j)
        live = range(j.discarded + 1, j.stored + 1)
        assert j.pending_bytes == sum(len(written[s][2]) for s in live)
        assert j.used_bytes >= sum(HEADER_SIZE + len(written[s][2]) for s in live)
    assert j.counter > 300  # about 40 times round the ring
    j.close()


# ---------------------------------------------------------------- space
def test_wraps_many_times_with_small_capacity(tmp_path: Path):
    j = Journal(tmp_path, "small", 512)
    rnd = random.Random(1)
    data = {}
    for n in range(1, 601):
        payload = rnd.randbytes(rnd.randrange(1, 200))
        try:
            assert j.append("v", n, payload) == n
        except JournalFull:  # the live entry sits where the wrapped record would go
            j.mark_applied(j.stored)
            assert j.append("v", n, payload) == n
        data[n] = payload
        assert [e.data for e in j.read(n)] == [payload]
        if j.stored - j.applied >= 2:
            j.mark_applied(j.stored - 1)  # keep one entry live across the wrap
        if n % 150 == 0:
            j.close()
            j = Journal(tmp_path, "small", 512)
            assert j.read(j.applied + 1)[0].data == data[j.applied + 1]
    assert j.counter == 601
    j.close()


def test_batched_appends_wrap_and_read_back_like_single_ones(tmp_path: Path):
    """append_numbered writes back-to-back records in one pwritev, with wrap markers between runs:
    what it stores reads back (and survives a reopen) exactly like appends one at a time."""
    from replicator.core.effects import JEntry, Zeros
    rnd = random.Random(7)
    j = Journal(tmp_path, "batch", 1024)
    data = {}
    for _ in range(300):
        batch = []
        for _ in range(rnd.randrange(1, 6)):
            seq = j.counter + len(batch)
            payload = Zeros(rnd.randrange(1, 9000)) if rnd.random() < 0.2 else rnd.randbytes(rnd.randrange(1, 120))
            batch.append(JEntry(seq, rnd.choice("ab"), seq * 7, payload))
        try:
            j.append_numbered(batch)
        except JournalFull:
            j.mark_applied(j.stored)        # free everything, then the whole batch fits again
            batch = [JEntry(j.counter + i, e.volume, e.offset, e.data) for i, e in enumerate(batch)]
            j.append_numbered(batch)
        for e in batch:
            data[e.seq] = e
        got = j.read(batch[0].seq, max_entries=len(batch))
        assert [(g.seq, g.volume, g.offset, g.data) for g in got] == [(e.seq, e.volume, e.offset, e.data) for e in batch]
        if j.stored - j.applied > 3:
            j.mark_applied(j.stored - 3)
    first = j.applied + 1
    j.close()
    j = Journal(tmp_path, "batch", 1024)
    got = j.read(first, max_entries=100)
    assert [(g.seq, g.data) for g in got] == [(s, data[s].data) for s in range(first, j.stored + 1)]
    j.close()


def test_batched_append_numbers_must_follow_the_counter(journal: Journal):
    from replicator.core.effects import JEntry
    with pytest.raises(IntegrityError):
        journal.append_numbered([JEntry(5, "v", 0, b"x")])
    with pytest.raises(IntegrityError):
        journal.append_numbered([JEntry(1, "v", 0, b"x"), JEntry(3, "v", 0, b"y")])
    assert journal.counter == 1


def test_journal_full_changes_nothing(journal: Journal, tmp_path: Path):
    n = 0
    with pytest.raises(JournalFull):
        while True:
            journal.append("v", n, bytes([n % 256]) * 100)
            n += 1
    assert n == 4096 // REC
    meta, before = journal.meta(), pointers(journal)
    disk = (tmp_path / "g1.journal").read_bytes()
    for size in (100, 1, 0):
        with pytest.raises(JournalFull):
            journal.append("new-volume", 0, bytes(size))
    with pytest.raises(JournalFull):
        journal.append("v", 0, bytes(100))
    assert journal.meta() == meta and pointers(journal) == before
    assert (tmp_path / "g1.journal").read_bytes() == disk
    assert isinstance(JournalFull("x"), StateError)
    journal.mark_applied(3)  # deferred discard frees space; appends work again
    journal.append("v", 0, bytes(100))


def test_entry_larger_than_capacity_is_journal_full(journal: Journal):
    before = pointers(journal)
    with pytest.raises(JournalFull, match="never fit"):
        journal.append("v", 0, bytes(4096))
    journal.append("v", 0, bytes(4096 - HEADER_SIZE))  # exactly the capacity fits an empty ring
    assert journal.used_bytes == 4096
    with pytest.raises(JournalFull):
        journal.append("v", 0, b"")
    assert pointers(journal)[0] == before[0] + 1


def test_transfer_frees_nothing_until_applied(journal: Journal):
    for i in range(4096 // REC):
        journal.append("v", i, bytes(100))
    journal.mark_transferred(journal.stored)
    with pytest.raises(JournalFull):
        journal.append("v", 0, bytes(100))
    journal.mark_applied(1)
    journal.append("v", 0, bytes(100))


def test_never_overwrites_a_live_entry(tmp_path: Path):
    j = Journal(tmp_path, "g", 1000)
    rnd = random.Random(3)
    payloads = {}
    for n in range(400):
        data = rnd.randbytes(rnd.randrange(1, 300))
        try:
            payloads[j.append("v", n, data)] = data
        except JournalFull:
            j.mark_applied(j.applied + rnd.randrange(1, 4))
        # every live entry still reads back intact from the file
        if j.stored > j.discarded:
            got = j.read(j.discarded + 1, max_bytes=1 << 20)
            assert [e.data for e in got] == [payloads[s] for s in range(j.discarded + 1, j.stored + 1)]
    j.close()


# ---------------------------------------------------------------- reopen
def test_reopen_keeps_entries_and_pointers(tmp_path: Path):
    j = Journal(tmp_path, "g", 4096)
    for i in range(10):
        j.append(f"v{i % 3}", i * 512, bytes([i]) * (i * 10))
    j.mark_applied(4)
    j.mark_transferred(8)
    used, pending = j.used_bytes, j.pending_bytes
    j.close()
    j.close()  # twice is fine
    with pytest.raises(StateError, match="closed"):
        j.append("v", 0, b"x")
    j = Journal(tmp_path, "g", 1 << 20)  # an existing journal keeps its capacity
    assert (j.counter, j.stored, j.applied, j.discarded) == (11, 10, 4, 4)
    assert j.transferred == 4  # reset to applied: entries after it are sent again
    assert j.capacity_bytes == 4096 and j.used_bytes == used and j.pending_bytes == pending
    assert j.last_recovery.entries == 6 and j.last_recovery.dropped_bytes == 0
    assert [(e.seq, e.volume, e.offset, e.data) for e in j.read(5)] == \
        [(i + 1, f"v{i % 3}", i * 512, bytes([i]) * (i * 10)) for i in range(4, 10)]
    assert j.append("v1", 0, b"next") == 11
    j.close()


def test_reopen_after_fold_keeps_counter(tmp_path: Path):
    j = Journal(tmp_path, "g", 4096)
    for i in range(5):
        j.append("v", i, bytes(10))
    j.fold_unapplied()
    j.close()
    j = Journal(tmp_path, "g")
    assert (j.counter, j.stored, j.applied, j.discarded) == (6, 5, 5, 5)
    assert j.append("v", 0, b"") == 6
    j.close()


# ---------------------------------------------------------------- fold
def test_fold_unapplied(journal: Journal):
    journal.append("v1", 0, bytes(10))
    journal.append("v2", 4096, bytes(20))
    journal.append("v1", 8192, bytes(30))
    journal.mark_applied(1)
    journal.mark_transferred(2)
    assert journal.fold_unapplied() == [("v2", 4096, 20), ("v1", 8192, 30)]
    assert (journal.counter, journal.stored, journal.transferred, journal.applied, journal.discarded) == \
        (4, 3, 3, 3, 3)
    assert journal.used_bytes == 0 and journal.pending_bytes == 0
    assert journal.fold_unapplied() == []
    with pytest.raises(RangeNotStored):
        journal.read(3)
    assert journal.append("v1", 0, b"x") == 4


def test_fold_of_a_full_journal_frees_everything(journal: Journal):
    with pytest.raises(JournalFull):
        while True:
            journal.append("v", 0, bytes(100))
    assert len(journal.fold_unapplied()) == 4096 // REC
    assert journal.used_bytes == 0
    journal.append("v", 0, bytes(100))


# ---------------------------------------------------------------- migration handover
def _record_at(path: Path, pos: int) -> tuple[int, bytes]:
    with open(path, "rb") as f:
        f.seek(pos)
        header, data = decode(f.read(4096))
    return header.seq, bytes(data)


def test_adopt_continues_counter_and_position(tmp_path: Path):
    old = Journal(tmp_path / "a1", "g", 4096)
    for i in range(7):
        old.append("v1", i, bytes(50))
    old.mark_applied(3)
    meta = old.meta()
    json.dumps(meta)  # JSON-safe for the wire
    assert meta["counter"] == 8 and meta["capacity_bytes"] == 4096
    head = meta["free"]["head"]
    assert head == 7 * (HEADER_SIZE + 50)

    new = Journal(tmp_path / "a2", "g", 4096)
    new.adopt(meta)
    assert (new.counter, new.stored, new.transferred, new.applied, new.discarded) == (8, 7, 7, 7, 7)
    assert new.append("v2", 0, b"first on V2") == 8
    assert _record_at(tmp_path / "a2" / "g.journal", head) == (8, b"first on V2")
    new.close()
    new = Journal(tmp_path / "a2", "g", 4096)  # the adopted counter survives a reopen
    assert new.counter == 9 and [e.data for e in new.read(8)] == [b"first on V2"]
    new.close()
    old.close()


def test_adopt_with_other_capacity_continues_counter_only(tmp_path: Path):
    old = Journal(tmp_path / "a1", "g", 4096)
    for i in range(3):
        old.append("v1", i, bytes(50))
    new = Journal(tmp_path / "a2", "g", 8192)
    new.adopt(old.meta())
    assert new.append("v1", 0, b"x") == 4
    assert _record_at(tmp_path / "a2" / "g.journal", 0) == (4, b"x")
    new.close()
    old.close()


def test_adopt_refuses_a_used_journal_or_a_lower_counter(tmp_path: Path):
    old = Journal(tmp_path / "a1", "g", 4096)
    old.append("v", 0, b"x")
    new = Journal(tmp_path / "a2", "g", 4096)
    for _ in range(3):
        new.append("v", 0, b"y")
    with pytest.raises(StateError, match="holds entries"):
        new.adopt(old.meta())
    new.mark_applied(3)
    with pytest.raises(StateError, match="back"):
        new.adopt(old.meta())
    with pytest.raises(IntegrityError):
        new.adopt({"counter": 5})
    old.close()
    new.close()


# ---------------------------------------------------------------- threads
def test_concurrent_appends_get_unique_contiguous_seqs(tmp_path: Path):
    j = Journal(tmp_path, "g", 1 << 20)
    seqs: dict[int, bytes] = {}
    lock = threading.Lock()

    def writer(t: int) -> None:
        for i in range(250):
            payload = f"{t}:{i}".encode()
            seq = j.append(f"v{t}", i, payload)
            with lock:
                assert seq not in seqs
                seqs[seq] = payload

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(1, 2001))
    assert j.counter == 2001 and j.stored == 2000
    got = j.read(1, max_entries=5000, max_bytes=1 << 30)
    assert [(e.seq, e.data) for e in got] == sorted(seqs.items())
    assert all(e.volume == f"v{bytes(e.data).split(b':')[0].decode()}" for e in got)
    j.close()


def test_concurrent_writers_and_a_consumer_on_a_small_ring(tmp_path: Path):
    """Reads run outside the lock while discards and wraps happen: never a wrong entry."""
    j = Journal(tmp_path, "g", 2048)
    done = threading.Event()
    errors: list[BaseException] = []
    expected: dict[int, tuple[int, bytes]] = {}
    consumed: list = []
    lock = threading.Lock()

    def writer(t: int) -> None:
        try:
            for i in range(150):
                payload = bytes([t]) * (20 + (i % 40))
                while True:
                    try:
                        seq = j.append("v", t * 1000 + i, payload)
                        break
                    except JournalFull:
                        threading.Event().wait(0.0005)
                with lock:
                    expected[seq] = (t * 1000 + i, payload)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def consumer() -> None:
        try:
            nxt = 1
            while not (done.is_set() and nxt > j.stored):
                try:
                    entries = j.read(nxt, max_bytes=300)
                except RangeNotStored:
                    continue
                for e in entries:
                    assert e.seq == nxt
                    consumed.append(e)
                    nxt += 1
                j.mark_transferred(nxt - 1)
                j.mark_applied(nxt - 1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    reader = threading.Thread(target=consumer)
    for t in writers + [reader]:
        t.start()
    for t in writers:
        t.join()
    done.set()
    reader.join(timeout=30)
    assert not errors, errors
    assert j.applied == j.stored == 600
    assert [(e.seq, e.offset, e.data) for e in consumed] == [(s, *expected[s]) for s in range(1, 601)]
    j.close()


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("name", ["", "a/b", ".."])
def test_bad_names_are_refused(tmp_path: Path, name: str):
    with pytest.raises(UsageError):
        Journal(tmp_path, name, 4096)


def test_bad_capacity_is_refused(tmp_path: Path):
    with pytest.raises(UsageError):
        Journal(tmp_path, "g", 10)
