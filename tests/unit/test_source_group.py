"""When a primary frees applied journal space, and what a full journal does (core/source_group.py)."""
from __future__ import annotations

from replicator import wire
from replicator.core import effects as E
from replicator.core import tables as T
from replicator.core.journal_space import RECORD_HEADER_BYTES

from .core_harness import Harness
from .test_core import SIZE, block, primary, pump


def discards(h: Harness) -> list[int]:
    return [e.through for e in h.trace if isinstance(e, E.JournalDiscard)]


def test_frees_nothing_the_secondary_has_not_applied() -> None:
    h = primary("async")
    for i in range(3):
        h.write("v1", i * 512, block("a"))
    pump(h, 3, applied=0)
    assert not discards(h)
    pump(h, 3, applied=2)
    assert discards(h)[-1] == 2


def test_never_frees_an_entry_whose_volume_write_is_still_running() -> None:
    h = primary("async")
    g = h.core.primary.groups["v1"]
    g.stored, g.applied = 50, 48
    g.writing = {42: 1, 45: 1}
    assert g.discardable() == 41
    g.writing.clear()
    g.applied = 60
    assert g.discardable() == 50      # never past what is stored


def test_defers_discards_under_load_to_save_meta_writes() -> None:
    h = primary("async")
    for i in range(6):
        h.write("v1", i * 512, block("b"))
    pump(h, 1, applied=1)
    first = len(discards(h))
    h.core.primary.groups["v1"].last_discard = h.now
    for c in h.pending("journal.push"):
        h.answer(c, wire.ok(applied=2, incarnation="b#1"))
    assert len(discards(h)) == first      # within discard_every_s of the last one: later


def test_frees_space_at_once_only_when_the_journal_is_nearly_full() -> None:
    """A host faster than the link keeps the journal at its high-water mark (80%): a discard per
    push there (each one syncs the volumes) slowed the drain; past halfway from the mark to full
    (90%) a discard does not wait for discard_every_s."""
    h = primary("async", journal_bytes=20 * (512 + RECORD_HEADER_BYTES))
    g = h.core.primary.groups["v1"]

    def answer_pushes(applied: int) -> list[int]:
        g.last_discard = h.now                  # a discard just ran
        for c in h.pending("journal.push"):
            h.answer(c, wire.ok(applied=applied, incarnation="b#1"))
        return discards(h)

    for i in range(14):                          # 70% full: past half, below the mark
        h.write("v1", i * 512, block("c"))
    assert answer_pushes(applied=2) == []        # later, after discard_every_s
    for i in range(14, 19):                      # 95% full (the writes past the mark are slowed)
        h.write("v1", i * 512, block("d"))
    h.advance(0.5)
    assert g.space.used() >= 0.9 * g.space.capacity
    assert answer_pushes(applied=4) == [4]       # at once


def test_a_full_journal_folds_into_the_bitmap_and_the_host_never_fails() -> None:
    h = Harness("site-a1")
    h.ok("volume.create", name="v1", size=SIZE)
    h.request("pair.create", volume="v1", mode="async", journal_bytes=3 * (512 + 40),
              secondary={"node": "site-b", "control": "site-b", "volume": "v3"})
    h.answer(h.pending("pair.join")[0], wire.ok())
    from .test_core import finish_copy
    finish_copy(h)
    reqs = [h.write("v1", i * 512, block("f")) for i in range(6)]   # the secondary applies nothing
    h.advance(5.0)                      # past the high-water mark the writes are slowed first
    assert all(r in h.host and h.host[r].error is None for r in reqs)
    v = h.core.volumes["v1"]
    assert v.info.pair_state == T.SUSPENDED and v.info.suspend_reason == "journal full"
    assert v.diff.any_set(0, 6 * 512)
    i_drop = max(i for i, e in enumerate(h.trace) if isinstance(e, E.JournalDiscard))
    i_save = max(i for i, e in enumerate(h.trace[:i_drop]) if isinstance(e, E.SaveMgmt))
    i_append = max(i for i, e in enumerate(h.trace[:i_drop]) if isinstance(e, E.JournalAppend))
    i_bits = max(i for i, e in enumerate(h.trace[:i_save]) if isinstance(e, E.BitmapSync) and e.kind == "diff")
    assert i_append < i_bits < i_save < i_drop   # bits, then "suspended", durably, before any entry goes


def test_back_pressure_slows_host_writes_past_the_high_water_mark_but_not_while_the_link_is_down() -> None:
    h = primary("async")
    g = h.core.primary.groups["v1"]
    cap = g.space.capacity
    assert g.throttle_s() == 0.0
    g.space.used = lambda: int(0.9 * cap)                # half-way from the 80 % mark to full
    assert abs(g.throttle_s() - h.core.cfg.throttle_max_s * 0.25) < 0.01
    r = h.write("v1", 0, block("t"))
    assert r not in h.host                               # waiting, not refused
    h.advance(0.2)
    assert r in h.host and h.host[r].error is None and g.throttled == 1
    g.link_up = False                                    # nothing drains: no use slowing the host
    assert g.throttle_s() == 0.0
    assert g.batch_bytes() <= cap // 8                   # space comes back in small steps
