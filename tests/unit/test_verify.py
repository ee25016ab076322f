"""The secondary's change log of online verify (core/verify.py)."""
from __future__ import annotations

from replicator.core.verify import INF, ChangeLog


def test_a_chunk_changed_after_the_point_is_busy_and_the_log_forgets_what_is_older() -> None:
    log = ChangeLog(1024)
    log.note(0.0, "v", 0, 512, 5)                 # not started: nothing kept
    assert log.last == {}
    log.start(1.0, 10.0, floor=7)
    log.note(1.0, "v", 1000, 100, 9)              # chunks 0 and 1
    log.note(1.0, "v", 4096, 10, INF)             # a copy: always newer
    assert log.changed_after("v", 0, 5, 8) == [True, True, False, False, True]
    assert log.changed_after("v", 0, 2, 9) == [False, False]
    assert log.changed_after("v", 0, 1, 6) == [True]          # below the floor: not known
    log.forget_through(9)
    assert log.last == {("v", 4): INF} and log.floor == 9
    log.note(20.0, "v", 0, 1, 12)                 # expired: cleared
    assert log.last == {}
