"""Journal recovery after kill -9, torn and corrupt records, stale or broken meta files (journal/FORMAT.md)."""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import pytest

from journal import Journal, JournalFull
from journal.entry import HEADER_SIZE
from replicator.errors import IntegrityError

REC = HEADER_SIZE + 100


def crash(j: Journal) -> None:
    """kill -9: what pwrite wrote stays in the page cache; no close, no meta rewrite."""
    os.close(j._fd)
    j._closed = True


def payload(n: int) -> bytes:
    return bytes([n % 251]) * 100


def fill(j: Journal, count: int) -> None:
    for _ in range(count):
        seq = j.counter
        assert j.append("v", seq * 4096, payload(seq)) == seq


def fill_freeing(j: Journal, count: int) -> None:
    """Append ``count`` entries, discarding everything when the ring is full."""
    for _ in range(count):
        try:
            fill(j, 1)
        except JournalFull:
            j.mark_applied(j.stored)
            fill(j, 1)


def assert_entries_ok(j: Journal) -> None:
    """Every entry the journal returns is exactly what was written for that seq."""
    if j.stored > j.discarded:
        got = j.read(j.discarded + 1, max_bytes=1 << 30, max_entries=1 << 20)
        assert [e.seq for e in got] == list(range(j.discarded + 1, j.stored + 1))
        for e in got:
            assert (e.volume, e.offset, e.data) == ("v", e.seq * 4096, payload(e.seq))


def patch(path: Path, pos: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(data)


def xor_byte(path: Path, pos: int, mask: int = 0x40) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ mask]))


def test_crash_keeps_every_written_entry(tmp_path: Path):
    j = Journal(tmp_path, "g", 4096)
    fill(j, 12)
    j.mark_applied(5)
    crash(j)
    j = Journal(tmp_path, "g", 4096)
    assert (j.counter, j.stored, j.transferred, j.applied, j.discarded) == (13, 12, 5, 5, 5)
    assert j.last_recovery.entries == 7 and j.last_recovery.dropped_bytes == 0
    assert_entries_ok(j)
    j.close()


def test_crash_with_wrapped_entries(tmp_path: Path):
    j = Journal(tmp_path, "g", 1000)
    for _ in range(20):  # 7 records fit per lap; keep 3 live so the chain crosses the end
        fill(j, 1)
        j.mark_applied(j.stored - 3)
    live = (j.discarded, j.stored)
    crash(j)
    j = Journal(tmp_path, "g", 1000)
    assert (j.discarded, j.stored, j.counter) == (*live, live[1] + 1)
    assert_entries_ok(j)
    j.close()


