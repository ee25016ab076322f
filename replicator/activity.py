"""The activity log of a synchronous primary: regions with a remote-copy write in flight.

A synchronous write is stored locally, then sent to the secondary. If the primary
dies between the two, the two copies differ in that region although the pair still
says ``duplex``. Like DRBD's activity log, the region's bit is made durable before
the write starts; after a restart every marked region is moved into diff_bitmap and
resynchronised. Bits of idle regions are cleared lazily (``retire_idle``), so a hot
region costs one bitmap write, not two per host write.
"""
from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

from .regionmap import RegionMap


class ActivityLog:
    """In-flight counts per region over a persisted region map."""

    def __init__(self, bitmap: RegionMap) -> None:
        self.map = bitmap
        self._busy: Counter[int] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def track(self, offset: int, length: int) -> Iterator[None]:
        """Mark the regions of a write as active (durably) for the duration of the block."""
        regions = self.map.regions(offset, length)
        with self._lock:
            for r in regions:
                self._busy[r] += 1
            self.map.set_range(offset, length)
        try:
            yield
        finally:
            with self._lock:
                for r in regions:
                    self._busy[r] -= 1
                    if not self._busy[r]:
                        del self._busy[r]

    def retire_idle(self) -> int:
        """Clear the bits of regions with no write in flight; returns how many were cleared."""
        with self._lock:
            idle = [r for r in self.map.iter_set() if r not in self._busy]
            for r in idle:
                self.map.clear(r)
        return len(idle)

    def move_to(self, diff: RegionMap) -> int:
        """At start-up (nothing in flight): mark the regions a crash left active in ``diff``
        (durably, first), then clear them here; returns how many there were."""
        with self._lock:
            regions = list(self.map.iter_set())
            for r in regions:
                diff.set(r)
            if regions:
                self.map.clear_all()
        return len(regions)
