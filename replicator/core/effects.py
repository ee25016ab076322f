"""What the core asks its driver to do: storage I/O, messages, timers, host completions.

Every effect is a small record. Those a task yields (``Effect`` with an ``op`` id)
are completed by the driver with ``NodeCore.completed(op, result)``; the others
(``Reply``, ``HostDone``, ``Log``) need no answer. Effects yielded by one task
run one after the other; effects of different tasks may run concurrently, which
the core only allows where it is safe (region locks, one journal append at a time).

A driver may batch what it executes (one pwritev for a journal append of many
entries, one fdatasync for several VolSync of one volume): every effect says what
must be true when it completes, never how.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..wire import Message


@dataclass(slots=True, eq=False)
class Effect:
    """An effect a task waits for; ``op`` is set by the runtime."""

    op: int = field(default=0, init=False)


# ---------------------------------------------------------------------- volumes
@dataclass(frozen=True, slots=True)
class Zeros:
    """A TRIM or WRITE_ZEROES: the range reads as zeros afterwards. It goes where a write's data
    goes (journal, wire, apply), in the same order, as a command without payload."""

    length: int

    def __len__(self) -> int:
        return self.length


def put(volume: str, offset: int, data: "bytes | memoryview | Zeros") -> "VolWrite | VolZero":
    """The effect that stores a write or a zeroing (a punched hole) at ``offset``."""
    return VolZero(volume, offset, data.length) if isinstance(data, Zeros) else VolWrite(volume, offset, data)


@dataclass(slots=True, eq=False)
class VolRead(Effect):
    """Read bytes; with ``sparse``, None if the range reads as zeros (a hole, or allocated data
    that is all zero bytes: a copy sends it as a zero command, not a payload)."""

    volume: str
    offset: int
    length: int
    sparse: bool = False


@dataclass(slots=True, eq=False)
class VolWrite(Effect):
    """Write bytes (page cache: survives a process kill, not a power loss until VolSync)."""

    volume: str
    offset: int
    data: bytes | memoryview


@dataclass(slots=True, eq=False)
class VolWriteMany(Effect):
    """Write or zero several ranges, in order (a batch of journal entries applied at a secondary):
    one effect for the batch, whatever its length."""

    writes: list[tuple[str, int, "bytes | memoryview | Zeros"]]


@dataclass(slots=True, eq=False)
class VolHoleRun(Effect):
    """How many bytes from ``offset`` on (at most ``length``) hold no data (read as zeros)."""

    volume: str
    offset: int
    length: int


@dataclass(slots=True, eq=False)
class VolExtents(Effect):
    """NBD block status: (length, hole) runs from ``offset`` on, covering at most ``length``
    bytes and at most ``limit`` runs (SEEK_DATA / SEEK_HOLE of the volume file)."""

    volume: str
    offset: int
    length: int
    limit: int


@dataclass(slots=True, eq=False)
class VolZero(Effect):
    """Make a range read as zeros (punch a hole)."""

    volume: str
    offset: int
    length: int


@dataclass(slots=True, eq=False)
class VolSync(Effect):
    """Make every completed write of a volume durable (fdatasync)."""

    volume: str


@dataclass(slots=True, eq=False)
class VolHash(Effect):
    """Per-chunk digests of a volume, or of ``length`` bytes from ``offset`` ("0" for a chunk of zeros)."""

    volume: str
    chunk: int
    offset: int = 0
    length: int = -1                 # to the end of the volume


@dataclass(slots=True, eq=False)
class VolCreate(Effect):
    """A new volume and its bitmaps, durably; the diff bitmap has one bit per ``diff_block_bytes``."""

    volume: str
    size: int
    diff_block_bytes: int


@dataclass(slots=True, eq=False)
class VolDelete(Effect):
    volume: str


@dataclass(slots=True, eq=False)
class GateDrain(Effect):
    """Return once no write is past ``gate`` (core/plain_gate.py), or with an error after a while."""

    volume: str
    gate: Any


# ---------------------------------------------------------------------- bitmaps
@dataclass(slots=True, eq=False)
class BitmapPut(Effect):
    """Write ``data`` (bytes of the bit array) at byte ``first`` of a bitmap file."""

    volume: str
    kind: str          # diff / migrated / activity
    first: int
    data: bytes


@dataclass(slots=True, eq=False)
class BitmapCreate(Effect):
    """Replace a bitmap file by a clear one with one bit per ``block_bytes`` of ``size`` bytes, durably."""

    volume: str
    kind: str
    size: int
    block_bytes: int


@dataclass(slots=True, eq=False)
class BitmapSync(Effect):
    volume: str
    kind: str


# ---------------------------------------------------------------------- journal
@dataclass(slots=True)
class JEntry:
    """One journal entry: a host write with its sequence number."""

    seq: int
    volume: str
    offset: int
    data: bytes | memoryview

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass(slots=True, eq=False)
class JournalCreate(Effect):
    """Create an empty journal whose first entry will be ``counter``."""

    group: str
    capacity_bytes: int
    counter: int = 1
    head: int | None = None     # continue another journal's byte positions (handover)


@dataclass(slots=True, eq=False)
class JournalAppend(Effect):
    """Append entries, in order, after the last one stored."""

    group: str
    entries: list[JEntry]


@dataclass(slots=True, eq=False)
class JournalSync(Effect):
    group: str


@dataclass(slots=True, eq=False)
class JournalRead(Effect):
    """Entries ``first``..``last`` with their data (a list of JEntry)."""

    group: str
    first: int
    last: int


@dataclass(slots=True, eq=False)
class JournalDiscard(Effect):
    """Free entries up to ``through`` durably; with ``counter``, also continue numbering there."""

    group: str
    through: int
    counter: int = 0


@dataclass(slots=True, eq=False)
class JournalDelete(Effect):
    group: str


# ---------------------------------------------------------------------- management information
@dataclass(slots=True, eq=False)
class SaveMgmt(Effect):
    """Replace the node's management information atomically and durably."""

    record: dict[str, Any]


@dataclass(slots=True, eq=False)
class SaveApplied(Effect):
    """Durably record a secondary group's applied pointer and the apply in progress."""

    group: str
    applied: int
    applying: int


# ---------------------------------------------------------------------- network and time
@dataclass(slots=True, eq=False)
class Call(Effect):
    """A request to another node; completes with its reply or an RcopyError."""

    node: str
    endpoint: str
    msg: Message
    timeout_s: float


@dataclass(slots=True, eq=False)
class SetTimer(Effect):
    at: float


# ---------------------------------------------------------------------- no answer needed
@dataclass(slots=True, eq=False)
class Reply:
    """The reply to an incoming request ``req``."""

    req: Any
    msg: Message


@dataclass(slots=True, eq=False)
class HostDone:
    """A host request finished: ``data`` for a read (runs for extents), or ``error`` (an RcopyError)."""

    req: Any
    data: Any = None
    error: BaseException | None = None


@dataclass(slots=True, eq=False)
class Log:
    level: str
    text: str
