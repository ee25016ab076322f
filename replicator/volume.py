"""A volume image on disk: a sparse file with range checks.

This is the node's "normal cache area" (SPEC 2.4): plain pread/pwrite on a file;
NBD flush and FUA become fdatasync. No replication logic here.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import pagecache
from .errors import IOErrorRange

_ZEROS = bytes(1 << 20)


def is_zeros(data: bytes | memoryview) -> bool:
    """True if every byte of ``data`` is zero: a memcmp against a zero buffer, no copy (about
    30 us per MiB of zeros, under 1 us for data that is not zero near its start)."""
    view = memoryview(data).cast("B")
    step = len(_ZEROS)
    return all(_ZEROS.startswith(view[i:i + step]) for i in range(0, len(view), step))


class VolumeStore:
    """The bytes of one volume, kept in ``path`` (created sparse)."""

    def __init__(self, path: Path, size: int, create: bool = False) -> None:
        self.path = path
        self.size = size
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        self.fd = os.open(path, flags, 0o644)
        if create:
            os.ftruncate(self.fd, size)

    def check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise IOErrorRange(f"I/O at offset {offset} length {length} is outside the "
                               f"volume ({self.size} bytes)")

    def read(self, offset: int, length: int) -> bytes:
        self.check(offset, length)
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # reading past a short file: zeros
            data += bytes(length - len(data))
        return data

    def read_sparse(self, offset: int, length: int) -> bytes | None:
        """The bytes, or None if the range reads as zeros (a hole, or data that is all zero)."""
        if self.is_hole(offset, length):
            return None
        data = self.read(offset, length)
        return None if is_zeros(data) else data

    def write(self, offset: int, data: bytes | memoryview, keep_gil: bool = True) -> None:
        """``keep_gil``: a small write keeps the GIL (pagecache.py), right while the caller holds
        a lock other threads wait for; without it every write releases the GIL (os.pwrite)."""
        self.check(offset, len(data))
        n = (pagecache.pwrite if keep_gil else os.pwrite)(self.fd, data, offset)
        if n == len(data):
            return
        view = memoryview(data)[n:]
        offset += n
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def zero(self, offset: int, length: int) -> None:
        self.check(offset, length)
        punch_hole(self.fd, offset, length)

    def is_hole(self, offset: int, length: int) -> bool:
        """True if [offset, offset+length) holds no data (sparse), so it reads as zeros."""
        try:
            nxt = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after offset
            return True
        return nxt >= offset + length

    def hole_run(self, offset: int, length: int) -> int:
        """Bytes from ``offset`` on (at most ``length``) that hold no data: one SEEK_DATA."""
        try:
            nxt = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after offset
            return length
        return max(0, min(nxt - offset, length))

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        """(length, hole) runs from ``offset`` on, up to ``length`` bytes and ``limit`` runs."""
        end = min(self.size, offset + length)
        out: list[tuple[int, bool]] = []
        while offset < end and len(out) < limit:
            data = offset + self.hole_run(offset, end - offset)
            if data > offset:
                out.append((data - offset, True))
            else:
                data = min(end, os.lseek(self.fd, offset, os.SEEK_HOLE))
                out.append((data - offset, False))
            offset = data
        return out

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


_libc = None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a byte range so it reads as zeros (falls back to writing zeros)."""
    global _libc
    import ctypes
    import ctypes.util
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
    if _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, length) != 0:
        zeros = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            os.pwrite(fd, zeros[:n], offset)
            offset += n
