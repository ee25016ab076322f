"""One journal entry and its on-disk record: pure encode/decode, no I/O (SPEC 5.2).

The record layout is in journal/FORMAT.md: a 40-byte header (magic, version,
type, flags, epoch, seq, volume id, offset, length, crc32) followed by the data.
Space management lives in ring.py; this module only turns fields into bytes
and back, and refuses bytes that are not a valid record.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zlib_ng.zlib_ng import crc32     # zlib's CRC-32, computed with the CPU's carry-less multiply (6x zlib's)

from replicator.errors import IntegrityError

if TYPE_CHECKING:
    from replicator.core.effects import Zeros

MAGIC = b"RCJE"
VERSION = 1
ENTRY = 1
WRAP = 2
ZERO = 3                       # a TRIM / WRITE_ZEROES: its data is the zeroed length (u64), no payload
_ZERO_DATA = struct.Struct("<Q")
ZERO_DATA_BYTES = _ZERO_DATA.size
_HEADER = struct.Struct("<4sBBHIQIQII")  # magic version type flags epoch seq volume offset length crc
HEADER_SIZE = _HEADER.size  # 40
_CRC_AT = HEADER_SIZE - 4   # the crc covers the header bytes before it, then the data
_HEAD = struct.Struct("<4sBBHIQIQI")     # the header up to the crc
_CRC = struct.Struct("<I")
_TYPES = (ENTRY, WRAP, ZERO)

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
MAX_DATA_BYTES = U32_MAX

assert HEADER_SIZE == 40 and _HEAD.size == _CRC_AT


class CorruptEntry(IntegrityError):
    """Bytes that are not a valid journal record (bad magic, version, length or crc)."""


@dataclass(frozen=True)
class Entry:
    """One stored host write: its sequence number, where it went and what was written."""

    seq: int
    volume: str
    offset: int
    data: bytes | memoryview | Zeros   # Zeros for a ZERO record (a TRIM or WRITE_ZEROES)


@dataclass(frozen=True)
class Header:
    """The decoded fixed part of a record."""

    type: int
    epoch: int
    seq: int
    volume_id: int
    offset: int
    length: int
    crc: int

    @property
    def record_bytes(self) -> int:
        """Header plus data: the bytes the record occupies on disk."""
        return HEADER_SIZE + self.length


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"journal record field {name}={value} outside {low}..{high}")


def encode_header(seq: int, volume_id: int, offset: int, data: bytes | memoryview,
                  *, epoch: int = 0, type: int = ENTRY) -> bytes:
    """The header of a record holding ``data``; write it followed by ``data``."""
    if seq < 1 or volume_id < (0 if type == WRAP else 1) or type not in _TYPES:
        _check_fields(seq, volume_id, offset, len(data), epoch, type)
    try:
        head = _HEAD.pack(MAGIC, VERSION, type, 0, epoch, seq, volume_id, offset, len(data))
    except struct.error:        # a field out of range: say which
        _check_fields(seq, volume_id, offset, len(data), epoch, type)
        raise
    return head + _CRC.pack(crc32(data, crc32(head)))


def _check_fields(seq: int, volume_id: int, offset: int, length: int, epoch: int, type: int) -> None:
    _check_range("seq", seq, 1, U64_MAX)
    _check_range("volume_id", volume_id, 0 if type == WRAP else 1, U32_MAX)
    _check_range("offset", offset, 0, U64_MAX)
    _check_range("length", length, 0, MAX_DATA_BYTES)
    _check_range("epoch", epoch, 0, U32_MAX)
    if type not in _TYPES:
        raise ValueError(f"unknown journal record type {type}")


def encode(seq: int, volume_id: int, offset: int, data: bytes, *, epoch: int = 0) -> bytes:
    """A whole ENTRY record: header then data."""
    return encode_header(seq, volume_id, offset, data, epoch=epoch) + bytes(data)


def zero_data(length: int) -> bytes:
    """The data of a ZERO record: the length of the range that reads as zeros."""
    _check_range("zeroed length", length, 1, U64_MAX)
    return _ZERO_DATA.pack(length)


def zeroed_length(data: bytes | memoryview) -> int:
    """The range length a ZERO record's data names."""
    if len(data) != ZERO_DATA_BYTES:
        raise CorruptEntry(f"journal zero record with {len(data)} data bytes")
    return int(_ZERO_DATA.unpack(data)[0])


def encode_wrap(seq: int, *, epoch: int = 0) -> bytes:
    """A WRAP marker: "the record numbered ``seq`` is at byte 0"."""
    return encode_header(seq, 0, 0, b"", epoch=epoch, type=WRAP)


def decode_header(buf: bytes | memoryview) -> Header:
    """Parse and sanity-check a header (not its crc, which needs the data)."""
    if len(buf) < HEADER_SIZE:
        raise CorruptEntry(f"journal record truncated: {len(buf)} of {HEADER_SIZE} header bytes")
    magic, version, rtype, flags, epoch, seq, volume_id, offset, length, crc = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise CorruptEntry(f"bad journal record magic {bytes(magic)!r}")
    if version != VERSION:
        raise CorruptEntry(f"unsupported journal record version {version}")
    if rtype not in (ENTRY, WRAP, ZERO) or flags != 0:
        raise CorruptEntry(f"bad journal record type {rtype} / flags {flags:#x}")
    if seq == 0:
        raise CorruptEntry("journal record with sequence number 0")
    if rtype == WRAP and (length or volume_id or offset):
        raise CorruptEntry(f"journal wrap marker {seq} carries data fields")
    if rtype == ZERO and length != ZERO_DATA_BYTES:
        raise CorruptEntry(f"journal zero record {seq} with {length} data bytes")
    return Header(rtype, epoch, seq, volume_id, offset, length, crc)


def decode(buf: bytes | memoryview) -> tuple[Header, memoryview]:
    """Parse a whole record at the start of ``buf``; return its header and a view of its data.

    Raises CorruptEntry for a bad header, a record longer than ``buf`` (torn) or a
    crc mismatch. Bytes after the record are ignored.
    """
    view = memoryview(buf).cast("B")
    header = decode_header(view)
    if len(view) < header.record_bytes:
        raise CorruptEntry(f"journal record {header.seq} torn: {len(view) - HEADER_SIZE} "
                           f"of {header.length} data bytes")
    data = view[HEADER_SIZE:header.record_bytes]
    crc = crc32(data, crc32(view[:_CRC_AT]))
    if crc != header.crc:
        raise CorruptEntry(f"journal record {header.seq}: crc {crc:#010x} != stored {header.crc:#010x}")
    return header, data
