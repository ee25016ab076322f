"""The primary side of remote copy (SPEC 2.1, 4.6 Fig. 11, 4.10; invariants 15, 19-22).

Host I/O at a node (after migration.py admitted it), pairs (create, suspend,
resume, delete), sync and async writes, the activity log, the initial copy and
differential resync, and what a restart must repair.

Durability rules held here:
* a dirty bit is durable before the write it covers starts;
* the activity bit of a region is durable before a write to it starts, so a crash
  (sync) or a power loss (async) resynchronises exactly the regions in flight;
* a sync write is acknowledged only after the secondary holds it durably, or after
  the pair is suspended with the write tracked, whatever the secondary's error;
* a diff bit is cleared only after the secondary holds the region durably.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generator

from .. import wire
from ..errors import NodeUnreachable, RcopyError, StateError, UsageError
from . import direct as D, plain_gate, tables as T
from .direct import DirectWrite
from .effects import HostDone, JournalCreate, JournalDelete, VolExtents, VolHoleRun, VolRead, VolZero, Zeros, put
from .payload import ZERO_MARK, write_data, write_fields
from .model import PeerVolume, SourceGroupInfo, check_name
from .runtime import Sleep, Wait
from .source_group import SourceGroup

if TYPE_CHECKING:
    from .node import BootState, JournalState, NodeCore
    from .volume import Volume


@dataclass(slots=True, eq=False)
class _SyncWrite:
    """A sync write waiting for its batch's round trip to the secondary."""

    offset: int
    data: bytes | memoryview | Zeros
    done: bool = False
    error: RcopyError | None = None
    direct: DirectWrite | None = None       # a write without a task: the sender finishes it and answers the host


def sync_fields(batch: list[_SyncWrite]) -> tuple[dict[str, Any], list[Any]]:
    """A pair.write of several sync writes: ``writes`` [[offset, length(, "z")], ...], one frame each
    (empty for a zeroing). A batch of one keeps the one-range form."""
    if len(batch) == 1:
        fields, frames = write_fields(batch[0].data)
        return {"offset": batch[0].offset, **fields}, frames
    writes = [[it.offset, len(it.data)] + ([ZERO_MARK] if isinstance(it.data, Zeros) else []) for it in batch]
    return {"writes": writes}, [b"" if isinstance(it.data, Zeros) else it.data for it in batch]