def test_truncated_data_file_mid_entry(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    j = Journal(tmp_path, "g", 4096)
    fill(j, 5)
    crash(j)
    os.truncate(tmp_path / "g.journal", 4 * REC + 60)
    with caplog.at_level(logging.WARNING, logger="journal"):
        j = Journal(tmp_path, "g", 4096)
    assert (j.stored, j.counter) == (4, 5)
    assert j.last_recovery.dropped_bytes == REC
    assert f"dropped {REC} bytes" in caplog.text
    assert (tmp_path / "g.journal").stat().st_size == 4096
    assert_entries_ok(j)
    assert j.append("v", 5 * 4096, payload(5)) == 5
    assert_entries_ok(j)
    j.close()


@pytest.mark.parametrize("where, dropped", [
    (HEADER_SIZE + 50, REC),  # data
    (HEADER_SIZE + 99, REC),  # last data byte
    (24, REC),                # offset field
    (36, REC),                # crc field
    (8, 0),                   # epoch field: looks older, the normal end of the ring
    (12, 0),                  # seq field: not the expected seq, the normal end of the ring
    (0, 0),                   # magic: not a record at all
])
def test_flipped_byte_in_last_entry(tmp_path: Path, where: int, dropped: int):
    j = Journal(tmp_path, "g", 4096)
    fill(j, 5)
    crash(j)
    xor_byte(tmp_path / "g.journal", 4 * REC + where, 0x01 if where == 8 else 0x40)
    j = Journal(tmp_path, "g", 4096)
    assert (j.stored, j.counter) == (4, 5)
    assert j.last_recovery.dropped_bytes == dropped
    assert_entries_ok(j)
    j.close()


def test_corrupt_length_stops_the_scan(tmp_path: Path):
    j = Journal(tmp_path, "g", 4096)
    fill(j, 3)
    crash(j)
    patch(tmp_path / "g.journal", 2 * REC + 32, (5000).to_bytes(4, "little"))  # past the ring's end
    j = Journal(tmp_path, "g", 4096)
    assert j.stored == 2 and j.last_recovery.dropped_bytes == 4096 - 2 * REC
    assert_entries_ok(j)
    j.close()


def test_torn_entry_after_the_wrap(tmp_path: Path):
    j = Journal(tmp_path, "g", 1000)
    fill(j, 7)                # 7 * 140 = 980: the next record wraps
    j.mark_applied(5)
    fill(j, 1)                # seq 8 at byte 0, wrap marker at 980
    crash(j)
    xor_byte(tmp_path / "g.journal", HEADER_SIZE + 3)
    j = Journal(tmp_path, "g", 1000)
    assert (j.discarded, j.stored) == (5, 7)
    assert j.last_recovery.dropped_bytes == REC
    assert_entries_ok(j)
    assert j.append("v", 8 * 4096, payload(8)) == 8
    j.close()


def test_dropped_records_never_come_back(tmp_path: Path):
    """A new record of the same size lands before old records 4 and 5, which carry the next seqs."""
    j = Journal(tmp_path, "g", 4096)
    fill(j, 5)
    crash(j)
    xor_byte(tmp_path / "g.journal", 2 * REC + HEADER_SIZE + 1)  # corrupt seq 3
    j = Journal(tmp_path, "g", 4096)
    assert j.stored == 2
    assert j.append("v", 3 * 4096, b"N" * 100) == 3  # same size, same place as the old seq 3
    crash(j)
    j = Journal(tmp_path, "g", 4096)
    assert (j.stored, j.counter) == (3, 4)
    assert [e.data for e in j.read(3)] == [b"N" * 100]
    j.mark_applied(3)  # the tail now points at the old seq 4
    crash(j)
    j = Journal(tmp_path, "g", 4096)
    assert (j.discarded, j.stored, j.counter) == (3, 3, 4)
    j.close()


def test_random_corruption_never_returns_a_bad_entry(tmp_path: Path):
    rnd = random.Random(11)
    for trial in range(40):
        d = tmp_path / str(trial)
        j = Journal(d, "g", 1000)
        for _ in range(rnd.randrange(5, 30)):
            fill_freeing(j, 1)
            if rnd.random() < 0.5:
                j.mark_applied(j.stored - rnd.randrange(0, 4))
        stored = j.stored
        crash(j)
        for _ in range(rnd.randrange(1, 4)):
            xor_byte(d / "g.journal", rnd.randrange(1000), rnd.randrange(1, 256))
        j = Journal(d, "g", 1000)
        assert j.stored <= stored
        assert_entries_ok(j)
        j.mark_applied(j.stored - 1)
        fill_freeing(j, rnd.randrange(0, 4))  # new records after a corrupt spot; then crash again
        crash(j)
        j = Journal(d, "g", 1000)
        assert_entries_ok(j)
        j.close()


def test_stale_meta_still_recovers(tmp_path: Path):
    j = Journal(tmp_path, "g", 4096)
    fill(j, 10)
    j.mark_applied(2)
    old_meta = (tmp_path / "g.meta").read_bytes()
    j.mark_applied(6)
    fill(j, 3)
    crash(j)
    (tmp_path / "g.meta").write_bytes(old_meta)  # e.g. the last rename did not reach the disk
    j = Journal(tmp_path, "g", 4096)
    assert (j.discarded, j.applied, j.stored, j.counter) == (2, 2, 13, 14)
    assert_entries_ok(j)  # 3..6 come back and are sent again; the secondary ignores duplicates
    j.close()


def test_lost_entries_keep_the_counter_and_fold(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    j = Journal(tmp_path, "g", 4096)
    fill(j, 10)
    j.sync()           # durable, so they may have been sent: their numbers are taken for good
    j.mark_applied(2)  # the meta file now says counter 11
    crash(j)
    patch(tmp_path / "g.journal", 4 * REC, bytes(6 * REC))  # seq 5..10 vanish (power loss)
    with caplog.at_level(logging.ERROR, logger="journal"):
        j = Journal(tmp_path, "g", 4096)
    r = j.last_recovery
    assert (r.entries, r.lost_entries) == (2, 6)
    assert r.folded == (("v", 3 * 4096, 100), ("v", 4 * 4096, 100))
    assert "resync" in caplog.text
    assert (j.counter, j.stored, j.applied, j.discarded, j.used_bytes) == (11, 10, 10, 10, 0)
    assert j.append("v", 0, b"x") == 11  # numbers the secondary may hold are never reused
    j.close()


def test_entries_never_synced_may_be_numbered_again_after_a_power_loss(tmp_path: Path):
    """Only synced entries leave the primary, so numbers of unsynced ones lost with the page cache
    were never seen by anyone: the meta file's counter covers only what was synced."""
    j = Journal(tmp_path, "g", 4096)
    fill(j, 4)
    j.sync()
    fill(j, 6)          # 5..10, never synced
    j.mark_applied(2)   # the meta file says counter 5, not 11
    crash(j)
    patch(tmp_path / "g.journal", 4 * REC, bytes(6 * REC))  # seq 5..10 vanish (power loss)
    j = Journal(tmp_path, "g", 4096)
    assert (j.last_recovery.lost_entries, j.stored, j.counter) == (0, 4, 5)
    assert j.append("v", 0, b"x") == 5
    j.close()


# ---------------------------------------------------------------- meta file problems
def test_garbage_meta_raises_integrity_error(tmp_path: Path):
    Journal(tmp_path, "g", 4096).close()
    (tmp_path / "g.meta").write_bytes(b"\x00{not json")
    with pytest.raises(IntegrityError, match="g.meta is unreadable or not JSON"):
        Journal(tmp_path, "g", 4096)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format=9), "format"),
    (lambda m: m["applied"].update(seq=5), "out of order"),
    (lambda m: m.update(counter="7"), "counter"),
    (lambda m: m["free"].update(tail=1 << 20), "tail"),
    (lambda m: m.update(volumes={"v": 0}), "volumes"),
    (lambda m: m.update(volumes={"a": 1, "b": 1}), "share an id"),
    (lambda m: m.pop("stored"), "seq"),
])
def test_invalid_meta_fields_raise_integrity_error(tmp_path: Path, change, message):
    Journal(tmp_path, "g", 4096).close()
    meta = json.loads((tmp_path / "g.meta").read_text())
    change(meta)
    (tmp_path / "g.meta").write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match=message):
        Journal(tmp_path, "g", 4096)


