"""Durability as the core sees it: group commit of syncs, and bitmaps persisted in order.

* ``Syncer``: "make every write completed so far durable". One sync effect is in
  flight per file; callers that arrive meanwhile wait for the next one, which
  covers them all (group commit).
* ``BitmapFile``: a Bitmap plus its file. Changes are written in the order they
  were made, one ``BitmapPut`` at a time (two concurrent puts of the same byte
  could otherwise land in the wrong order); ``persist(sync=True)`` returns once
  the bits as they are now are durable.
"""
from __future__ import annotations

from typing import Any, Callable, Generator

from .bitmap import Bitmap, Change, DiffMap
from .effects import BitmapPut, BitmapSync, Effect
from .runtime import Runtime, Wait


class Syncer:
    """Coalesces durability requests for one file."""

    def __init__(self, rt: Runtime, key: Any, make: Callable[[], Effect]) -> None:
        self.rt, self.key, self.make = rt, key, make
        self.written = 0    # bumped after each completed write to the file
        self.synced = 0     # every write counted up to this value is durable
        self.busy = False
        self.syncs = 0

    def wrote(self) -> None:
        self.written += 1

    def sync(self) -> Generator[Any, Any, None]:
        target = self.written
        while self.synced < target:
            if self.busy:
                yield Wait(self.key)
                continue
            self.busy, covered = True, self.written
            try:
                yield self.make()
                self.synced = max(self.synced, covered)
                self.syncs += 1
            finally:
                self.busy = False
                self.rt.notify(self.key)


class BitmapFile:
    """A persisted region map (diff, migrated or activity) of one volume."""

    def __init__(self, rt: Runtime, volume: str, kind: str, bits: Bitmap | DiffMap) -> None:
        self.rt, self.volume, self.kind, self.bits = rt, volume, kind, bits
        self.version = 0          # bumped by every change
        self.written = 0          # changes up to this version are in the file (page cache)
        self._lo: int | None = None
        self._hi = 0
        self._busy = False
        self.syncer = Syncer(rt, ("bitmap-sync", volume, kind), lambda: BitmapSync(volume, kind))

    @property
    def durable(self) -> bool:
        """Is every change noted so far written to the file and synced?"""
        return self.written >= self.version and self.syncer.synced >= self.syncer.written

    def note(self, change: Change | None) -> bool:
        """Record a change made to ``bits``; True if something changed."""
        if change is None:
            return False
        self.version += 1
        self._lo = change.first if self._lo is None else min(self._lo, change.first)
        self._hi = max(self._hi, change.stop)
        return True

    def persist(self, sync: bool = False) -> Generator[Any, Any, None]:
        """Write every change made so far (and with ``sync``, make it durable)."""
        target = self.version
        key = ("bitmap-put", self.volume, self.kind)
        while self.written < target:
            if self._busy:
                yield Wait(key)
                continue
            self._busy = True
            covered, lo, hi = self.version, self._lo or 0, self._hi
            self._lo, self._hi = None, 0
            try:
                yield BitmapPut(self.volume, self.kind, lo, self.bits.bytes_at(lo, hi))
                self.written = max(self.written, covered)
                self.syncer.wrote()
            except BaseException:
                self._lo = lo if self._lo is None else min(lo, self._lo)
                self._hi = max(hi, self._hi)
                raise
            finally:
                self._busy = False
                self.rt.notify(key)
        if sync:
            yield from self.syncer.sync()

    def update(self, change: Change | None, sync: bool = False) -> Generator[Any, Any, bool]:
        """Note a change and persist it; True if anything changed."""
        if not self.note(change):
            return False
        yield from self.persist(sync)
        return True
