"""The journal against a plain in-memory model, driven by hypothesis (SPEC 5.3, invariants 24 and 27)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from journal import Journal, JournalFull
from journal.entry import HEADER_SIZE
from replicator.errors import RangeNotStored

CAPACITY = 1500


class JournalModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="journal-model-"))
        self.j = Journal(self.dir, "g", CAPACITY)
        self.entries: dict[int, tuple[str, int, bytes]] = {}
        self.counter, self.stored, self.transferred, self.applied = 1, 0, 0, 0

    def teardown(self) -> None:
        self.j.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def state(self) -> tuple[int, ...]:
        j = self.j
        return (j.counter, j.stored, j.transferred, j.applied, j.discarded, j.used_bytes)

    @rule(volume=st.sampled_from(["a", "b", "c"]), offset=st.integers(0, 1 << 40),
          data=st.binary(max_size=400))
    def append(self, volume: str, offset: int, data: bytes) -> None:
        before = self.state()
        try:
            seq = self.j.append(volume, offset, data)
        except JournalFull:
            assert self.state() == before
            assert CAPACITY - self.j.used_bytes < 2 * (HEADER_SIZE + len(data))
            return
        assert seq == self.counter
        self.entries[seq] = (volume, offset, data)
        self.counter, self.stored = seq + 1, seq

    @rule(delta=st.integers(-2, 3), max_bytes=st.integers(0, 2000), max_entries=st.integers(1, 5))
    def read(self, delta: int, max_bytes: int, max_entries: int) -> None:
        start = self.applied + 1 + delta
        if not self.applied < start <= self.stored:
            before = self.state()
            try:
                self.j.read(start, max_bytes, max_entries)
            except RangeNotStored:
                assert self.state() == before
                return
            raise AssertionError(f"read({start}) outside {self.applied + 1}..{self.stored} did not raise")
        got = self.j.read(start, max_bytes, max_entries)
        assert 1 <= len(got) <= max_entries
        assert [e.seq for e in got] == list(range(start, start + len(got)))
        assert len(got) == 1 or sum(len(e.data) for e in got) <= max_bytes
        for e in got:
            assert (e.volume, e.offset, e.data) == self.entries[e.seq]
        more = start + len(got)
        if more <= self.stored and len(got) < max_entries:  # stopped for the byte limit only
            assert sum(len(e.data) for e in got) + len(self.entries[more][2]) > max_bytes

    @rule(seq=st.integers(-1, 60))
    def mark_transferred(self, seq: int) -> None:
        self.j.mark_transferred(seq)
        self.transferred = max(self.transferred, min(seq, self.stored))

    @rule(back=st.integers(0, 4))
    def mark_applied(self, back: int) -> None:
        seq = self.stored - back
        self.j.mark_applied(seq)
        if min(seq, self.stored) > self.applied:
            self.applied = min(seq, self.stored)
            self.transferred = max(self.transferred, self.applied)
            for s in [s for s in self.entries if s <= self.applied]:
                del self.entries[s]

    @precondition(lambda self: self.stored - self.applied > 0)
    @rule()
    def fold(self) -> None:
        want = [(v, o, len(d)) for s, (v, o, d) in sorted(self.entries.items())]
        assert self.j.fold_unapplied() == want
        self.entries.clear()
        self.transferred = self.applied = self.stored

    @rule(clean=st.booleans())
    def reopen(self, clean: bool) -> None:
        if clean:
            self.j.close()
        else:  # kill -9
            os.close(self.j._fd)
            self.j._closed = True
        self.j = Journal(self.dir, "g", CAPACITY)
        assert self.j.last_recovery.dropped_bytes == 0 and self.j.last_recovery.lost_entries == 0
        self.transferred = self.applied  # entries after applied are sent again

    @invariant()
    def pointers_match_the_model(self) -> None:
        j = self.j
        assert (j.counter, j.stored, j.transferred, j.applied, j.discarded) == \
            (self.counter, self.stored, self.transferred, self.applied, self.applied)
        assert j.discarded <= j.applied <= j.transferred <= j.stored < j.counter
        assert j.pending_entries == len(self.entries) == self.stored - self.applied
        assert j.pending_bytes == sum(len(d) for _, _, d in self.entries.values())
        records = sum(HEADER_SIZE + len(d) for _, _, d in self.entries.values())
        assert records <= j.used_bytes <= CAPACITY


JournalModel.TestCase.settings = settings(max_examples=30, stateful_step_count=40, deadline=None)
TestJournalModel = JournalModel.TestCase