class PrimarySide:
    """Pairs and host I/O of one node's primaries."""

    def __init__(self, core: "NodeCore") -> None:
        self.core = core
        self._resuming: set[str] = set()        # groups (or sync volumes) being resumed
        self.groups: dict[str, SourceGroup] = {}
        self._sync_queue: dict[str, list[_SyncWrite]] = {}    # sync writes waiting for a round trip
        self._sync_senders: dict[str, int] = {}               # volume -> sync senders running

    def handlers(self) -> dict[str, Any]:
        return {"pair.create": self._h_pair_create, "pair.delete": self._h_pair_delete,
                "pair.suspend": self._h_pair_suspend, "pair.resume": self._h_pair_resume,
                "journal.pull": self._h_journal_pull, "journal.applied": self._h_journal_applied,
                "volume.read": self._h_volume_read, "volume.write": self._h_volume_write,
                "volume.flush": self._h_volume_flush, "volume.extents": self._h_volume_extents}

    # ================================================================== start and restart
    def start(self) -> None:
        for g in self.groups.values():
            self._start_group(g)
        for v in self.core.volumes.values():
            if v.info.pair_state == T.COPYING:
                self.wake_copier(v)
        self.core.service("resumer", self._resumer)
        self.core.service("activity", self._retire_activity)

    def check_bitmaps(self, st: "BootState") -> bool:
        """A missing or damaged bitmap must never hide a region: assume every region marked."""
        changed = False
        for v in self.core.volumes.values():
            if v.info.pair_state == T.DUPLEX and v.diff.count() and not self.core.mig.frozen(v):
                # never both: resync what is marked (a frozen V1 hands the bits over instead)
                for m in self._members_of(v):
                    if m.info.pair_state == T.DUPLEX:
                        self.set_suspended(m, "the diff bitmap marks regions: resynchronising")
                changed = True
            for kind in ("diff", "activity"):
                if st.bitmaps.get((v.name, kind), b"") is None:
                    self.core.log("error", f"{v.name}: {kind} bitmap unreadable; marking every region")
                    v.maps[kind].note(v.maps[kind].bits.set_all())
                    if v.info.remote_copy_flag == "source" and v.info.pair_state == T.DUPLEX:
                        for m in self._members_of(v):
                            if m.info.pair_state == T.DUPLEX:
                                self.set_suspended(m, f"{kind} bitmap was damaged: resynchronising")
                    changed = True
        return changed

    def recover_group(self, info: SourceGroupInfo, st: "JournalState | None") -> Generator[Any, Any, None]:
        g = SourceGroup(self.core, info, st)
        self.groups[info.name] = g
        members = g.members()
        if st is None:
            yield JournalCreate(info.name, info.journal_bytes)
            return
        if st.lost_entries:
            self.core.log("error", f"journal {info.name} lost {st.lost_entries} entries; full resync of "
                                   f"{[v.name for v in members]}")
            for v in members:
                v.maps["diff"].note(v.diff.set_all())
        for vname, offset, length in st.folded:
            v = g.tracker(vname)
            if v is not None:
                v.maps["diff"].note(v.diff.set_range(offset, length))
        if st.lost_entries or st.folded:
            for v in members:
                yield from v.maps["diff"].persist(sync=True)
                self.set_suspended(v, "journal recovery: resynchronising")
        yield from self._roll_forward(g)

    def _roll_forward(self, g: SourceGroup) -> Generator[Any, Any, None]:
        """Rewrite every live journal entry into its volume, in order: a crash between the journal
        append and the volume write must not leave the secondary ahead of the primary. A
        migration source V2 took over from is skipped (it synced then; a dual write may be newer)."""
        first, count = g.discarded + 1, 0
        while first <= g.stored:
            last = g._batch_end(first, g.stored, self.core.cfg.push_batch_bytes)
            entries = yield from self._read_journal(g, first, last)
            for e in entries:
                v = self.core.volumes.get(e.volume)
                if v is None or self.core.mig.handed_over(v):   # it synced at the handover; dual writes are newer
                    continue
                # No write to this region is newer than a live entry: a suspended async pair folds
                # (discards) its journal before any write bypasses it.
                yield put(v.name, e.offset, e.data)
                v.syncer.wrote()
                count += 1
            first = last + 1
        if count:
            self.core.log("info", f"journal {g.name}: rolled {count} entries forward into the volumes")

    @staticmethod
    def _read_journal(g: SourceGroup, first: int, last: int) -> Generator[Any, Any, list[Any]]:
        from .effects import JournalRead
        entries = yield JournalRead(g.name, first, last)
        return entries

    def recover_activity(self, st: "BootState") -> Generator[Any, Any, None]:
        """Regions with a write in flight when the node stopped may differ from the secondary: a sync
        pair after any unclean stop, an async pair after a power loss. Resynchronise them."""
        for v in self.core.volumes.values():
            info = v.info
            if v.activity.count() == 0:
                continue
            # A migration source V2 took over from made its volume durable before it handed over
            # and owns no pair any more: nothing of it is resynchronised from here.
            if info.remote_copy_flag == "source" and not st.clean and (info.mode == "sync" or st.power_lost) \
                    and not self.core.mig.handed_over(v):
                v.maps["diff"].note(v.diff.cover(v.activity))
                yield from v.maps["diff"].persist(sync=True)                 # into diff first, durably
                self.core.log("warning", f"{v.name}: writes were in flight at the last stop; "
                                         f"resynchronising {v.activity.count()} region(s)")
                if self.core.mig.frozen(v):
                    continue   # frozen for a handover: its backlog still drains; the next snapshot has the bits
                for m in self._members_of(v):                                # a group moves together
                    # copying too: a copy sent before the stop may still arrive, and after a power loss
                    # its after_seq names entries that are gone: the resync starts over, in a new epoch
                    if m.info.pair_state in (T.DUPLEX, T.COPYING):
                        self.set_suspended(m, "restart with writes in flight: resynchronising")
            elif info.remote_copy_flag == "source" and info.mode == "async" and not st.clean \
                    and info.group in self.groups:
                # After a kill the journal holds these writes, but perhaps only in the page cache
                # (so may the volume): durable before the bits go, or a power loss next could keep
                # a write in the volume that neither the journal nor a bit sends (seed 1753).
                g = self.groups[info.group]
                yield from g.make_durable(g.stored)
            v.maps["activity"].note(v.activity.clear_all())
            yield from v.maps["activity"].persist(sync=True)

    def settle_groups(self) -> Generator[Any, Any, None]:
        """At start-up: an async group that is (or was just made) suspended while its journal still
        holds live entries folds them now, before any host write may bypass the journal."""
        for g in list(self.groups.values()):
            members = g.members()
            if g.stored > g.discarded and any(m.info.pair_state == T.SUSPENDED for m in members):
                reason = next(m.info.suspend_reason for m in members if m.info.pair_state == T.SUSPENDED)
                yield from g.fold(reason)

    def _start_group(self, g: SourceGroup) -> None:
        self.core.service(f"append-{g.name}", g.appender)
        self.core.service(f"push-{g.name}", g.push_loop)

    def group_of(self, vol: "Volume") -> SourceGroup:
        return self.groups[vol.info.group]

    # ================================================================== host I/O (Fig. 10, 11)
    def host_read(self, vol: "Volume", offset: int, length: int) -> Generator[Any, Any, bytes]:
        vol.check(offset, length)
        mode = yield from self.core.mig.admit(vol, write=False)
        if mode == T.THROUGH:
            reply = yield from self.core.mig.relay(vol, "volume.read", offset=offset, length=length)
            return reply.payloads[0]
        try:
            if mode == T.MIGRATING:
                regions = vol.regions(offset, length)
                yield from vol.locks.acquire(regions)
                try:
                    yield from self.core.mig.ensure_migrated(vol, offset, length)
                finally:
                    vol.locks.release(regions)
            elif mode == T.NORMAL and vol.info.remote_copy_flag in ("off", "source") \
                    and self.core.mig.target_of(vol) is None:
                plain_gate.open_reads(vol)      # the next reads pass without the core
            data = yield VolRead(vol.name, offset, length)
            return data
        finally:
            self.core.mig.done(vol)

    def host_extents(self, vol: "Volume", offset: int, length: int) -> Generator[Any, Any, list[tuple[int, bool]]]:
        """NBD block status: (length, hole) runs from ``offset`` on. A V2 whose migration has not
        brought a region here yet answers "data" for it (V1 holds it): never a false hole."""
        vol.check(offset, length)
        mode = yield from self.core.mig.admit(vol, write=False)
        if mode == T.THROUGH:
            reply = yield from self.core.mig.relay(vol, "volume.extents", offset=offset, length=length)
            return [(int(n), bool(hole)) for n, hole in reply["extents"]]
        try:
            if mode == T.MIGRATING:
                # Bits only get set while migrating, and a set bit means V2's copy is durable: so
                # a run judged here stays right while the file is looked at.
                bits = vol.migrated
                region = offset // bits.region_bytes
                here = bits.is_set(region)
                stop = (region + bits.run(region, bits.nregions, here)) * bits.region_bytes
                length = min(length, stop - offset)
                if not here:
                    return [(length, False)]
            runs = yield VolExtents(vol.name, offset, length, self.core.cfg.extents_max)
            return runs
        finally:
            self.core.mig.done(vol)

    def host_write(self, vol: "Volume", offset: int, data: bytes | memoryview | Zeros,
                   fua: bool) -> Generator[Any, Any, None]:
        """A host write, or a zeroing (TRIM / WRITE_ZEROES as ``Zeros``): the same path, the same order."""
        vol.check(offset, len(data))
        if vol.info.remote_copy_flag == "dest":
            from ..errors import ReadOnlyError
            raise ReadOnlyError(f"{self.core.name}:{vol.name} is a remote-copy secondary; hosts cannot write it")
        mode = yield from self.core.mig.admit(vol, write=True)
        if mode == T.THROUGH:
            fields, frames = write_fields(data)
            yield from self.core.mig.relay(vol, "volume.write", frames, offset=offset, fua=fua, **fields)
            return
        try:
            regions = vol.regions(offset, len(data))
            yield from vol.locks.acquire(regions)
            try:
                if mode == T.MIGRATING:
                    yield from self.core.mig.ensure_migrated(vol, offset, len(data))
                yield from self.store_and_replicate(vol, offset, data)
                yield from self.core.mig.dual_write(vol, offset, data)
            finally:
                vol.locks.release(regions)
            if fua:
                yield from self.flush_local(vol)
        finally:
            self.core.mig.done(vol)

    def host_flush(self, vol: "Volume") -> Generator[Any, Any, None]:
        mode = yield from self.core.mig.admit(vol, write=False)
        if mode == T.THROUGH:            # V1 holds the data: the flush is its to do
            yield from self.core.mig.relay(vol, "volume.flush")
            return
        try:
            yield from self.flush_local(vol)
        finally:
            self.core.mig.done(vol)

    def host_trim(self, vol: "Volume", offset: int, length: int, fua: bool = False) -> Generator[Any, Any, None]:
        """TRIM and WRITE_ZEROES: the range reads as zeros on every replica (a punched hole, so a
        thin volume shrinks), journaled and replicated in write order as a command without payload."""
        if length:
            yield from self.host_write(vol, offset, Zeros(length), fua)

    def flush_local(self, vol: "Volume") -> Generator[Any, Any, None]:
        """NBD flush: every acknowledged write of this volume becomes durable (and what tracks it)."""
        plain_gate.absorb(vol)
        yield from vol.syncer.sync()
        if vol.info.remote_copy_flag == "source" and vol.info.mode == "async" and vol.info.group in self.groups:
            g = self.groups[vol.info.group]
            yield from g.make_durable(g.stored)
        yield from vol.maps["diff"].persist(sync=True)

    def store_and_replicate(self, vol: "Volume", offset: int, data: bytes | memoryview) -> Generator[Any, Any, None]:
        """SPEC 4.6 Fig. 11 (11A): store locally and remote-copy per the pair's state."""
        info = vol.info
        vol.writes += 1
        vol.bytes_written += len(data)
        if info.remote_copy_flag != "source":
            yield from self._write_volume(vol, offset, data)
        elif info.mode == "sync":
            yield from self._write_sync(vol, offset, data)
        else:
            yield from self._write_async(vol, offset, data)

    def _write_volume(self, vol: "Volume", offset: int, data: bytes | memoryview | Zeros) -> Generator[Any, Any, None]:
        yield put(vol.name, offset, data)
        vol.syncer.wrote()

    def mark_dirty(self, vol: "Volume", offset: int, length: int) -> Generator[Any, Any, None]:
        """S1126: track a range in diff_bitmap, durably, before the write it covers."""
        yield from vol.maps["diff"].update(vol.diff.set_range(offset, length), sync=True)

    def _tracked(self, vol: "Volume", offset: int, length: int) -> bool:
        return vol.info.pair_state == T.SUSPENDED or vol.diff.any_set(offset, length)

    def _bypasses(self, vol: "Volume", g: SourceGroup, offset: int, length: int) -> bool:
        """An async write in a tracked extent goes by the bitmap only, unless an older entry of the
        journal may touch it: then it is journaled too, so a roll-forward replays both in order."""
        return self._tracked(vol, offset, length) and not g.live_under(vol.name, offset, length)

    def _write_sync(self, vol: "Volume", offset: int, data: bytes | memoryview) -> Generator[Any, Any, None]:
        if self._tracked(vol, offset, len(data)):
            yield from self.mark_dirty(vol, offset, len(data))
            yield from self._write_volume(vol, offset, data)
            return
        regions = yield from self._activity_enter(vol, offset, len(data))
        try:
            yield from self._write_volume(vol, offset, data)
            for r in regions:
                vol.active_write[r] = vol.syncer.written
            try:
                yield from self._send_sync(vol, offset, data)                 # S1129: wait for the secondary
            except RcopyError as exc:
                # Any error: suspend first, then acknowledge; the write is tracked (invariant 19).
                yield from self.mark_dirty(vol, offset, len(data))
                self.set_suspended(vol, f"secondary failed a write: {exc}")
                yield from self.core.save()
        finally:
            self._activity_exit(vol, regions)

    def _write_async(self, vol: "Volume", offset: int, data: bytes | memoryview) -> Generator[Any, Any, None]:
        g = self.groups[vol.info.group]
        delay = g.throttle_s()
        if delay and not self._bypasses(vol, g, offset, len(data)):   # back-pressure, before the journal is full (the fold is the last resort)
            g.throttled += 1
            g.throttled_s += delay
            yield Sleep(delay)
        while g.folding:            # no write may bypass the journal while it still holds live entries
            yield Wait(("folded", g.name))
        if self._bypasses(vol, g, offset, len(data)):
            yield from self.mark_dirty(vol, offset, len(data))
            yield from self._write_volume(vol, offset, data)
            return
        regions = yield from self._activity_enter(vol, offset, len(data))
        try:
            if self._bypasses(vol, g, offset, len(data)) or g.folding:        # it changed meanwhile
                self._activity_exit(vol, regions)
                regions = range(0)
                yield from self._write_async(vol, offset, data)
                return
            p, journaled = yield from g.append(vol, offset, data)            # S2401-S2404
            while not journaled and g.folding:
                # folded into the bitmaps: the journal's older entries must be gone first, or a
                # roll-forward after a crash would write them over this newer data
                yield Wait(("folded", g.name))
            try:
                yield from self._write_volume(vol, offset, data)              # S1133
            finally:
                if journaled:
                    g.volume_written(p.seq)
                    for r in regions:
                        vol.active_seq[r] = max(vol.active_seq.get(r, 0), p.seq)
        finally:
            self._activity_exit(vol, regions)

    def send_copy(self, vol: "Volume", offset: int, data: bytes | memoryview | Zeros | None, zero: int = 0,
                  after_seq: int = 0) -> Generator[Any, Any, None]:
        """pair.write to the secondary: a sync write or zeroing, or one region of a copy
        (``after_seq``: async)."""
        if isinstance(data, Zeros):
            data, zero = None, data.length
        yield from self._pair_write(vol, {"offset": offset, "zero": zero}, [data] if data is not None else [],
                                    after_seq)

    def _send_sync(self, vol: "Volume", offset: int, data: bytes | memoryview | Zeros) -> Generator[Any, Any, None]:
        """A sync write to the secondary: it joins the volume's next batch and waits for its answer."""
        item = self.join_sync(vol, offset, data)
        while not item.done:
            yield Wait(("sync-sent", vol.name))
        if item.error is not None:
            raise item.error

    def join_sync(self, vol: "Volume", offset: int, data: bytes | memoryview | Zeros,
                  direct: DirectWrite | None = None) -> _SyncWrite:
        """Queue a sync write for the volume's senders, one more started if fewer than
        ``sync_batches_in_flight`` run. Writes that wait while the batches are in flight share the
        next round trip (group commit): one pair.write, which the secondary makes durable with one
        fsync and answers once. Batches in flight at once never overlap: each write holds its
        regions' locks until it is answered."""
        item = _SyncWrite(offset, data, direct=direct)
        self._sync_queue.setdefault(vol.name, []).append(item)
        senders = self._sync_senders.get(vol.name, 0)
        if senders < self.core.cfg.sync_batches_in_flight:
            self._sync_senders[vol.name] = senders + 1
            self.core.rt.spawn(self._sync_sender(vol), "sync-send")
        return item

    def _sync_sender(self, vol: "Volume") -> Generator[Any, Any, None]:
        """Send the queued sync writes of ``vol`` a batch at a time (this sender's one batch in
        flight) until none is left; each batch's writes learn its outcome together."""
        queue = self._sync_queue.setdefault(vol.name, [])
        try:
            while queue:
                batch = self._take_batch(queue)
                error: RcopyError | None = RcopyError("the sync batch was not sent")   # until it was
                try:
                    yield from self._pair_write(vol, *sync_fields(batch), 0)
                    error = None
                except RcopyError as exc:
                    error = exc
                except Exception as exc:  # noqa: BLE001 - a bug: every write of the batch is tracked, none lost
                    error = RcopyError(f"internal error sending sync writes: {exc}")
                finally:
                    if error is not None:       # the pair suspends: the writes queued meanwhile need no try
                        batch += queue
                        queue.clear()
                    for it in batch:
                        it.done, it.error = True, error
                    self.core.rt.notify(("sync-sent", vol.name))
                direct = [it.direct for it in batch if it.direct is not None]
                if direct:
                    yield from self._finish_direct_sync(vol, direct, error)
        finally:
            left = self._sync_senders.pop(vol.name, 1) - 1
            if left:
                self._sync_senders[vol.name] = left

    def _finish_direct_sync(self, vol: "Volume", writes: list[DirectWrite],
                            error: RcopyError | None) -> Generator[Any, Any, None]:
        """Answer the hosts of sync writes made without a task, as _write_sync does: after the
        secondary holds them, or after they are tracked and the pair suspended (invariant 19)."""
        failed: RcopyError | None = None
        try:
            if error is not None:
                for w in writes:
                    yield from self.mark_dirty(vol, w.offset, len(w.data))
                self.set_suspended(vol, f"secondary failed a write: {error}")
                yield from self.core.save()
        except RcopyError as exc:
            failed = exc
        except Exception as exc:  # noqa: BLE001 - a bug: the hosts get EIO, the node keeps serving
            self.core.log("bug", f"tracking failed sync writes failed with {type(exc).__name__}: {exc}")
            failed = RcopyError(f"internal error: {exc}")
        finally:
            for w in writes:
                D.let_go(self, w)
                self.core.rt.emit(HostDone(w.req, error=failed))

    def _take_batch(self, queue: list["_SyncWrite"]) -> list["_SyncWrite"]:
        cfg, total, n = self.core.cfg, 0, 0
        for it in queue:
            total += 0 if isinstance(it.data, Zeros) else len(it.data)
            if n and (n >= cfg.sync_batch_writes or total > cfg.sync_batch_bytes):
                break
            n += 1
        batch = queue[:n]
        del queue[:n]
        return batch

    def send_runs(self, vol: "Volume", parts: list[tuple[int, int, bytes | None]],
                  after_seq: int = 0) -> Generator[Any, Any, None]:
        """One region of a copy in one pair.write: its dirty runs (offset, length, data or None
        for zeros), one payload each (empty for zeros)."""
        yield from self._pair_write(vol, {"offset": parts[0][0], "extents": [[o, n] for o, n, _ in parts]},
                                    [b"" if d is None else d for _, _, d in parts], after_seq)

    def _pair_write(self, vol: "Volume", fields: dict[str, Any], payloads: list[Any],
                    after_seq: int) -> Generator[Any, Any, None]:
        dest = vol.info.copy_dest_info
        assert dest is not None
        timeout = self.core.cfg.copy_wait_s + self.core.cfg.sync_timeout_s if after_seq else self.core.cfg.sync_timeout_s
        yield from self.core.call(dest.node, dest.control, "pair.write", {
            "volume": dest.volume, "source": self.core.name, "source_volume": vol.name, "after_seq": after_seq,
            "epoch": vol.info.copy_epoch, **fields}, payloads, timeout_s=timeout)

    # ---------------------------------------------------------------- activity log
    def _activity_enter(self, vol: "Volume", offset: int, length: int) -> Generator[Any, Any, range]:
        regions = vol.activity.regions(offset, length)
        now = self.core.rt.now
        for r in regions:
            vol.active[r] += 1
            vol.active_at[r] = now
        bf = vol.maps["activity"]
        if bf.note(vol.activity.set_range(offset, length)) or not bf.durable:
            yield from bf.persist(sync=True)       # durable before the write starts
        return regions

    def _activity_exit(self, vol: "Volume", regions: range) -> None:
        for r in regions:
            vol.active[r] -= 1
            if vol.active[r] <= 0:
                del vol.active[r]

    def _retire_activity(self) -> Generator[Any, Any, None]:
        """Clear the bits of regions with nothing in flight (and, async, nothing unsynced in the
        journal), so a crash resynchronises only what may differ. A lost clear costs a resync.
        A region written in the last ``activity_idle_s`` stays set (like DRBD's hot extents): its
        next write needs no bitmap write and fsync first."""
        while True:
            yield Sleep(self.core.cfg.activity_retire_s)
            quiet_since = self.core.rt.now - self.core.cfg.activity_idle_s
            for v in list(self.core.volumes.values()):
                g = self.groups.get(v.info.group) if v.info.mode == "async" else None
                if g is None and any(w > v.syncer.synced for w in v.active_write.values()):
                    yield from v.syncer.sync()      # sync: a region retires once its writes are durable here
                idle = [r for r in v.activity.iter_set() if r not in v.active
                        and v.active_at.get(r, 0.0) <= quiet_since
                        and (v.active_seq.get(r, 0) <= g.durable if g is not None
                             else v.active_write.get(r, 0) <= v.syncer.synced)]
                changed = False
                for r in idle:
                    changed |= v.maps["activity"].note(v.activity.clear(r))
                    v.active_seq.pop(r, None)
                    v.active_write.pop(r, None)
                    v.active_at.pop(r, None)
                if changed:
                    yield from v.maps["activity"].persist()

    # ================================================================== pair states
    def set_suspended(self, vol: "Volume", reason: str) -> None:
        """pair_state -> suspended (the caller saves the management information)."""
        if T.go(T.PAIR_STATE, vol.info, T.SUSPENDED):
            self.core.log("warning", f"pair {vol.name} suspended: {reason}")
        vol.info.suspend_reason = reason
        self.core.rt.notify(("pair", vol.name))

    def suspend_pair(self, vol: "Volume", reason: str) -> Generator[Any, Any, None]:
        """A failure suspends the pair: a whole async group (folding its journal), or one sync volume."""
        if vol.info.mode == "async":
            yield from self.groups[vol.info.group].fold(reason)
        else:
            self.set_suspended(vol, reason)
            yield from self.core.save()

    def suspend(self, vol: "Volume", reason: str) -> Generator[Any, Any, None]:
        if vol.info.mode == "async":
            yield from self.groups[vol.info.group].fold(reason)
            return
        regions = range(0, vol.diff.nregions)       # a copy step in progress finishes first
        yield from vol.locks.acquire(regions)
        try:
            self.set_suspended(vol, reason)
            yield from self.core.save()
        finally:
            vol.locks.release(regions)

    def _members_of(self, vol: "Volume") -> list["Volume"]:
        if vol.info.mode != "async":
            return [vol]
        g = self.groups.get(vol.info.group)
        return g.members() if g is not None else self.core.members(vol.info.group)

    def resume(self, vol: "Volume") -> Generator[Any, Any, None]:
        """Differential resync (SPEC 4.10): copy only the regions marked in diff_bitmap. One at a
        time per group (or sync volume): a user's resume and the automatic one must not both
        start a resync with the same epoch, or the second drops what the first already sent
        (seed 132530 of the long run)."""
        key = vol.info.group if vol.info.mode == "async" else vol.name
        while key in self._resuming:
            yield Wait(("resumed", key))
        self._resuming.add(key)
        try:
            yield from self._resume(vol)
        finally:
            self._resuming.discard(key)
            self.core.rt.notify(("resumed", key))

    def _resume(self, vol: "Volume") -> Generator[Any, Any, None]:
        members = self._members_of(vol)
        if all(m.info.pair_state != T.SUSPENDED for m in members):
            return
        if any(self.core.mig.frozen(m) for m in members):
            raise StateError(f"{self.core.name}:{vol.name} has handed over to its new primary")
        dest = vol.info.copy_dest_info
        assert dest is not None
        epoch = max(m.info.copy_epoch for m in members) + 1
        if vol.info.mode == "async":
            if (yield from self.core.mig.backlog_pending(vol)):
                # V2 resyncs from N0 on: V3 would skip what V1 still has to send below it
                raise StateError(f"{self.core.name}:{vol.name}: its old primary still sends its backlog "
                                 f"below the handover number; the resync follows it")
            g = self.groups[vol.info.group]
            # The secondary restarts its sequence at next_seq: what the journal still holds
            # unapplied (a suspend by a failed copy does not fold) goes by the bitmap.
            yield from g.fold("resynchronising")
            next_seq = g.counter
            yield from self.core.call(dest.node, dest.control, "pair.resync_begin", {
                "group": vol.info.group, "next_seq": next_seq, "source": self.core.name, "epoch": epoch})
            g.next_send = next_seq
        else:
            yield from self.core.call(dest.node, dest.control, "pair.resync_begin", {
                "group": "", "volume": dest.volume, "next_seq": 0, "source": self.core.name,
                "source_volume": vol.name, "epoch": epoch})
        for m in members:
            m.info.copy_epoch = epoch
            T.go(T.PAIR_STATE, m.info, T.COPYING)
            m.info.suspend_reason = ""
            self.core.rt.notify(("pair", m.name))
        yield from self.core.save()
        for m in members:
            self.wake_copier(m)

    def _resumer(self) -> Generator[Any, Any, None]:
        """A pair suspended by a link failure resynchronises once the secondary answers."""
        first = True
        while True:
            if not first:
                yield Sleep(self.core.cfg.resume_check_s)
            first = False
            seen: set[str] = set()
            for v in list(self.core.volumes.values()):
                info = v.info
                key = info.group if info.mode == "async" else v.name
                if key in seen or not self._may_auto_resume(v):
                    continue
                seen.add(key)
                dest = info.copy_dest_info
                assert dest is not None
                try:
                    yield from self.core.call(dest.node, dest.control, "ping", timeout_s=1.0)
                    self.core.log("info", f"{v.name}: secondary reachable again, resynchronising")
                    yield from self.resume(v)
                except RcopyError as exc:
                    self.core.log("debug", f"pair {v.name} stays suspended: {exc}")

    def _may_auto_resume(self, v: "Volume") -> bool:
        info = v.info
        members = self._members_of(v)
        return (info.remote_copy_flag == "source" and info.pair_state == T.SUSPENDED
                and info.copy_dest_info is not None and not self.core.mig.frozen(v)
                and all(m.info.auto_resume and m.info.suspend_reason not in T.HELD_SUSPENSIONS for m in members)
                and not any(self.core.mig.frozen(m) or m.info.rw_mode == T.PENDING for m in members))

    # ================================================================== initial copy / resync (Fig. 15)
    def wake_copier(self, vol: "Volume") -> None:
        if vol.copier is None or vol.copier.done:
            vol.copier = self.core.service(f"copy-{vol.name}", lambda: self._copy(vol))

    def _copy(self, vol: "Volume") -> Generator[Any, Any, None]:
        """Copy dirty regions of a pair in state copying (S1501-S1509)."""
        cfg = self.core.cfg
        while vol.info.pair_state == T.COPYING and vol.name in self.core.volumes:
            if self.core.mig.frozen(vol):
                return                                   # V2 continues the copy (S813)
            if vol.info.rw_mode == T.PENDING:            # V2 before its handover is done: its image
                yield Wait(("mode", vol.name), timeout_s=cfg.poll_s)   # is not V1's yet (no fetch)
                continue
            region = vol.diff.first_set()
            if region is None:
                done = yield from self._copy_finished(vol)
                if done:
                    return
                continue
            if (yield from self._copy_holes(vol, region)):
                continue
            offset, length = vol.diff.extent(region)
            regions = range(region, region + 1)
            yield from vol.locks.acquire(regions)
            try:
                if not vol.diff.is_set(region) or vol.info.pair_state != T.COPYING:
                    continue
                if vol.info.rw_mode == T.MIGRATING:
                    yield from self.core.mig.ensure_migrated(vol, offset, length)   # S1504-S1507
                # Async: the copy is applied after every entry stored so far and before any later
                # one (no later write to this region can exist while we hold its lock).
                after = self.groups[vol.info.group].stored if vol.info.mode == "async" else 0
                epoch = vol.info.copy_epoch
                runs = vol.diff.runs(region)                 # only its dirty blocks go
                parts = []
                for off, n in runs:
                    data = yield VolRead(vol.name, off, n, sparse=True)
                    parts.append((off, n, data))
                try:
                    yield from self.send_runs(vol, parts, after_seq=after)
                except RcopyError as exc:
                    vol.locks.release(regions)
                    regions = range(0)
                    if vol.info.copy_epoch != epoch or vol.info.pair_state != T.COPYING:
                        continue          # a newer resync started meanwhile: it decides
                    if isinstance(exc, StateError):
                        self.core.log("info", f"copy of {vol.name} region {region} deferred: {exc}")
                        yield Sleep(cfg.link_retry_s * 5)
                        continue
                    yield from self.suspend_pair(vol, f"copy interrupted: {exc}")
                    return
                # S1509: the bit goes only once the secondary has the region and what we sent is
                # durable here too (a power loss must not leave us older than the copy we sent).
                yield from vol.syncer.sync()
                yield from vol.maps["diff"].update(vol.diff.clear_ranges(runs))   # what was sent, no more
                vol.copied_bytes += sum(n for _, n, data in parts if data is not None)
                vol.zeroed_bytes += sum(n for _, n, data in parts if data is None)
            finally:
                vol.locks.release(regions)

    def _copy_holes(self, vol: "Volume", region: int) -> Generator[Any, Any, bool]:
        """Dirty regions from ``region`` on that hold no data go as one zero command (up to
        copy_hole_regions of them, one SEEK_DATA, one round trip); False if ``region`` itself holds
        data or fewer than two such regions are there (the region-by-region copy takes it)."""
        cfg = self.core.cfg
        if vol.info.rw_mode != T.NORMAL:
            return False                              # a migration fetches regions first
        run = vol.diff.run(region, cfg.copy_hole_regions)
        if run < 2:
            return False
        regions = range(region, region + run)
        yield from vol.locks.acquire(regions)
        try:
            run = vol.diff.run(region, run)      # what is still dirty now that we hold them
            offset = vol.diff.extent(region)[0]
            end = min(vol.info.size, offset + run * cfg.region_bytes)
            if run < 2 or vol.info.pair_state != T.COPYING:
                return False
            hole = yield VolHoleRun(vol.name, offset, end - offset)
            n = run if hole == end - offset else hole // cfg.region_bytes
            if n < 2:
                return False
            length = min(vol.info.size, offset + n * cfg.region_bytes) - offset
            after = self.groups[vol.info.group].stored if vol.info.mode == "async" else 0
            try:
                yield from self.send_copy(vol, offset, None, zero=length, after_seq=after)
            except RcopyError:
                return False                          # the region-by-region copy decides what to do
            yield from vol.syncer.sync()              # as for one region (S1509)
            yield from vol.maps["diff"].update(vol.diff.clear_regions(range(region, region + n)))
            vol.zeroed_bytes += length
            return True
        finally:
            vol.locks.release(regions)

    def _copy_finished(self, vol: "Volume") -> Generator[Any, Any, bool]:
        info = vol.info
        dest = info.copy_dest_info
        assert dest is not None
        consistent_at = self.groups[info.group].stored if info.mode == "async" else 0
        epoch = info.copy_epoch
        try:
            yield from self.core.call(dest.node, dest.control, "pair.resync_done", {
                "volume": dest.volume, "group": info.group if info.mode == "async" else "",
                "consistent_at": consistent_at, "source": self.core.name, "source_volume": vol.name,
                "epoch": info.copy_epoch})
        except RcopyError as exc:
            if info.copy_epoch != epoch:
                return False          # a newer resync started meanwhile: go on copying for it
            if info.pair_state == T.COPYING:
                yield from self.suspend_pair(vol, f"secondary unreachable: {exc}")
            return True
        if info.pair_state == T.COPYING and vol.diff.first_set() is None and info.copy_epoch == epoch:
            yield from vol.maps["diff"].persist(sync=True)   # the clears durable before "duplex" is
            if info.pair_state != T.COPYING or vol.diff.first_set() is not None:
                return False
            T.go(T.PAIR_STATE, info, T.DUPLEX)
            self.core.rt.notify(("pair", vol.name))
            yield from self.core.save()
            return True
        return info.pair_state != T.COPYING

    # ================================================================== control
    def _h_pair_create(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        core = self.core
        vol = core.volume(msg["volume"])
        mode = msg["mode"]
        if mode not in ("sync", "async"):
            raise UsageError("mode must be sync or async")
        transfer = msg.get("transfer") or "push"
        if transfer not in ("push", "pull"):
            raise UsageError("transfer must be push or pull")
        group = check_name("group", msg.get("group") or vol.name)
        secondary = PeerVolume.of(msg["secondary"])
        info = vol.info
        if info.remote_copy_flag != "off":
            raise StateError(f"{core.name}:{vol.name} is already in a pair ({info.role})")
        if info.rw_mode != T.NORMAL or info.migration:
            raise StateError(f"{core.name}:{vol.name} is being migrated")
        diff_block = int(msg.get("diff_block_bytes") or core.cfg.diff_block_bytes)
        if diff_block < 512 or core.cfg.region_bytes % diff_block:
            raise UsageError(f"the diff block must be at least 512 bytes and divide the region "
                             f"({core.cfg.region_bytes} bytes), not {diff_block}")
        next_seq = 0
        if mode == "async":
            for m in core.members(group):
                if m.info.copy_dest_info and m.info.copy_dest_info.node != secondary.node:
                    raise UsageError(f"group {group} replicates to {m.info.copy_dest_info.node}; "
                                     f"all its volumes must go to the same secondary node")
                if m.info.mode != "async" or m.info.transfer != transfer:
                    raise UsageError(f"group {group} uses {m.info.mode}/{m.info.transfer}")
            journal_bytes, reorder_bytes = self._group_limits(msg, group)
            g = yield from self._ensure_group(group, journal_bytes, reorder_bytes=reorder_bytes)
            next_seq = g.counter
        elif any(m.info.mode == "async" for m in core.members(group)):
            raise UsageError(f"group {group} is an async consistency group")
        elif msg.get("journal_bytes") or msg.get("reorder_bytes"):
            raise UsageError("--journal-size and --reorder-buffer are limits of an async group; "
                             "a sync pair has neither")
        yield from vol.reshape_diff(diff_block)         # still simplex: its diff bits are unused
        yield from core.call(secondary.node, secondary.control, "pair.join", {
            "volume": secondary.volume, "source": vars(core_peer(core, vol.name)), "size": info.size,
            "mode": mode, "group": group, "transfer": transfer, "next_seq": next_seq,
            "epoch": info.copy_epoch, "reorder_bytes": g.info.reorder_bytes if mode == "async" else 0})
        others = core.members(group) if mode == "async" else []
        yield from plain_gate.close(vol)        # no plain write in flight from here on
        info.remote_copy_flag = "source"
        info.mode, info.group, info.transfer = mode, group, transfer
        info.copy_dest_info = secondary
        info.auto_resume = bool(msg.get("auto_resume", True))
        # A new member of a group moves with it: the group's copy epoch (a resync may have begun
        # while we joined) and, if the group is suspended, suspended too (its resync copies us).
        info.copy_epoch = max([info.copy_epoch] + [m.info.copy_epoch for m in others])
        suspended = [m for m in others if m.info.pair_state == T.SUSPENDED]
        T.go(T.PAIR_STATE, info, T.SUSPENDED if suspended else T.COPYING)
        info.suspend_reason = suspended[0].info.suspend_reason if suspended else ""
        vol.maps["diff"].note(vol.diff.set_all())       # initial copy: every region differs until copied
        yield from vol.maps["diff"].persist(sync=True)
        yield from core.save()
        self.wake_copier(vol)
        return wire.ok(state=info.pair_state, group=group)

    def _group_limits(self, msg: wire.Message, group: str) -> tuple[int, int]:
        """(journal, reorder buffer) bytes of async group ``group``: those asked (checked) or the
        defaults; a group that exists keeps its own, and asking it for others is an error."""
        cfg = self.core.cfg
        asked = {"journal size": msg.get("journal_bytes"), "reorder buffer": msg.get("reorder_bytes")}
        bounds = {"journal size": (cfg.journal_bytes_min, 1 << 50), "reorder buffer": cfg.reorder_bytes_bounds}
        for what, value in asked.items():
            low, high = bounds[what]
            if value is not None and (type(value) is not int or not low <= value <= high):
                raise UsageError(f"the {what} must be from {low} to {high} bytes, not {value!r}")
        info = self.core.source_group_info.get(group)
        if info is None:
            return asked["journal size"] or cfg.journal_bytes_default, asked["reorder buffer"] or 0
        have = {"journal size": info.journal_bytes, "reorder buffer": info.reorder_bytes or cfg.reorder_bytes_max}
        for what, value in asked.items():
            if value is not None and value != have[what]:
                raise UsageError(f"group {group} has a {what} of {have[what]} bytes; a new member cannot "
                                 f"change it (leave the option out, or use another group)")
        return info.journal_bytes, info.reorder_bytes

    def _ensure_group(self, name: str, journal_bytes: int, counter: int = 1, head: int | None = None,
                      reorder_bytes: int = 0) -> Generator[Any, Any, SourceGroup]:
        g = self.groups.get(name)
        if g is not None:
            return g
        info = SourceGroupInfo(name, journal_bytes, reorder_bytes)
        g = SourceGroup(self.core, info)
        g.counter, g.stored, g.durable, g.applied, g.discarded = counter, counter - 1, counter - 1, counter - 1, counter - 1
        g.transferred, g.next_send = counter - 1, counter
        if head is not None:
            g.space.head = head % g.space.capacity
        yield JournalCreate(name, journal_bytes, counter, head)
        self.groups[name] = g
        self.core.source_group_info[name] = info
        yield from self.core.save()
        self._start_group(g)
        return g

    def drop_group_if_unused(self, name: str) -> Generator[Any, Any, None]:
        if not name or self.core.members(name) or name not in self.groups:
            return
        del self.groups[name]
        self.core.source_group_info.pop(name, None)
        self.core.rt.notify(("stored", name))
        self.core.rt.notify(("append", name))
        yield from self.core.save()
        yield JournalDelete(name)

    def _h_pair_delete(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        core = self.core
        vol = core.volume(msg["volume"])
        info = vol.info
        if info.remote_copy_flag != "source":
            raise StateError(f"{core.name}:{vol.name} is not a remote-copy primary")
        if info.rw_mode != T.NORMAL or info.migration:
            raise StateError(f"{core.name}:{vol.name} is being migrated")
        dest = info.copy_dest_info
        if dest:
            try:
                yield from core.call(dest.node, dest.control, "pair.leave", {
                    "volume": dest.volume, "source": core.name, "source_volume": vol.name})
            except NodeUnreachable as exc:
                if not msg.get("force"):
                    raise NodeUnreachable(f"{exc}; the secondary keeps its pair (use --force to delete anyway)")
        group = info.group
        T.go(T.PAIR_STATE, info, T.OFF)
        info.remote_copy_flag, info.mode, info.group = "off", "", ""
        info.copy_dest_info = None
        vol.maps["diff"].note(vol.diff.clear_all())
        yield from vol.maps["diff"].persist()
        yield from core.save()
        if group:
            yield from self.drop_group_if_unused(group)
        return wire.ok()

    def _source_volume(self, msg: wire.Message) -> "Volume":
        vol = self.core.volume(msg["volume"])
        if vol.info.remote_copy_flag != "source":
            raise StateError(f"{self.core.name}:{vol.name} is not a remote-copy primary")
        return vol

    def _h_pair_suspend(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        vol = self._source_volume(msg)
        yield from self.suspend(vol, T.USER_SUSPEND)
        return wire.ok(state=vol.info.pair_state)

    def _h_pair_resume(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        vol = self._source_volume(msg)
        yield from self.resume(vol)
        return wire.ok(state=vol.info.pair_state)

    def _h_journal_pull(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        from ..errors import NotFound
        g = self.groups.get(msg["group"])
        if g is None:
            raise NotFound(f"node {self.core.name} is not the source of group {msg['group']!r}")
        reply = yield from g.serve_pull(msg)
        return reply

    def _h_journal_applied(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        g = self.groups.get(msg["group"])
        if g is not None:
            yield from g.note_applied(int(msg["applied"]))
        return wire.ok()

    # ---------------------------------------------------------------- relayed host I/O (THROUGH at V2)
    def _h_volume_read(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """Relay path: read V1's bytes for V2 in THROUGH mode (S1104-S1107)."""
        from ..errors import IOErrorRange
        vol = self.core.volume(msg["volume"])
        length = int(msg["length"])
        if length > 64 << 20:
            raise IOErrorRange("read larger than 64 MiB")
        data = yield from self.host_read(vol, int(msg["offset"]), length)
        return wire.ok([data])

    def _h_volume_extents(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """Relay path: V1's block status for V2 in THROUGH mode."""
        runs = yield from self.host_extents(self.core.volume(msg["volume"]), int(msg["offset"]), int(msg["length"]))
        return wire.ok(extents=[[n, hole] for n, hole in runs])

    def _h_volume_write(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """A host write relayed by another node (THROUGH mode, S1105/S1106)."""
        vol = self.core.volume(msg["volume"])
        data = write_data(msg.fields, msg.payloads, "volume.write")
        yield from self.host_write(vol, int(msg["offset"]), data, bool(msg.get("fua")))
        return wire.ok()

    def _h_volume_flush(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        yield from self.host_flush(self.core.volume(msg["volume"]))
        return wire.ok()

    # ================================================================== status
    def pair_status(self, v: "Volume") -> dict[str, Any]:
        info = v.info
        dest = info.copy_dest_info
        assert dest is not None
        lag_writes = lag_bytes = journal_used = 0
        lag_seconds = 0.0
        applied = stored = None
        throttle = {}
        g = self.groups.get(info.group) if info.mode == "async" else None
        if g is not None:
            throttle = {"throttle_ms": round(g.throttle_s() * 1000, 1), "throttled_writes": g.throttled}
            lag_writes, lag_bytes = g.stored - g.applied, g.pending_bytes()
            applied, stored, journal_used = g.applied, g.stored, g.space.used()
            lag_seconds = g.lag_seconds()
        dirty = v.diff.dirty_bytes() if info.pair_state != T.DUPLEX else 0
        return {"primary": f"{self.core.name}:{info.name}", "secondary": dest.label, "mode": info.mode,
                "group": info.group, "transfer": info.transfer, "state": info.pair_state,
                "auto_resume": info.auto_resume, "suspend_reason": info.suspend_reason,
                "lag_writes": lag_writes, "lag_bytes": lag_bytes + dirty, "dirty_bytes": dirty,
                "lag_seconds": round(lag_seconds, 3), "applied_seq": applied, "stored_seq": stored,
                "journal_used_bytes": journal_used, "copied_bytes": v.copied_bytes,
                "zeroed_bytes": v.zeroed_bytes,
                "copy_source_valid": self.core.mig.valid_of(v), **throttle}


def core_peer(core: "NodeCore", volume: str) -> PeerVolume:
    return PeerVolume(core.name, core.control, volume)
