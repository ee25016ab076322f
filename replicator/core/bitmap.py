"""A region map: one bit per fixed-size area of a volume (SPEC 3: diff_bitmap, migrated_bitmap).

Raw bit indices never leave this class: callers speak in byte ranges and region
numbers. Pure: every change returns the bytes of the bit array it touched
(``Change``), which the core persists with a ``BitmapPut`` effect. The on-disk
layout (a 32-byte header, then these bytes) is the driver's business.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from bitarray import bitarray

from ..errors import IntegrityError


@dataclass(frozen=True, slots=True)
class Change:
    """Bytes ``first`` .. ``first + len(data)`` of the bit array, after a change."""

    first: int
    data: bytes


class Bitmap:
    """Bits over the regions of a volume of ``size_bytes``."""

    def __init__(self, size_bytes: int, region_bytes: int, raw: bytes | None = None) -> None:
        self.size_bytes = size_bytes
        self.region_bytes = region_bytes
        self.nregions = max(1, -(-size_bytes // region_bytes))
        self.bits = bitarray(self.nregions, endian="little")
        self.bits.setall(False)
        if raw is not None:
            self.load(raw)

    # -- queries ---------------------------------------------------------
    def regions(self, offset: int, length: int) -> range:
        """Region numbers touched by the byte range [offset, offset+length)."""
        if length <= 0:
            return range(0)
        return range(offset // self.region_bytes, (offset + length - 1) // self.region_bytes + 1)

    def extent(self, region: int) -> tuple[int, int]:
        """(offset, length) in bytes of one region (the last may be short)."""
        start = region * self.region_bytes
        return start, min(self.region_bytes, self.size_bytes - start)

    def is_set(self, region: int) -> bool:
        return bool(self.bits[region])

    def any_set(self, offset: int, length: int) -> bool:
        r = self.regions(offset, length)
        return r.stop > r.start and self.bits[r.start:r.stop].any()

    def count(self) -> int:
        return self.bits.count(1)

    def fraction_set(self) -> float:
        return self.count() / self.nregions

    def all_set(self) -> bool:
        return self.bits.all()

    def first_set(self, start: int = 0) -> int | None:
        try:
            return self.bits.index(True, start)
        except ValueError:
            return None

    def first_clear(self, start: int = 0) -> int | None:
        try:
            return self.bits.index(False, start)
        except ValueError:
            return None

    def iter_set(self) -> Iterator[int]:
        return self.bits.search(bitarray("1"))

    def dirty_bytes(self) -> int:
        n = self.count()
        if n and self.bits[self.nregions - 1]:
            return (n - 1) * self.region_bytes + self.extent(self.nregions - 1)[1]
        return n * self.region_bytes

    def to_bytes(self) -> bytes:
        return self.bits.tobytes()

    # -- updates (each returns what changed, or None) ---------------------
    def set_range(self, offset: int, length: int) -> Change | None:
        return self._put_run(self.regions(offset, length), True)

    def clear_regions(self, r: range) -> Change | None:
        return self._put_run(r, False)

    def set_regions(self, r: range) -> Change | None:
        return self._put_run(r, True)

    def _put_run(self, r: range, value: bool) -> Change | None:
        if r.stop <= r.start or self.bits[r.start:r.stop].count(value) == len(r):
            return None
        self.bits[r.start:r.stop] = value
        return self._bytes(r.start // 8, (r.stop - 1) // 8 + 1)

    def run(self, region: int, limit: int, value: bool = True) -> int:
        """How many regions from ``region`` on are ``value`` (set), one after the other (at most ``limit``)."""
        n = 0
        while n < limit and region + n < self.nregions and self.bits[region + n] == value:
            n += 1
        return n

    def set(self, region: int) -> Change | None:
        return self._put(region, True)

    def clear(self, region: int) -> Change | None:
        return self._put(region, False)

    def set_all(self) -> Change:
        self.bits.setall(True)
        return Change(0, self.to_bytes())

    def clear_all(self) -> Change:
        self.bits.setall(False)
        return Change(0, self.to_bytes())

    def merge(self, other: bytes) -> Change:
        """OR in a map of the same geometry given as ``to_bytes()``."""
        o = bitarray(endian="little")
        o.frombytes(other)
        del o[self.nregions:]
        if len(o) != self.nregions:
            raise IntegrityError(f"bitmap of {len(o)} regions merged into one of {self.nregions}")
        self.bits |= o
        return Change(0, self.to_bytes())

    def load(self, raw: bytes) -> None:
        if len(raw) < (self.nregions + 7) // 8:
            raise IntegrityError(f"bitmap of {len(raw)} bytes for {self.nregions} regions")
        self.bits = bitarray(endian="little")
        self.bits.frombytes(raw[: (self.nregions + 7) // 8])
        del self.bits[self.nregions:]

    def _put(self, region: int, value: bool) -> Change | None:
        if self.bits[region] == value:
            return None
        self.bits[region] = value
        return self._bytes(region // 8, region // 8 + 1)

    def _bytes(self, start: int, stop: int) -> Change:
        return Change(start, self.bits[start * 8:stop * 8].tobytes())