def test_meta_that_is_not_an_object(tmp_path: Path):
    Journal(tmp_path, "g", 4096).close()
    (tmp_path / "g.meta").write_text("[1, 2]")
    with pytest.raises(IntegrityError, match="not a JSON object"):
        Journal(tmp_path, "g", 4096)


def test_missing_data_file_raises(tmp_path: Path):
    Journal(tmp_path, "g", 4096).close()
    (tmp_path / "g.journal").unlink()
    with pytest.raises(IntegrityError, match="data file .* is missing"):
        Journal(tmp_path, "g", 4096)


def test_leftover_temp_meta_is_ignored(tmp_path: Path):
    j = Journal(tmp_path, "g", 4096)
    fill(j, 2)
    j.close()
    (tmp_path / "g.meta.tmp").write_bytes(b"half a meta fi")
    j = Journal(tmp_path, "g", 4096)
    assert j.stored == 2 and not (tmp_path / "g.meta.tmp").exists()
    j.close()


def test_data_file_without_meta_starts_empty(tmp_path: Path):
    (tmp_path / "g.journal").write_bytes(b"junk from a create that crashed" * 10)
    j = Journal(tmp_path, "g", 4096)
    assert (j.counter, j.stored) == (1, 0)
    assert (tmp_path / "g.journal").stat().st_size == 4096
    fill(j, 1)
    assert_entries_ok(j)
    j.close()
