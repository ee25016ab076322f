"""The primary side of remote copy (SPEC 2.1, 2.5, 4.8, 4.10, 5.6, 5.8, 5.10, 5.11):
pairs, initial copy and differential resync, the journal and its transfer to the secondary.

A mixin of Node: it uses the node's volumes, management store and peers.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from journal import Journal, JournalFull

from . import states, wire
from .errors import (
    NodeUnreachable,
    NotFound,
    ProtocolError,
    RangeNotStored,
    RcopyError,
    StateError,
    UsageError,
)
from .mgmt import PeerVolume, check_name

if TYPE_CHECKING:
    from .node import Volume

log = logging.getLogger("rcopy.node")

COPY_WAIT_S = 20.0              # an async region copy waits this long for the apply to catch up
SYNC_TIMEOUT_S = 5.0            # a sync write waits this long for the secondary, then suspends
PUSH_BATCH_BYTES = 4 << 20
HEARTBEAT_S = 0.5
DISCARD_EVERY_S = 0.05          # under load, free applied journal space (a durable meta write) this often
JOURNAL_BYTES_DEFAULT = 256 << 20
USER_SUSPEND = "suspended by user"

@dataclass
class SourceGroup:
    """A consistency group at its primary node: one journal, one counter (SPEC 2.3, 5.3)."""

    name: str
    journal: Journal
    lock: threading.RLock = field(default_factory=threading.RLock)
    new_data: threading.Condition = field(default_factory=threading.Condition)
    link_up: bool = True
    last_error: str = ""
    peer_incarnation: str = ""
    next_send: int = 0
    handover_below: int = 0   # V1 after a handover: send only numbers below this (invariant 17)
    stop: bool = False
    thread: threading.Thread | None = None  # the push loop
    append_times: deque[tuple[int, float]] = field(default_factory=deque)  # (seq, when stored)
    last_discard: float = 0.0
    writing: set[int] = field(default_factory=set)  # journaled, volume write not yet done

    def discardable(self, applied: int) -> int:
        """The highest sequence number whose journal space may be freed: applied at the
        secondary and already written to the primary's own volume (a crash between the
        journal append and the volume write is repaired by rolling the journal forward)."""
        with self.lock:
            first_writing = min(self.writing, default=applied + 1)
        return min(applied, self.journal.stored, first_writing - 1)

    def should_discard(self, applied: int, now: float) -> bool:
        """Free applied journal space now? Each discard is a durable meta write, so under load
        at most every DISCARD_EVERY_S; at once when the secondary has everything (status then
        shows no lag) or the journal is half full. Discarding late is safe: after a crash the
        entries the secondary already applied are resent and ignored there."""
        j = self.journal
        return (applied >= j.stored or now - self.last_discard >= DISCARD_EVERY_S
                or 2 * j.used_bytes >= j.capacity_bytes)

    def lag_seconds(self, applied: int) -> float:
        """Age of the oldest acknowledged write the secondary has not applied (RPO in seconds)."""
        with self.lock:
            while self.append_times and self.append_times[0][0] <= applied:
                self.append_times.popleft()
            return time.monotonic() - self.append_times[0][1] if self.append_times else 0.0


class PrimarySide:
    """Node methods of a remote-copy source."""

    def _write_sync(self, vol: Volume, data: bytes, offset: int) -> None:
        info = vol.info
        if info.pair_state == states.SUSPENDED or vol.diff.any_set(offset, len(data)):
            vol.diff.set_range(offset, len(data))  # S1126: track, do not send
            vol.store.write(offset, data)
            return
        with vol.activity.track(offset, len(data)):  # a crash from here on resyncs the region
            vol.store.write(offset, data)
            try:
                self._send_pair_write(vol, offset, data)  # S1129: wait for the secondary
            except (NodeUnreachable, StateError, ProtocolError) as exc:
                # Suspend first, then acknowledge: the write is tracked in diff_bitmap (invariant 19).
                vol.diff.set_range(offset, len(data))
                self._suspend_volume(vol, f"secondary unreachable: {exc}")

    def _send_pair_write(self, vol: Volume, offset: int, data: bytes | None, zero: int = 0,
                         after_seq: int = 0) -> None:
        dest = vol.info.copy_dest_info
        assert dest is not None
        fields = {"volume": dest.volume, "offset": offset, "source": self.name, "zero": zero,
                  "after_seq": after_seq, "epoch": vol.info.copy_epoch}
        self.peer(dest, wire.Message("pair.write", fields, [data] if data is not None else []),
                  timeout_s=COPY_WAIT_S + SYNC_TIMEOUT_S if after_seq else SYNC_TIMEOUT_S)

    def _write_async(self, vol: Volume, data: bytes, offset: int) -> None:
        info = vol.info
        group = self.source_groups[info.group]
        seq = 0
        with group.lock:
            if info.pair_state == states.SUSPENDED or vol.diff.any_set(offset, len(data)):
                vol.diff.set_range(offset, len(data))
            else:
                try:
                    seq = group.journal.append(info.name, offset, bytes(data))  # S2401-S2404
                    group.append_times.append((seq, time.monotonic()))
                    group.writing.add(seq)
                except JournalFull:
                    self._fold_and_suspend(group, "journal full")
                    vol.diff.set_range(offset, len(data))
        try:
            vol.store.write(offset, data)  # S1133
        finally:
            if seq:
                with group.lock:
                    group.writing.discard(seq)
        with group.new_data:
            group.new_data.notify()


    # ------------------------------------------------------------------ pairs (primary side)
    def _h_pair_create(self, msg: wire.Message) -> wire.Message:
        vol = self.volume(msg["volume"])
        mode = msg["mode"]
        if mode not in ("sync", "async"):
            raise UsageError("mode must be sync or async")
        transfer = msg.get("transfer", "push")
        if transfer not in ("push", "pull"):
            raise UsageError("transfer must be push or pull")
        group = check_name("group", msg.get("group") or vol.info.name)
        secondary = PeerVolume(**msg["secondary"])
        info = vol.info
        if info.remote_copy_flag != "off":
            raise StateError(f"{self.name}:{info.name} is already in a pair ({info.role})")
        if info.rw_mode != states.NORMAL:
            raise StateError(f"{self.name}:{info.name} is being migrated")
        journal_bytes = int(msg.get("journal_bytes") or JOURNAL_BYTES_DEFAULT)
        if mode == "async":
            members = [v for v in self.volumes.values()
                       if v.info.group == group and v.info.remote_copy_flag == "source"]
            for m in members:
                if m.info.copy_dest_info and m.info.copy_dest_info.node != secondary.node:
                    raise UsageError(f"group {group} replicates to {m.info.copy_dest_info.node}; "
                                     f"all its volumes must go to the same secondary node")
                if m.info.mode != "async" or m.info.transfer != transfer:
                    raise UsageError(f"group {group} uses {m.info.mode}/{m.info.transfer}")
            sgroup = self._source_group(group, journal_bytes)
            next_seq = sgroup.journal.counter
        else:
            next_seq = 0
        self.peer(secondary, wire.Message("pair.join", {
            "volume": secondary.volume, "source": self.me(info.name).__dict__, "size": info.size,
            "mode": mode, "group": group, "transfer": transfer, "next_seq": next_seq,
            "epoch": info.copy_epoch}))
        with self.mgmt.lock:
            info.remote_copy_flag = "source"
            info.mode, info.group, info.transfer = mode, group, transfer
            info.copy_dest_info = secondary
            info.auto_resume = bool(msg.get("auto_resume", True))
            info.pair_state = states.COPYING
            info.suspend_reason = ""
            vol.diff.set_all()  # initial copy: every region differs until copied
            self.save()
        if mode == "async":
            self._start_source_group(self.source_groups[group])
        self._copier_wake.set()
        return wire.ok(state=info.pair_state, group=group)

    def _h_pair_delete(self, msg: wire.Message) -> wire.Message:
        vol = self.volume(msg["volume"])
        info = vol.info
        if info.remote_copy_flag != "source":
            raise StateError(f"{self.name}:{info.name} is not a remote-copy primary")
        if info.rw_mode != states.NORMAL:
            raise StateError(f"{self.name}:{info.name} is being migrated")
        dest = info.copy_dest_info
        try:
            if dest:
                self.peer(dest, wire.Message("pair.leave", {"volume": dest.volume, "source": self.name}))
        except NodeUnreachable as exc:
            if not msg.get("force"):
                raise NodeUnreachable(f"{exc}; the secondary keeps its pair (use --force to delete anyway)")
        with self.mgmt.lock:
            info.remote_copy_flag, info.mode, info.pair_state = "off", "", ""
            info.copy_dest_info = None
            group = info.group
            info.group = ""
            vol.diff.clear_all()
            self.save()
        self._drop_source_group_if_unused(group)
        return wire.ok()

    def _drop_source_group_if_unused(self, group: str) -> None:
        if any(v.info.group == group and v.info.remote_copy_flag == "source" for v in self.volumes.values()):
            return
        sg = self.source_groups.pop(group, None)
        if sg:
            sg.stop = True
            with sg.new_data:
                sg.new_data.notify_all()

    def _group_members(self, vol: Volume) -> list[Volume]:
        if vol.info.mode != "async":
            return [vol]
        return [v for v in self.volumes.values()
                if v.info.group == vol.info.group and v.info.remote_copy_flag == "source"]

    def _h_pair_suspend(self, msg: wire.Message) -> wire.Message:
        vol = self.volume(msg["volume"])
        if vol.info.remote_copy_flag != "source":
            raise StateError(f"{self.name}:{vol.info.name} is not a remote-copy primary")
        if vol.info.mode == "async":
            self._fold_and_suspend(self.source_groups[vol.info.group], USER_SUSPEND)
        else:
            with vol.locks.hold(0, vol.info.size):
                self._suspend_volume(vol, USER_SUSPEND)
        return wire.ok(state=vol.info.pair_state)

    def _suspend_volume(self, vol: Volume, reason: str) -> None:
        with self.mgmt.lock:
            if vol.info.pair_state != states.SUSPENDED:
                log.warning("pair %s suspended: %s", vol.info.name, reason)
            vol.info.pair_state = states.pair_transition(vol.info.pair_state, states.SUSPENDED)
            vol.info.suspend_reason = reason
            self.save()

    def _fold_and_suspend(self, group: SourceGroup, reason: str) -> None:
        """Journal full or user suspend: fold unapplied entries into diff bitmaps (SPEC durability rules)."""
        with group.lock:  # re-entrant: a host write that hit JournalFull already holds it
            self._fold(group)
            for v in self.volumes.values():
                if v.info.group == group.name and v.info.remote_copy_flag == "source":
                    self._suspend_volume(v, reason)
            self.save()

    def _fold(self, group: SourceGroup) -> None:
        """Move every journal entry the secondary has not applied into the diff bitmaps."""
        self._mark_dirty(group.journal.unapplied_extents())  # bits first, durably,
        self._mark_dirty(group.journal.fold_unapplied())     # then discard the entries

    def _mark_dirty(self, extents: list[tuple[str, int, int]]) -> None:
        for vname, offset, length in extents:
            if vname in self.volumes:
                self.volumes[vname].diff.set_range(offset, length)

    def _h_pair_resume(self, msg: wire.Message) -> wire.Message:
        vol = self.volume(msg["volume"])
        if vol.info.remote_copy_flag != "source":
            raise StateError(f"{self.name}:{vol.info.name} is not a remote-copy primary")
        self.resume(vol)
        return wire.ok(state=vol.info.pair_state)

    def resume(self, vol: Volume) -> None:
        """Differential resync (SPEC 4.10): copy only the regions marked in diff_bitmap."""
        members = self._group_members(vol)
        if all(m.info.pair_state != states.SUSPENDED for m in members):
            return
        dest = vol.info.copy_dest_info
        assert dest is not None
        epoch = self._new_epoch(members)
        if vol.info.mode == "async":
            group = self.source_groups[vol.info.group]
            with group.lock:
                # The secondary restarts its sequence at next_seq: whatever the journal still
                # holds unapplied (a suspend by a failed copy does not fold) goes by the bitmap.
                self._fold(group)
                next_seq = group.journal.counter
                self.peer(dest, wire.Message("pair.resync_begin", {
                    "group": vol.info.group, "next_seq": next_seq, "source": self.name, "epoch": epoch}))
                group.next_send = next_seq
                self._set_copying(members)
        else:
            self.peer(dest, wire.Message("pair.resync_begin", {
                "group": "", "volume": dest.volume, "next_seq": 0, "source": self.name, "epoch": epoch}))
            with vol.locks.hold(0, vol.info.size):
                self._set_copying(members)
        self._copier_wake.set()

    def _new_epoch(self, members: list[Volume]) -> int:
        """A new copy epoch for a resync. A pair.write that timed out (the pair then suspended)
        may still reach the secondary later, from a TCP buffer after the link heals; carrying
        an older epoch, it is refused there instead of overwriting the resync's newer data."""
        with self.mgmt.lock:
            epoch = max(m.info.copy_epoch for m in members) + 1
            for m in members:
                m.info.copy_epoch = epoch
            self.save()
        return epoch

    def _set_copying(self, members: list[Volume]) -> None:
        with self.mgmt.lock:
            for m in members:
                m.info.pair_state = states.pair_transition(m.info.pair_state, states.COPYING)
                m.info.suspend_reason = ""
            self.save()

    # ------------------------------------------------------------------ initial copy / resync
    def _copier_loop(self) -> None:
        """Copy dirty regions of every pair in state copying (S1501-S1509)."""
        next_watch = 0.0
        while not self._stop.is_set():
            busy = False
            if time.monotonic() >= next_watch:
                next_watch = time.monotonic() + 1.0
                self._auto_resume_sync_pairs()
                for vol in list(self.volumes.values()):
                    vol.activity.retire_idle()
            for vol in list(self.volumes.values()):
                if vol.info.remote_copy_flag == "source" and vol.info.pair_state == states.COPYING \
                        and not vol.info.migration.get("frozen"):
                    busy |= self._copy_some(vol)
            if not busy:
                self._copier_wake.wait(0.2)
                self._copier_wake.clear()

    def _recover_activity(self, vol: Volume) -> None:
        """After a crash, regions with a sync write in flight may differ: resync them."""
        if not vol.activity.move_to(vol.diff):
            return
        info = vol.info
        log.warning("%s: sync writes were in flight at the last stop; resynchronising %d region(s)",
                    info.name, vol.diff.count())
        if info.remote_copy_flag == "source" and info.pair_state == states.DUPLEX:
            info.pair_state = states.pair_transition(info.pair_state, states.SUSPENDED)
            info.suspend_reason = "restart with sync writes in flight: resynchronising"
            self.save()

    def _auto_resume_sync_pairs(self) -> None:
        """A sync pair suspended by a link failure resynchronises once the secondary answers."""
        for vol in list(self.volumes.values()):
            info = vol.info
            if (info.remote_copy_flag == "source" and info.mode == "sync" and self.auto_resume
                    and info.pair_state == states.SUSPENDED and info.suspend_reason != USER_SUSPEND
                    and info.auto_resume
                    and not info.migration.get("frozen") and info.copy_dest_info):
                try:
                    self.peer(info.copy_dest_info, wire.Message("ping"), timeout_s=1.0)
                    self.resume(vol)
                except RcopyError as exc:
                    log.debug("sync pair %s stays suspended: %s", info.name, exc)

    def _copy_some(self, vol: Volume, regions_max: int = 64) -> bool:
        done = 0
        while done < regions_max and not self._stop.is_set():
            region = vol.diff.first_set()
            if region is None:
                self._copy_finished(vol)
                return False
            if vol.info.pair_state != states.COPYING:
                return False
            offset, length = vol.diff.extent(region)
            with vol.locks.hold(offset, length):
                if not vol.diff.is_set(region) or vol.info.pair_state != states.COPYING:
                    continue
                if vol.info.rw_mode == states.MIGRATING and not vol.migrated.is_set(region):
                    self.migrations.fetch_region(vol, region)  # S1504-S1507
                # Async: the copy must be applied after every journal entry stored so far and
                # before any later one, so it travels with the current stored number.
                after = self.source_groups[vol.info.group].journal.stored if vol.info.mode == "async" else 0
                try:
                    if vol.store.is_hole(offset, length):
                        self._send_pair_write(vol, offset, None, zero=length, after_seq=after)
                    else:
                        self._send_pair_write(vol, offset, vol.store.read(offset, length), after_seq=after)
                except StateError as exc:
                    log.info("copy of %s region %d deferred: %s", vol.info.name, region, exc)
                    return False
                except (NodeUnreachable, ProtocolError) as exc:
                    self._suspend_volume(vol, f"copy interrupted: {exc}")
                    return False
                vol.diff.clear(region)  # S1509: only after the area is on the secondary
                vol.copied_bytes += length
            done += 1
        return True

    def _copy_finished(self, vol: Volume) -> None:
        info = vol.info
        dest = info.copy_dest_info
        assert dest is not None
        consistent_at = 0
        if info.mode == "async":
            group = self.source_groups[info.group]
            consistent_at = group.journal.stored
        try:
            self.peer(dest, wire.Message("pair.resync_done", {
                "volume": dest.volume, "group": info.group if info.mode == "async" else "",
                "consistent_at": consistent_at, "source": self.name}))
        except (NodeUnreachable, StateError) as exc:
            self._suspend_volume(vol, f"secondary unreachable: {exc}")
            return
        with self.mgmt.lock:
            if info.pair_state == states.COPYING and vol.diff.first_set() is None:
                info.pair_state = states.pair_transition(info.pair_state, states.DUPLEX)
                self.save()

    # ------------------------------------------------------------------ async transfer (source)
    def _source_group(self, name: str, capacity: int = JOURNAL_BYTES_DEFAULT) -> SourceGroup:
        group = self.source_groups.get(name)
        if group is None:
            jdir = self.state_dir / "journals"
            jdir.mkdir(exist_ok=True)
            journal = Journal(jdir, name, capacity)
            group = SourceGroup(name, journal)
            group.next_send = journal.applied + 1
            self.source_groups[name] = group
            self._after_journal_recovery(group)
        return group

    def _after_journal_recovery(self, group: SourceGroup) -> None:
        """Entries the journal could not recover must still reach the secondary: via the bitmap."""
        rec = getattr(group.journal, "last_recovery", None)
        if rec is None or not (rec.lost_entries or rec.folded):
            return
        members = [v for v in self.volumes.values()
                   if v.info.group == group.name and v.info.remote_copy_flag == "source"]
        if rec.lost_entries:
            log.error("journal %s lost %d entries; full resync of %s", group.name, rec.lost_entries,
                      [v.info.name for v in members])
            for v in members:
                v.diff.set_all()
        self._mark_dirty(list(rec.folded))
        for v in members:
            if v.info.pair_state != states.SUSPENDED:
                v.info.pair_state = states.SUSPENDED
                v.info.suspend_reason = "journal recovery: resynchronising"
        self.save()

    def _roll_forward(self, group: SourceGroup) -> None:
        """After a restart, rewrite every journal entry into its volume, in order: a crash
        between the journal append and the volume write must not leave the secondary (which
        may have applied the entry) ahead of the primary. A migration source past its handover
        is skipped: the handover waited for its writes, and a dual write may be newer."""
        journal, seq, count = group.journal, group.journal.discarded + 1, 0
        while seq <= journal.stored:
            entries = journal.read(seq)
            for e in entries:
                vol = self.volumes.get(e.volume)
                if vol is not None and vol.info.migration.get("role") != "source":
                    vol.store.write(e.offset, e.data)
                    count += 1
            seq = entries[-1].seq + 1
        if count:
            log.info("journal %s: rolled %d entries forward into the volumes", group.name, count)

    def _start_source_group(self, group: SourceGroup) -> None:
        if group.thread is None and self.server is not None:
            group.thread = self._spawn(lambda: self._push_loop(group), f"rcopy-push-{group.name}")

    def _group_dest(self, group: SourceGroup) -> tuple[PeerVolume | None, str, str]:
        for v in self.volumes.values():
            if v.info.group == group.name and v.info.remote_copy_flag == "source":
                return v.info.copy_dest_info, v.info.transfer, v.info.pair_state
        return None, "push", ""

    def _push_loop(self, group: SourceGroup) -> None:
        """Async-transfer (W) 212 with deferred discard (Fig. 26, 28, 30)."""
        next_heartbeat = 0.0
        while not group.stop and not self._stop.is_set():
            dest, transfer, pair_state = self._group_dest(group)
            if dest is None:
                return
            journal = group.journal
            if pair_state == states.SUSPENDED:
                self._maybe_auto_resume(group, dest)
                time.sleep(HEARTBEAT_S)
                continue
            if transfer == "pull":  # the secondary pulls; nothing to push, just wait
                with group.new_data:
                    group.new_data.wait(HEARTBEAT_S)
                continue
            entries = []
            start = max(group.next_send, journal.discarded + 1)
            limit = group.handover_below or (1 << 62)
            if start <= journal.stored and start < limit:
                try:
                    entries = [e for e in journal.read(start, PUSH_BATCH_BYTES) if e.seq < limit]
                except RangeNotStored:
                    entries = []
            now = time.monotonic()
            if not entries and now < next_heartbeat:
                with group.new_data:
                    group.new_data.wait(0.05)
                continue
            try:
                reply = self.peer(dest, wire.Message("journal.push", {
                    "group": group.name, "source": self.name,
                    "entries": [[e.seq, e.volume, e.offset, len(e.data)] for e in entries]},
                    [e.data for e in entries]), timeout_s=SYNC_TIMEOUT_S)
            except RcopyError as exc:
                group.link_up, group.last_error = False, str(exc)
                group.next_send = journal.applied + 1
                time.sleep(min(HEARTBEAT_S, 0.2))
                continue
            group.link_up, group.last_error = True, ""
            next_heartbeat = now + HEARTBEAT_S
            if reply.get("incarnation") != group.peer_incarnation:
                group.peer_incarnation = reply.get("incarnation", "")
                group.next_send = int(reply.get("applied", 0)) + 1
            elif entries:
                group.next_send = entries[-1].seq + 1
                journal.mark_transferred(entries[-1].seq)
            applied = group.discardable(int(reply.get("applied", 0)))
            if applied > journal.applied and group.should_discard(applied, now):
                journal.mark_applied(applied)
                group.last_discard = now

    def _maybe_auto_resume(self, group: SourceGroup, dest: PeerVolume) -> None:
        members = [v for v in self.volumes.values()
                   if v.info.group == group.name and v.info.remote_copy_flag == "source"]
        if not self.auto_resume or not members or any(v.info.suspend_reason == USER_SUSPEND or not v.info.auto_resume for v in members):
            return
        try:
            self.peer(dest, wire.Message("ping"), timeout_s=1.0)
        except NodeUnreachable:
            return
        try:
            log.info("group %s: secondary reachable again, resynchronising", group.name)
            self.resume(members[0])
        except RcopyError as exc:
            log.warning("auto-resume of %s failed: %s", group.name, exc)

    def _h_journal_pull(self, msg: wire.Message) -> wire.Message:
        """Serve a pull (Fig. 32): entries from ``from_seq``; discard up to the reported applied."""
        group = self.source_groups.get(msg["group"])
        if group is None:
            raise NotFound(f"node {self.name} is not the source of group {msg['group']!r}")
        journal = group.journal
        applied = int(msg.get("applied", 0))
        if applied:
            journal.mark_applied(group.discardable(applied))
        dest, _, pair_state = self._group_dest(group)
        if pair_state == states.SUSPENDED:
            return wire.ok(entries=[], applied=journal.applied)
        start = int(msg["from_seq"])
        limit = group.handover_below or (1 << 62)
        if start >= limit:
            return wire.ok(entries=[], drained=True)
        entries = [e for e in journal.read(start, int(msg.get("max_bytes", PUSH_BATCH_BYTES))) if e.seq < limit]
        if entries:
            journal.mark_transferred(entries[-1].seq)
        return wire.ok([e.data for e in entries],
                       entries=[[e.seq, e.volume, e.offset, len(e.data)] for e in entries])

    def _h_journal_applied(self, msg: wire.Message) -> wire.Message:
        group = self.source_groups.get(msg["group"])
        if group is not None:
            group.journal.mark_applied(group.discardable(int(msg["applied"])))
        return wire.ok()

