"""Region maps: one bit per fixed-size area of a volume (SPEC 3: diff_bitmap, migrated_bitmap).

* ``Bitmap``: one bit per region (1 MiB): migrated_bitmap and the activity log.
* ``DiffMap``: diff_bitmap, one bit per block (4 KiB by default, as DRBD), with a
  summary of one bit per region in memory, so a resync finds its next dirty region
  by scanning 128 KiB for a 1 TiB volume, not the 32 MiB of block bits.

Raw bit indices never leave these classes: callers speak in byte ranges and region
numbers. Pure: every change says which bytes of the bit array it touched
(``Change``), which the core persists with a ``BitmapPut`` effect. The on-disk
layout (a 32-byte header, then these bytes) is the driver's business.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterator

from bitarray import bitarray

from ..errors import IntegrityError, UsageError


@dataclass(frozen=True, slots=True)
class Change:
    """Bytes ``first`` .. ``stop`` of the bit array changed (``bytes_at`` reads them)."""

    first: int
    stop: int


class Bitmap:
    """Bits over the regions of a volume of ``size_bytes``."""

    def __init__(self, size_bytes: int, region_bytes: int, raw: bytes | None = None) -> None:
        self.size_bytes = size_bytes
        self.region_bytes = region_bytes
        self.nregions = max(1, -(-size_bytes // region_bytes))
        self.bits = bitarray(self.nregions, endian="little")
        self.bits.setall(False)
        self._count = 0          # bits set: kept up to date, so status need not count 256M bits
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
        return self._count

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

    def ranges(self, first: int = 0, stop: int | None = None) -> Iterator[tuple[int, int]]:
        """(offset, length) in bytes of each run of set bits among bits ``first`` .. ``stop``."""
        stop = self.nregions if stop is None else min(stop, self.nregions)
        bits = self.bits
        while first < stop:
            try:
                first = bits.index(True, first, stop)
            except ValueError:
                return
            try:
                end = bits.index(False, first, stop)
            except ValueError:
                end = stop
            offset = first * self.region_bytes
            yield offset, min(self.size_bytes, end * self.region_bytes) - offset
            first = end

    def to_bytes(self) -> bytes:
        return self.bits.tobytes()

    def bytes_at(self, start: int, stop: int) -> bytes:
        """Bytes ``start`` .. ``stop`` of ``to_bytes()``, without copying the rest."""
        return self.bits[start * 8:stop * 8].tobytes()

    # -- updates (each returns what changed, or None) ---------------------
    def set_range(self, offset: int, length: int) -> Change | None:
        return self._put_run(self.regions(offset, length), True)

    def clear_regions(self, r: range) -> Change | None:
        return self._put_run(r, False)

    def set_regions(self, r: range) -> Change | None:
        return self._put_run(r, True)

    def _put_run(self, r: range, value: bool) -> Change | None:
        already = self.bits[r.start:r.stop].count(value) if r.stop > r.start else 0
        if already == len(r):
            return None
        self.bits[r.start:r.stop] = value
        self._count += (len(r) - already) * (1 if value else -1)
        return self._bytes(r.start // 8, (r.stop - 1) // 8 + 1)

    def run(self, region: int, limit: int, value: bool = True) -> int:
        """How many regions from ``region`` on are ``value`` (set), one after the other (at most ``limit``)."""
        stop = min(self.nregions, region + limit)
        other = self.bits.find(not value, region, stop)    # -1: none (no exception on the hot path)
        return other - region if other >= 0 else max(0, stop - region)

    def set(self, region: int) -> Change | None:
        return self._put(region, True)

    def clear(self, region: int) -> Change | None:
        return self._put(region, False)

    def set_all(self) -> Change:
        self.bits.setall(True)
        self._count = self.nregions
        return Change(0, (self.nregions + 7) // 8)

    def clear_all(self) -> Change:
        self.bits.setall(False)
        self._count = 0
        return Change(0, (self.nregions + 7) // 8)

    def merge(self, other: bytes) -> Change:
        """OR in a map of the same geometry given as ``to_bytes()``."""
        if len(other) != (self.nregions + 7) // 8:
            raise IntegrityError(f"a bitmap of {len(other)} bytes merged into one of {self.nregions} bits")
        o = bitarray(endian="little")
        o.frombytes(other)
        del o[self.nregions:]
        self.bits |= o
        self._count = self.bits.count(1)
        return Change(0, (self.nregions + 7) // 8)

    def load(self, raw: bytes) -> None:
        if len(raw) < (self.nregions + 7) // 8:
            raise IntegrityError(f"bitmap of {len(raw)} bytes for {self.nregions} regions")
        self.bits = bitarray(endian="little")
        self.bits.frombytes(raw[: (self.nregions + 7) // 8])
        del self.bits[self.nregions:]
        self._count = self.bits.count(1)

    def _put(self, region: int, value: bool) -> Change | None:
        if self.bits[region] == value:
            return None
        self.bits[region] = value
        self._count += 1 if value else -1
        return self._bytes(region // 8, region // 8 + 1)

    def _bytes(self, start: int, stop: int) -> Change:
        return Change(start, stop)


class DiffMap:
    """diff_bitmap: bits over blocks of ``block_bytes``, queried by region like a ``Bitmap``.

    ``first_set``, ``is_set``, ``run`` and ``clear_regions`` speak of regions (a region is
    set when any of its blocks is), so the copier still walks region by region under the
    region locks; ``runs`` says which blocks of a region to copy. Only the block bits are
    persisted (``to_bytes``, ``Change``); the region summary is derived from them.
    """

    def __init__(self, size_bytes: int, region_bytes: int, block_bytes: int, raw: bytes | None = None) -> None:
        if block_bytes <= 0 or region_bytes % block_bytes:
            raise UsageError(f"a diff block of {block_bytes} bytes does not divide a region of {region_bytes}")
        self.size_bytes, self.region_bytes, self.block_bytes = size_bytes, region_bytes, block_bytes
        self.blocks = Bitmap(size_bytes, block_bytes, raw)
        self.summary = Bitmap(size_bytes, region_bytes)
        self.nregions = self.summary.nregions
        self._per_region = region_bytes // block_bytes
        self._summarise()

    # -- queries: regions ------------------------------------------------
    def regions(self, offset: int, length: int) -> range:
        return self.summary.regions(offset, length)

    def extent(self, region: int) -> tuple[int, int]:
        return self.summary.extent(region)

    def is_set(self, region: int) -> bool:
        return self.summary.is_set(region)

    def first_set(self, start: int = 0) -> int | None:
        return self.summary.first_set(start)

    def run(self, region: int, limit: int) -> int:
        return self.summary.run(region, limit)

    def runs(self, region: int) -> list[tuple[int, int]]:
        """(offset, length) in bytes of each run of dirty blocks in ``region``."""
        return list(self.blocks.ranges(region * self._per_region, (region + 1) * self._per_region))

    # -- queries: bytes --------------------------------------------------
    def any_set(self, offset: int, length: int) -> bool:
        return self.blocks._count != 0 and self.blocks.any_set(offset, length)

    def count(self) -> int:
        """Dirty blocks."""
        return self.blocks.count()

    def dirty_bytes(self) -> int:
        return self.blocks.dirty_bytes()

    def ranges(self) -> Iterator[tuple[int, int]]:
        return self.blocks.ranges()

    def to_bytes(self) -> bytes:
        return self.blocks.to_bytes()

    def bytes_at(self, start: int, stop: int) -> bytes:
        return self.blocks.bytes_at(start, stop)

    # -- updates (each returns what changed in the block bits, or None) ----
    def set_range(self, offset: int, length: int) -> Change | None:
        change = self.blocks.set_range(offset, length)
        if change is not None:
            self.summary.set_range(offset, length)
        return change

    def clear_ranges(self, ranges: list[tuple[int, int]]) -> Change | None:
        """Clear the blocks of byte ranges (the runs a copy sent): one change over them all."""
        changes = []
        for offset, length in ranges:
            changes.append(self.blocks.clear_regions(self.blocks.regions(offset, length)))
            r = self.regions(offset, length)
            self.summary.clear_regions(r)           # regions wholly inside are clean now; the
            self._summarise(range(r.start, r.start + 1))            # two at the edges: look
            self._summarise(range(r.stop - 1, r.stop))
        return self._joined(changes)

    def clear_regions(self, r: range) -> Change | None:
        if not len(r):
            return None
        start = self.extent(r.start)[0]
        last, length = self.extent(r.stop - 1)
        return self.clear_ranges([(start, last + length - start)])

    def cover(self, other: "Bitmap | DiffMap") -> Change | None:
        """Set every byte range ``other`` marks, whatever its geometry (the activity log, or a
        diff_bitmap of another block size): one change over them all."""
        return self._joined([self.set_range(offset, length) for offset, length in other.ranges()])

    def _joined(self, changes: list[Change | None]) -> Change | None:
        """One change over the bytes of several."""
        spans = [c for c in changes if c is not None]
        if not spans:
            return None
        return Change(min(c.first for c in spans), max(c.stop for c in spans))

    def set_all(self) -> Change:
        self.summary.set_all()
        return self.blocks.set_all()

    def clear_all(self) -> Change:
        self.summary.clear_all()
        return self.blocks.clear_all()

    def merge(self, other: bytes, block_bytes: int) -> Change:
        """OR in a diff_bitmap given as ``to_bytes()`` of blocks of ``block_bytes``; another block
        size is refused, never guessed at."""
        if block_bytes != self.block_bytes:
            raise IntegrityError(f"a diff bitmap of {block_bytes}-byte blocks merged into one of "
                                 f"{self.block_bytes}-byte blocks")
        change = self.blocks.merge(other)
        self._summarise()
        return change

    def packed(self) -> bytes:
        """``to_bytes()`` compressed, for a message (the bits are mostly long runs of 0 or 1)."""
        return zlib.compress(self.to_bytes(), 1)

    def merge_packed(self, data: bytes, block_bytes: int) -> Change:
        """``merge`` of what ``packed`` made (never inflated past this map's size)."""
        nbytes = (self.blocks.nregions + 7) // 8
        try:
            raw = zlib.decompressobj().decompress(data, nbytes + 1)
        except zlib.error as exc:
            raise IntegrityError(f"a packed diff bitmap does not decompress: {exc}") from None
        return self.merge(raw, block_bytes)

    def load(self, raw: bytes) -> None:
        self.blocks.load(raw)
        self._summarise()

    def _summarise(self, regions: range | None = None) -> None:
        """Recompute the summary bits of ``regions`` (all: one scan that skips clean regions)."""
        per, blocks = self._per_region, self.blocks
        if regions is not None:
            for r in regions:
                if blocks.any_set(r * self.region_bytes, self.region_bytes):
                    self.summary.set(r)
                else:
                    self.summary.clear(r)
            return
        if blocks.all_set():
            self.summary.set_all()
            return
        self.summary.clear_all()
        block = blocks.first_set()
        while block is not None:
            region = block // per
            self.summary.set(region)
            block = blocks.first_set((region + 1) * per)
