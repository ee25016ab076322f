"""How a write's data travels in a message: bytes as a frame, a zeroing (``Zeros``) as a
length with an empty frame, so TRIM and WRITE_ZEROES cost no payload on the wire."""
from __future__ import annotations

from typing import Any, Sequence

from ..errors import ProtocolError
from .effects import JEntry, Zeros

ZERO_MARK = "z"


PACK_BELOW = 64 * 1024      # entries smaller than this travel packed in one frame (pyzmq copies small frames)


def entry_frames(entries: Sequence[JEntry]) -> tuple[list[list[Any]], list[Any], bool]:
    """Journal entries as [seq, volume, offset, length] (a zeroing adds ``"z"``), their frames, and
    whether the frames are packed: small entries go as one frame holding their data back to back
    (one frame per message instead of one per entry); a large one keeps a frame of its own, sent
    without a copy."""
    metas = [[e.seq, e.volume, e.offset, len(e.data)] + ([ZERO_MARK] if isinstance(e.data, Zeros) else [])
             for e in entries]
    frames = [b"" if isinstance(e.data, Zeros) else e.data for e in entries]
    if len(frames) > 1 and all(len(f) < PACK_BELOW for f in frames):
        return metas, [b"".join(frames)], True
    return metas, frames, False


def entry_payloads(metas: Any, payloads: list[Any], packed: Any) -> list[Any]:
    """The frame of each entry of a push or pull: ``payloads`` itself, or slices of a packed one."""
    if not packed:
        return payloads
    if not isinstance(metas, list) or len(payloads) != 1:
        raise ProtocolError(f"packed journal entries need one frame, got {len(payloads)}")
    view, pos, out = memoryview(payloads[0]), 0, []
    for meta in metas:
        try:
            n = 0 if len(meta) > 4 and meta[4] == ZERO_MARK else int(meta[3])
        except (TypeError, ValueError, IndexError):
            raise ProtocolError(f"malformed journal entry {meta!r}") from None
        if n < 0 or pos + n > len(view):
            raise ProtocolError(f"packed journal entries overrun their frame ({len(view)} bytes)")
        out.append(view[pos:pos + n])
        pos += n
    if pos != len(view):
        raise ProtocolError(f"packed journal entries leave {len(view) - pos} bytes of their frame")
    return out


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
