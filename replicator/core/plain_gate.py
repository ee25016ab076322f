"""The plain gate: host I/O to a plain volume (no pair, no migration) that passes without the core.

A write to a plain volume needs nothing from the core: no journal, no bitmap, no region lock
that anybody else takes while the volume stays plain; nor does a read. So they pass this gate
on nbdkit's thread and write (read) the volume at once, without the driver's lock; under that
lock every writer waited for every other one (no pair, 4 KiB random writes at the export:
docs/BENCHMARKS.md).

* The core opens the gate when it admits a plain write the usual way (core/direct.py: the
  volume is plain, the node ready): the I/O after it passes. A read the core admits opens it
  to reads only (``reads``) on a plain volume or a primary in rw_mode NORMAL that is no
  migration's target (PrimarySide.host_read): reading there needs nothing from the core either.
* Every change that makes a volume not plain closes the gate in the very step that makes the
  change: ``close`` (a pair create: it waits until no write is past the gate, and nothing
  reopens it meanwhile; reads go on) or ``shut`` (a pair join, a migration to the volume, its
  deletion: closed to reads too, they refuse while I/O is in flight, as they refuse it in the
  core). I/O that finds the gate closed goes to the core.

Why a writer never slips past a closing gate: the writer appends itself to ``active``, then
reads ``open``; the core clears ``open``, then reads ``active`` (a reader: ``reading`` and
``reads``, the same way). CPython runs one thread's Python at a time (the GIL), so each sees
the other's store made before its own read: either the core sees the writer (and waits for
it, or refuses) or the writer sees the gate closed.

What is acknowledged when is unchanged: the write is in the page cache when its host is
answered; a flush makes it durable: ``absorb`` tells the volume's syncer that writes passed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generator

from ..errors import StateError
from .effects import GateDrain

if TYPE_CHECKING:
    from .volume import Volume


class PlainGate:
    """One plain volume's gate: open or not, the writes past it, and what they did. The writer's
    side (``enter`` ... ``leave``) is inlined in replicator/node.py's ``Node.write`` and ``read``."""

    __slots__ = ("open", "reads", "closing", "active", "reading", "dirty", "done", "writes", "bytes")

    def __init__(self) -> None:
        self.open = False               # writes and reads pass: the volume is plain
        self.reads = False              # reads pass: the volume is plain or a primary, rw_mode NORMAL
        self.closing = 0                # ``close`` runs: nothing opens the gate meanwhile
        self.active: list[None] = []    # one item per write past the gate (append, pop: atomic)
        self.reading: list[None] = []   # ... per read past it (a pair create does not wait for these)
        self.dirty = False              # a write passed since the last ``absorb``
        self.done: list[int] = []       # sizes of the writes done since the last ``fold``
        self.writes = 0                 # ... and before it (``fold``)
        self.bytes = 0

    def enter(self, read: bool = False) -> bool:
        """Pass the gate (True), or find it closed (False: take the core's path); a read passes
        while the gate lets reads pass."""
        past = self.reading if read else self.active
        past.append(None)
        if self.reads if read else self.open:
            return True
        past.pop()
        return False

    def leave(self, nbytes: int | None) -> None:
        """The write is done: ``nbytes`` written, or None (it failed; it may have written some)."""
        if nbytes is not None:
            self.done.append(nbytes)
        self.dirty = True
        self.active.pop()

    def leave_read(self) -> None:
        """A read past the gate is done."""
        self.reading.pop()

    def fold(self) -> tuple[int, int]:
        """(writes, bytes) that passed the gate so far. One caller at a time (the core's: under
        the driver's lock, from the node's status and once a second: the list stays short); it
        pops what writers append meanwhile, so no write is lost or counted twice."""
        done = self.done
        while done:
            self.bytes += done.pop()
            self.writes += 1
        return self.writes, self.bytes


def open_for(vol: "Volume") -> None:
    """``vol`` is plain and its node ready (the caller checked): let its next writes pass, unless
    a pair create is closing the gate (it would never see the writes drain)."""
    if not vol.gate.closing:
        vol.gate.open = vol.gate.reads = True


def open_reads(vol: "Volume") -> None:
    """``vol`` is plain or a primary, in rw_mode NORMAL and no migration's target, its node ready
    (the caller checked): let its next reads pass. A read needs nothing from the core there: no
    region is fetched from elsewhere, nothing is relayed (a frozen V1 still reads its own bytes,
    as in the core); only a migration to the volume, a pair join and a delete change that, and
    they ``shut`` the gate."""
    vol.gate.reads = True


def absorb(vol: "Volume") -> None:
    """Writes that passed since the last call count for the volume's next sync (a flush)."""
    gate = vol.gate
    if gate.dirty:
        gate.dirty = False
        vol.syncer.wrote()


def close(vol: "Volume") -> Generator[Any, Any, None]:
    """Close the gate and wait until no write is past it. The caller changes the volume's state
    in the step this returns in (no yield in between): no write passes under the old state."""
    gate = vol.gate
    gate.closing += 1
    try:
        while True:
            gate.open = False
            if not gate.active:
                break
            yield GateDrain(vol.name, gate)
    finally:
        gate.closing -= 1
    absorb(vol)


def shut(vol: "Volume", refusal: str) -> None:
    """Close the gate to writes and reads; raise StateError(``refusal``) if I/O is past it or in
    the core."""
    vol.gate.open = vol.gate.reads = False
    if vol.gate.active or vol.gate.reading or vol.inflight:
        raise StateError(refusal)
    absorb(vol)
