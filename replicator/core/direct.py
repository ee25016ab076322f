"""Host writes without a task: the common case of the data path in one call into the core.

A write to a volume in no pair and no migration (plain), to a duplex async primary or to a sync
primary, when none of ``host_write``'s slow branches applies, is admitted, held and (async)
journaled in one call, ``begin``; the caller writes the volume's bytes (the driver outside its
lock, as a task parked on its VolWrite would) and calls ``end``. The checks, the holds and their
order are ``host_write``'s: the in-flight count, the region locks (only if free and nobody
queues), and for async the journal entry, numbered and stored before the volume write. It is
taken only when

* the regions' activity bits are set and durable already (no bitmap write to wait for),
* the extent is not tracked (not suspended, no dirty bit: the write is journaled or sent, never
  bypassed),
* async: no append runs or queues, no fold, no back-pressure and the entry fits in the ring (so
  the entry is stored in number order, exactly as a writer's own append in
  ``SourceGroup.append``), and the caller can store the entry now (``store``: the driver's
  storage, under its lock).

A sync write (``w.waits``) then joins its volume's next batch to the secondary at ``end``
(``PrimarySide.join_sync``: the queue a task's sync write joins too); the batch's sender lets
it go and answers the host (``req``) once the secondary holds it, or once it is tracked and the
pair suspended: the caller waits for that answer.

A plain write admitted here opens the volume's plain gate (plain_gate.py): the writes after it
pass without the core until a change of the volume's state closes the gate.

Anything else: None, and the write goes through host_write's task unchanged. If the journal
append fails, the write goes on as a task from there (the fold, then the volume write), and
that task answers the host (``as_task``). What is acknowledged when is unchanged: the entry and
every earlier one are stored (page cache) and the volume written; for sync, the secondary holds
the write durably (or it is tracked).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generator

from ..errors import RcopyError
from . import plain_gate, tables as T
from .effects import Effect, JEntry, put
from .journal_space import RECORD_HEADER_BYTES
from .source_group import Pending, SourceGroup

if TYPE_CHECKING:
    from .primary import PrimarySide
    from .volume import Volume

Store = Callable[[Effect], Any]       # carries out a storage effect now: its result, or the exception


@dataclass(slots=True, eq=False)
class DirectWrite:
    """A host write admitted without a task, until ``end``."""

    vol: "Volume"
    offset: int
    data: Any                           # what the volume write stores (a copy, for a journaled write)
    regions: range                      # region locks held
    group: SourceGroup | None = None    # async: the group whose journal holds entry ``seq``
    seq: int = 0
    active: range = range(0)            # async: activity-log regions counted
    as_task: bool = False               # the append failed: a task finishes it and answers the host
    req: Any = None                     # sync: the host's request, answered by the batch's sender
    effects: list[Effect] = field(default_factory=list)   # what the tasks it woke do next

    @property
    def waits(self) -> bool:
        """A sync write: after ``end`` the caller waits for the answer to ``req``."""
        return self.req is not None


def begin(side: "PrimarySide", req: Any, name: str, offset: int, data: Any, store: Store) -> DirectWrite | None:
    """Admit a host write without a task, or None (take host_write). Raises for a bad range."""
    core = side.core
    vol = core.volumes.get(name)
    if vol is None or not core.ready:
        return None
    length = len(data)
    vol.check(offset, length)
    info = vol.info
    if info.rw_mode != T.NORMAL or info.migration:
        return None
    group, active = None, range(0)
    sync = False
    if info.remote_copy_flag == "source":
        if info.mode == "async":
            group = side.groups.get(info.group)
            active = _journal_now(side, vol, group, offset, length) if group is not None else None
        else:
            sync = True
            active = _active_now(side, vol, offset, length)
        if active is None:
            return None
    elif info.remote_copy_flag != "off":
        return None
    else:
        plain_gate.open_for(vol)         # plain and ready: the next writes pass without the core
    regions = vol.regions(offset, length)
    if not vol.locks.try_acquire(regions):
        return None
    vol.inflight += 1                    # what mig.admit counts
    vol.writes += 1
    vol.direct_writes += 1
    vol.bytes_written += length
    w = DirectWrite(vol, offset, data, regions)
    if group is not None:
        _journal(side, w, group, active, req, store)
    elif sync:
        _enter(side, w, active)
        w.req = req
    return w


def end(side: "PrimarySide", w: DirectWrite, ok: bool = True) -> None:
    """The volume write of ``w`` is done (``ok``) or failed: count it; let go, or (sync, written)
    send it to the secondary with the volume's next batch, whose sender lets it go."""
    _written(w)
    if w.waits and ok:
        vol = w.vol
        for r in w.active:
            vol.active_write[r] = vol.syncer.written
        side.join_sync(vol, w.offset, w.data, w)     # S1129
        return
    let_go(side, w)


