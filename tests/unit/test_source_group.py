"""When a primary frees applied journal space (SourceGroup.should_discard): pure logic."""
from __future__ import annotations

from dataclasses import dataclass

from replicator.primary import DISCARD_EVERY_S, SourceGroup


@dataclass
class FakeJournal:
    stored: int
    used_bytes: int
    capacity_bytes: int = 1000


def group(stored: int, used: int, last_discard: float) -> SourceGroup:
    g = SourceGroup("g", FakeJournal(stored, used))  # type: ignore[arg-type]
    g.last_discard = last_discard
    return g


def test_discards_at_once_when_the_secondary_has_everything() -> None:
    assert group(stored=10, used=100, last_discard=5.0).should_discard(10, now=5.0)


def test_defers_under_load_until_the_interval_passed() -> None:
    g = group(stored=50, used=100, last_discard=5.0)
    assert not g.should_discard(40, now=5.0 + DISCARD_EVERY_S / 2)
    assert g.should_discard(40, now=5.0 + DISCARD_EVERY_S * 1.01)


def test_discards_at_once_when_the_journal_is_half_full() -> None:
    assert group(stored=50, used=500, last_discard=5.0).should_discard(40, now=5.0)


def test_never_frees_an_entry_whose_volume_write_is_still_running() -> None:
    g = group(stored=50, used=100, last_discard=5.0)
    g.writing = {42, 45}
    assert g.discardable(48) == 41
    g.writing.clear()
    assert g.discardable(48) == 48
    assert g.discardable(60) == 50  # never past what is stored
