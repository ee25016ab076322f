"""How a write's data travels in a message: bytes as a frame, a zeroing (``Zeros``) as a
length with an empty frame, so TRIM and WRITE_ZEROES cost no payload on the wire."""
from __future__ import annotations

from typing import Any, Sequence

from ..errors import ProtocolError
from .effects import JEntry, Zeros

ZERO_MARK = "z"


def entry_frames(entries: Sequence[JEntry]) -> tuple[list[list[Any]], list[Any]]:
    """Journal entries as [seq, volume, offset, length] (a zeroing adds ``"z"``) and their frames."""
    metas = [[e.seq, e.volume, e.offset, len(e.data)] + ([ZERO_MARK] if isinstance(e.data, Zeros) else [])
             for e in entries]
    return metas, [b"" if isinstance(e.data, Zeros) else e.data for e in entries]


def entry_data(meta: Sequence[Any], frame: Any, seq: int, length: int) -> bytes | memoryview | Zeros:
    """The data of one received journal entry, checked against its length."""
    if len(meta) > 4 and meta[4] == ZERO_MARK:
        if len(frame) or length <= 0:
            raise ProtocolError(f"journal entry {seq}: a zeroing of {length} bytes carries {len(frame)} bytes")
        return Zeros(length)
    if length != len(frame):
        raise ProtocolError(f"journal entry {seq}: length {length} but {len(frame)} bytes")
    return frame


def write_fields(data: bytes | memoryview | Zeros) -> tuple[dict[str, Any], list[Any]]:
    """One write for a request: its frame, or ``zero=length`` and none."""
    if isinstance(data, Zeros):
        return {"zero": data.length}, []
    return {}, [data]


def write_data(fields: Any, payloads: list[Any], what: str) -> bytes | memoryview | Zeros:
    """The write a request carries (``write_fields`` at the other end)."""
    zero = int(fields.get("zero") or 0)
    if zero:
        if zero < 0 or payloads:
            raise ProtocolError(f"{what}: a zeroing of {zero} bytes with data")
        return Zeros(zero)
    if not payloads:
        raise ProtocolError(f"{what} without data")
    return payloads[0]