def _active_now(side: "PrimarySide", vol: "Volume", offset: int, length: int) -> range | None:
    """The activity-log regions of this write if their bits are set and durable already and the
    extent is not tracked; else None."""
    if side._tracked(vol, offset, length):
        return None
    act = vol.activity.regions(offset, length)
    if vol.activity.run(act.start, len(act)) == len(act) and vol.maps["activity"].durable:
        return act
    return None


def _journal_now(side: "PrimarySide", vol: "Volume", g: SourceGroup, offset: int, length: int) -> range | None:
    """The activity-log regions of this async write if it can be journaled in this call, with
    none of _write_async's slow branches; else None."""
    if length > side.core.cfg.direct_append_bytes_max or g.appending or g.pending or g.folding:
        return None
    if g.throttle_s() or g.space.place(RECORD_HEADER_BYTES + length) is None:
        return None
    return _active_now(side, vol, offset, length)


def _enter(side: "PrimarySide", w: DirectWrite, active: range) -> None:
    """Count the write in its activity-log regions (as _activity_enter, whose bits are set) and
    keep its own copy of the bytes: they outlive the caller's buffer (a journal's push cache, a
    sync batch a timeout gave up on)."""
    vol, now = w.vol, side.core.rt.now
    w.active = active
    for r in active:
        vol.active[r] += 1
        vol.active_at[r] = now
    if type(w.data) is not bytes:
        w.data = bytes(w.data)


def _journal(side: "PrimarySide", w: DirectWrite, g: SourceGroup, active: range, req: Any, store: Store) -> None:
    """Count the activity, number the entry and store it (S2401-S2404), as _write_async does."""
    _enter(side, w, active)
    p = Pending(w.vol.name, w.offset, w.data)
    entries = [g.number(p, RECORD_HEADER_BYTES + len(w.data))]
    w.group, w.seq = g, p.seq
    error = g.append_now(entries, store)
    if error is not None:
        w.as_task = True
        side.core.rt.spawn(side.core.answer(req, "write", _after_failed_append(side, w, entries, error)),
                           "host-write")


def _after_failed_append(side: "PrimarySide", w: DirectWrite, entries: list[JEntry],
                         error: RcopyError) -> Generator[Any, Any, None]:
    """The rest of _write_async after its append failed: the fold, then the volume write."""
    assert w.group is not None
    try:
        yield from w.group.append_failed(entries, error)
        try:
            yield put(w.vol.name, w.offset, w.data)
        finally:
            _written(w)
    finally:
        let_go(side, w)


def _written(w: DirectWrite) -> None:
    vol = w.vol
    vol.syncer.wrote()
    if w.group is not None:
        w.group.volume_written(w.seq)
        for r in w.active:
            vol.active_seq[r] = max(vol.active_seq.get(r, 0), w.seq)


def let_go(side: "PrimarySide", w: DirectWrite) -> None:
    """Leave the activity regions, the region locks and the in-flight count."""
    side._activity_exit(w.vol, w.active)
    w.vol.locks.release(w.regions)
    side.core.mig.done(w.vol)
