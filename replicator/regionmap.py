"""A region map: one bit per fixed-size area of a volume (SPEC 3: diff_bitmap, migrated_bitmap).

Raw bit indices never leave this class: callers speak in byte ranges and region
numbers. A map may be backed by a file; setting a bit writes just the byte that
holds it before returning (so a dirty bit is durable before the write it covers
is acknowledged), clearing writes it too. Layout: 32-byte header, then the bits.
"""
from __future__ import annotations

import os
import struct
import threading
from pathlib import Path
from typing import Iterator

from bitarray import bitarray

from .errors import IntegrityError

MAGIC = b"RCBM"
_HEADER = struct.Struct("<4sIQQQ")  # magic, version, nregions, region_bytes, size_bytes
HEADER_BYTES = 32
DEFAULT_REGION_BYTES = 1 << 20


class RegionMap:
    """Bits over the regions of a volume of ``size_bytes``, optionally persisted at ``path``."""

    def __init__(self, size_bytes: int, region_bytes: int = DEFAULT_REGION_BYTES,
                 path: Path | None = None) -> None:
        self.size_bytes = size_bytes
        self.region_bytes = region_bytes
        self.nregions = max(1, -(-size_bytes // region_bytes))
        self.path = path
        self._fd: int | None = None
        self._write_lock = threading.Lock()  # a bit change and its byte on disk, one at a time
        self.bits = bitarray(self.nregions, endian="little")
        self.bits.setall(False)
        if path is not None:
            if path.exists():
                self._load(path)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            self._write_all()

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

    def all_set_in(self, offset: int, length: int) -> bool:
        r = self.regions(offset, length)
        return self.bits[r.start:r.stop].all()

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
        return sum(self.extent(r)[1] for r in self.iter_set())

    # -- updates ---------------------------------------------------------
    def set_range(self, offset: int, length: int) -> bool:
        """Set the bits covering a byte range; True if any bit changed."""
        r = self.regions(offset, length)
        with self._write_lock:
            if self.bits[r.start:r.stop].all():
                return False
            self.bits[r.start:r.stop] = True
            self._write_bytes(r.start // 8, (r.stop - 1) // 8 + 1)
            return True

    def set(self, region: int) -> None:
        self._put(region, True)

    def clear(self, region: int) -> None:
        self._put(region, False)

    def _put(self, region: int, value: bool) -> None:
        with self._write_lock:
            if self.bits[region] != value:
                self.bits[region] = value
                self._write_bytes(region // 8, region // 8 + 1)

    def set_all(self) -> None:
        with self._write_lock:
            self.bits.setall(True)
            self._write_all()

    def clear_all(self) -> None:
        with self._write_lock:
            self.bits.setall(False)
            self._write_all()

    def merge(self, other_bytes: bytes) -> None:
        """OR in a map of the same geometry given as ``to_bytes()``."""
        other = bitarray(endian="little")
        other.frombytes(other_bytes)
        del other[self.nregions:]
        if len(other) != self.nregions:
            raise IntegrityError("bitmap of a different size")
        with self._write_lock:
            self.bits |= other
            self._write_all()

    def to_bytes(self) -> bytes:
        return self.bits.tobytes()

    def sync(self) -> None:
        if self._fd is not None:
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- persistence -----------------------------------------------------
    def _header(self) -> bytes:
        return _HEADER.pack(MAGIC, 1, self.nregions, self.region_bytes, self.size_bytes).ljust(HEADER_BYTES, b"\0")

    def _write_all(self) -> None:
        if self._fd is not None:
            os.pwrite(self._fd, self._header() + self.bits.tobytes(), 0)

    def _write_bytes(self, start: int, stop: int) -> None:
        if self._fd is not None:
            os.pwrite(self._fd, self.bits[start * 8:stop * 8].tobytes(), HEADER_BYTES + start)

    def _load(self, path: Path) -> None:
        raw = path.read_bytes()
        if len(raw) < HEADER_BYTES:
            raise IntegrityError(f"bitmap {path} is truncated ({len(raw)} bytes)")
        magic, version, nregions, region_bytes, size_bytes = _HEADER.unpack_from(raw)
        if magic != MAGIC or version != 1:
            raise IntegrityError(f"bitmap {path} has a bad header")
        if (nregions, region_bytes, size_bytes) != (self.nregions, self.region_bytes, self.size_bytes):
            raise IntegrityError(f"bitmap {path} has a different geometry")
        body = raw[HEADER_BYTES:]
        if len(body) < (nregions + 7) // 8:
            raise IntegrityError(f"bitmap {path} is truncated")
        self.bits = bitarray(endian="little")
        self.bits.frombytes(body[: (nregions + 7) // 8])
        del self.bits[nregions:]


class RegionCursor:
    """Hands out the clear regions of a map to several copy streams, each to one stream at a time.

    Sweeps forward and wraps around until every bit is set; a stream gives its region
    back with ``release`` (after setting the bit, or to leave it for a later sweep).
    """

    def __init__(self, bits: RegionMap) -> None:
        self.map = bits
        self._next = 0
        self._taken: set[int] = set()
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """The next clear region nobody holds, or None when there is none."""
        with self._lock:
            for start in (self._next, 0):
                region = self._first_free(start)
                if region is not None:
                    self._taken.add(region)
                    self._next = region + 1
                    return region
            return None

    def release(self, region: int) -> None:
        with self._lock:
            self._taken.discard(region)

    def _first_free(self, start: int) -> int | None:
        while start < self.map.nregions:
            region = self.map.first_clear(start)
            if region is None or region not in self._taken:
                return region
            start = region + 1
        return None
