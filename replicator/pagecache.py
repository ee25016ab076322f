"""Small writes to the page cache that keep the GIL.

``os.pwrite`` and ``os.pwritev`` release the GIL for every call. For a write of a few KiB into
the page cache (a few microseconds) that is a loss when other threads of the process want the
GIL, as a node's nbdkit threads do under load: each release hands the GIL to one of them, and
the writer then sleeps until it gets it back, two context switches per write, dearer on these
machines than the write itself (a node under the host path's 4 KiB random writes: 11.7 -> 7.2
context switches and about a fifth less CPU per replicated write; docs/BENCHMARKS.md). Writes up
to ``SMALL_BYTES`` go through libc's pwrite called with ``ctypes.PyDLL``, which keeps the GIL;
larger ones through ``os.pwrite``. The bytes, the file and the durability are the same (this is
the same system call); a write the kernel throttles (dirty page limits) holds the process's other
Python threads for as long.
"""
from __future__ import annotations

import ctypes
import errno
import os
from typing import Sequence

SMALL_BYTES = 64 * 1024

_libc = ctypes.PyDLL(None, use_errno=True)      # PyDLL: the call keeps the GIL
_pwrite = _libc.pwrite
_pwrite.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_longlong]
_pwrite.restype = ctypes.c_ssize_t


def pwrite(fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
    """``os.pwrite``: bytes written (possibly fewer), or OSError."""
    if len(data) > SMALL_BYTES:
        return os.pwrite(fd, data, offset)
    if type(data) is not bytes:
        data = bytes(data)
    while True:
        n = _pwrite(fd, data, len(data), offset)
        if n >= 0:
            return n
        code = ctypes.get_errno()
        if code != errno.EINTR:
            raise OSError(code, os.strerror(code))


def pwritev(fd: int, buffers: Sequence[bytes | memoryview], offset: int, total: int | None = None) -> int:
    """``os.pwritev``; a small total (of ``buffers``' lengths) as one joined pwrite that keeps the GIL."""
    if (sum(map(len, buffers)) if total is None else total) > SMALL_BYTES:
        return os.pwritev(fd, buffers, offset)
    return pwrite(fd, b"".join(buffers), offset)
