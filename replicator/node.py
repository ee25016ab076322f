"""A storage node: its volumes, the pairs they belong to, and its control server.

This is where the pure pieces (states, region maps, the ordered applier, the
journal) are wired to files, threads and ZeroMQ. One Node lives inside each
nbdkit process (nbd_plugins/storage_node.py forwards every NBD callback here).

Threads: nbdkit's worker threads call read/write; the control server's workers
run ``handle``; a copier thread runs initial copies and differential resyncs;
each async group has a transfer thread (push at the primary, pull at the
secondary); migration runs its own threads (migration.py).
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from journal import Journal, JournalFull

from . import states, wire
from .applier import OrderedApplier
from .errors import (IOErrorRange, NodeUnreachable, NotFound, ProtocolError, RangeNotStored,
                     RcopyError, ReadOnlyError, StateError, UsageError)
from .keys import load as load_keys
from .mgmt import GroupInfo, ManagementStore, PeerVolume, VolumeInfo
from .regionmap import RegionMap
from .transport import ClientPool, Server
from .volume import InFlight, RegionLocks, VolumeStore

log = logging.getLogger("rcopy.node")

REGION_BYTES = 1 << 20
COPY_WAIT_S = 20.0              # an async region copy waits this long for the apply to catch up
SYNC_TIMEOUT_S = 5.0            # a sync write waits this long for the secondary, then suspends
PUSH_BATCH_BYTES = 4 << 20
HEARTBEAT_S = 0.5
JOURNAL_BYTES_DEFAULT = 256 << 20
USER_SUSPEND = "suspended by user"
NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not name or set(name) - NAME_OK or name[0] == ".":
        raise UsageError(f"invalid {kind} name {name!r} (letters, digits, - _ . only)")
    return name


@dataclass
class Volume:
    """A volume at run time: its management info, bytes, bitmaps and locks."""

    info: VolumeInfo
    store: VolumeStore
    diff: RegionMap
    migrated: RegionMap
    locks: RegionLocks
    inflight: InFlight = field(default_factory=InFlight)
    writes: int = 0
    bytes_written: int = 0
    copied_bytes: int = 0       # sent by initial copy and differential resync


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


@dataclass
class DestGroup:
    """A consistency group at its secondary node: the reorder buffer and apply state."""

    info: GroupInfo
    applier: OrderedApplier
    lock: threading.Lock = field(default_factory=threading.Lock)
    progress: threading.Condition = field(default_factory=threading.Condition)  # applied advanced
    consistent_at: int = 0      # the group is consistent again once applied >= this
    pull_cursor: dict[str, int] = field(default_factory=dict)


class Node:
    """One storage system (SPEC 1.2): volumes, pairs, journals, control server."""

    def __init__(self, name: str, state_dir: Path, control: str, keys_dir: str | None = None,
                 metrics: str | None = None) -> None:
        self.name = name
        self.state_dir = Path(state_dir)
        self.control = control
        self.incarnation = uuid.uuid4().hex[:12]
        (self.state_dir / "volumes").mkdir(parents=True, exist_ok=True)
        self.mgmt = ManagementStore(self.state_dir / "node.json")
        self.volumes: dict[str, Volume] = {}
        self.source_groups: dict[str, SourceGroup] = {}
        self.dest_groups: dict[str, DestGroup] = {}
        self.metrics_address = metrics
        self.keys = load_keys(Path(keys_dir)) if keys_dir else None
        self.clients = ClientPool(timeout_s=10.0, keys=self.keys)
        self.server: Server | None = None
        self._stop = threading.Event()
        self._copier_wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self.auto_resume = True
        self.migrations: Any = None  # set by start(): migration.MigrationManager
        self._handlers: dict[str, Callable[[wire.Message], wire.Message]] = {
            "ping": self._h_ping,
            "status": self._h_status,
            "volume.create": self._h_volume_create,
            "volume.delete": self._h_volume_delete,
            "volume.hash": self._h_volume_hash,
            "volume.read": self._h_volume_read,
            "volume.write": self._h_volume_write,
            "pair.create": self._h_pair_create,
            "pair.join": self._h_pair_join,
            "pair.leave": self._h_pair_leave,
            "pair.delete": self._h_pair_delete,
            "pair.suspend": self._h_pair_suspend,
            "pair.resume": self._h_pair_resume,
            "pair.write": self._h_pair_write,
            "pair.resync_begin": self._h_resync_begin,
            "pair.resync_done": self._h_resync_done,
            "journal.push": self._h_journal_push,
            "journal.pull": self._h_journal_pull,
            "journal.applied": self._h_journal_applied,
        }
        self._load()

    # ------------------------------------------------------------------ life cycle
    def _load(self) -> None:
        for name, info in self.mgmt.volumes.items():
            self._open_volume(info, create=False)
        for info in self.mgmt.volumes.values():
            if info.remote_copy_flag == "source" and info.mode == "async":
                self._source_group(info.group)
        for gname, ginfo in self.mgmt.groups.items():
            self._dest_group(ginfo)

    def _open_volume(self, info: VolumeInfo, create: bool) -> Volume:
        vdir = self.state_dir / "volumes"
        store = VolumeStore(vdir / f"{info.name}.img", info.size, create=create)
        diff = self._bitmap(info, "diff")
        migrated = self._bitmap(info, "migrated")
        vol = Volume(info, store, diff, migrated, RegionLocks(REGION_BYTES))
        self.volumes[info.name] = vol
        return vol

    def _bitmap(self, info: VolumeInfo, kind: str) -> RegionMap:
        path = self.state_dir / "volumes" / f"{info.name}.{kind}.bitmap"
        try:
            return RegionMap(info.size, REGION_BYTES, path)
        except RcopyError as exc:
            # A damaged bitmap must never hide a dirty region: assume everything dirty.
            log.error("%s; rebuilding it with every region marked", exc)
            path.unlink(missing_ok=True)
            bm = RegionMap(info.size, REGION_BYTES, path)
            if kind == "diff" and info.remote_copy_flag == "source":
                bm.set_all()
                info.pair_state = states.COPYING if info.pair_state != states.SUSPENDED else info.pair_state
            return bm

    def start(self) -> None:
        """Start the control server and background threads (call after nbdkit forked)."""
        from .migration import MigrationManager
        self.migrations = MigrationManager(self)
        self.server = Server(self.control, self.handle, keys=self.keys)
        self.server.start()
        if self.metrics_address:
            from .metrics import serve
            self._metrics_server = serve(self, self.metrics_address)
        self._spawn(self._copier_loop, "rcopy-copier")
        for group in list(self.source_groups.values()):
            self._start_source_group(group)
        for dg in list(self.dest_groups.values()):
            self._start_pull(dg)
        self.migrations.resume_after_restart()
        log.info("node %s ready (control %s, incarnation %s)", self.name, self.control, self.incarnation)

    def stop(self) -> None:
        self._stop.set()
        self._copier_wake.set()
        for g in self.source_groups.values():
            g.stop = True
            with g.new_data:
                g.new_data.notify_all()
        if self.server:
            self.server.stop()
        for t in self._threads:
            t.join(timeout=3)
        for g in self.source_groups.values():
            g.journal.close()
        for v in self.volumes.values():
            v.store.flush()

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        t = threading.Thread(target=self._guard(target, name), name=name, daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def _guard(self, target: Callable[[], None], name: str) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception:
                log.exception("thread %s died", name)
        return run

    # ------------------------------------------------------------------ control dispatch
    def handle(self, msg: wire.Message) -> wire.Message:
        handler = self._handlers.get(msg.kind)
        if handler is None and self.migrations is not None:
            handler = self.migrations.handlers.get(msg.kind)
        if handler is None:
            raise ProtocolError(f"unknown message kind {msg.kind!r}")
        return handler(msg)

    def peer(self, peer: PeerVolume | str, msg: wire.Message, timeout_s: float | None = None) -> wire.Message:
        endpoint = peer.control if isinstance(peer, PeerVolume) else peer
        return self.clients.request(endpoint, msg, timeout_s)

    def volume(self, name: str) -> Volume:
        try:
            return self.volumes[name]
        except KeyError:
            raise NotFound(f"node {self.name} has no volume {name!r}") from None

    def save(self) -> None:
        self.mgmt.save()

    def me(self, volume: str) -> PeerVolume:
        return PeerVolume(self.name, self.control, volume)

    # ------------------------------------------------------------------ host I/O (NBD)
    def read(self, vol: Volume, offset: int, length: int) -> bytes:
        vol.store.check(offset, length)
        if vol.info.rw_mode != states.NORMAL:
            return self.migrations.read(vol, offset, length)
        with vol.inflight.track():
            return vol.store.read(offset, length)

    def write(self, vol: Volume, data: bytes, offset: int, fua: bool = False) -> None:
        vol.store.check(offset, len(data))
        info = vol.info
        if info.remote_copy_flag == "dest":
            raise ReadOnlyError(f"{self.name}:{info.name} is a remote-copy secondary; hosts cannot write it")
        if info.rw_mode != states.NORMAL or info.migration.get("frozen"):
            self.migrations.write(vol, data, offset, fua)
            return
        with vol.inflight.track():
            self.write_local_and_replicate(vol, data, offset)
            if fua:
                self.flush(vol)

    def write_local_and_replicate(self, vol: Volume, data: bytes, offset: int) -> None:
        """SPEC 4.6 Fig. 11 (11A): store locally and remote-copy per the pair's state."""
        info = vol.info
        vol.writes += 1
        vol.bytes_written += len(data)
        with vol.locks.hold(offset, len(data)):
            if info.remote_copy_flag != "source":
                vol.store.write(offset, data)
            elif info.mode == "sync":
                self._write_sync(vol, data, offset)
            else:
                self._write_async(vol, data, offset)

    def _write_sync(self, vol: Volume, data: bytes, offset: int) -> None:
        info = vol.info
        if info.pair_state == states.SUSPENDED or vol.diff.any_set(offset, len(data)):
            vol.diff.set_range(offset, len(data))  # S1126: track, do not send
            vol.store.write(offset, data)
            return
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
                  "after_seq": after_seq}
        self.peer(dest, wire.Message("pair.write", fields, [data] if data is not None else []),
                  timeout_s=COPY_WAIT_S + SYNC_TIMEOUT_S if after_seq else SYNC_TIMEOUT_S)

    def _write_async(self, vol: Volume, data: bytes, offset: int) -> None:
        info = vol.info
        group = self.source_groups[info.group]
        with group.lock:
            if info.pair_state == states.SUSPENDED or vol.diff.any_set(offset, len(data)):
                vol.diff.set_range(offset, len(data))
            else:
                try:
                    group.journal.append(info.name, offset, bytes(data))  # S2401-S2404
                except JournalFull:
                    self._fold_and_suspend(group, "journal full")
                    vol.diff.set_range(offset, len(data))
        vol.store.write(offset, data)  # S1133
        with group.new_data:
            group.new_data.notify()

    def trim(self, vol: Volume, length: int, offset: int) -> None:
        """Accepted and ignored (NBD lets a server ignore TRIM): the contents stay as they were."""
        vol.store.check(offset, length)

    def flush(self, vol: Volume) -> None:
        vol.store.flush()
        if vol.info.remote_copy_flag == "source" and vol.info.mode == "async":
            self.source_groups[vol.info.group].journal.sync()
        vol.diff.sync()

    # ------------------------------------------------------------------ volumes
    def _h_ping(self, msg: wire.Message) -> wire.Message:
        return wire.ok(name=self.name, pid=os.getpid(), role="node", incarnation=self.incarnation)

    def _h_volume_create(self, msg: wire.Message) -> wire.Message:
        name = check_name("volume", msg["name"])
        size = msg["size"]
        if not isinstance(size, int) or size <= 0 or size % 512:
            raise UsageError("volume size must be a positive multiple of 512 bytes")
        with self.mgmt.lock:
            if name in self.volumes:
                raise StateError(f"volume {self.name}:{name} already exists")
            info = VolumeInfo(name=name, size=size)
            self._open_volume(info, create=True)
            self.mgmt.volumes[name] = info
            self.save()
        return wire.ok(volume=name, size=size)

    def _h_volume_delete(self, msg: wire.Message) -> wire.Message:
        vol = self.volume(msg["name"])
        if vol.info.remote_copy_flag != "off" or vol.info.rw_mode != states.NORMAL:
            raise StateError(f"volume {self.name}:{vol.info.name} is in a pair or migration; delete that first")
        with self.mgmt.lock:
            del self.volumes[vol.info.name]
            del self.mgmt.volumes[vol.info.name]
            self.save()
        vol.store.close()
        for p in (vol.store.path, vol.diff.path, vol.migrated.path):
            if p:
                p.unlink(missing_ok=True)
        return wire.ok()

    def _h_volume_hash(self, msg: wire.Message) -> wire.Message:
        """Per-region BLAKE2 digests, so verify compares volumes without moving their bytes."""
        vol = self.volume(msg["name"])
        chunk = int(msg.get("chunk", REGION_BYTES))
        if chunk <= 0 or chunk > 64 << 20:
            raise UsageError("chunk must be in (0, 64 MiB]")
        digests = []
        for off in range(0, vol.info.size, chunk):
            n = min(chunk, vol.info.size - off)
            if vol.store.is_hole(off, n):
                digests.append("0")
            else:
                data = vol.store.read(off, n)
                digests.append("0" if not any(data) else hashlib.blake2b(data, digest_size=16).hexdigest())
        return wire.ok(size=vol.info.size, chunk=chunk, digests=digests)

    def _h_volume_read(self, msg: wire.Message) -> wire.Message:
        """Relay or fetch path: read V1's bytes for another node (S1104-S1107, S1113)."""
        vol = self.volume(msg["volume"])
        length = int(msg["length"])
        if length > 64 << 20:
            raise IOErrorRange("read larger than 64 MiB")
        return wire.ok(payloads=[self.read(vol, int(msg["offset"]), length)])

    def _h_volume_write(self, msg: wire.Message) -> wire.Message:
        """A host write relayed by another node (THROUGH mode, S1105/S1106)."""
        vol = self.volume(msg["volume"])
        if not msg.payloads:
            raise ProtocolError("volume.write without data")
        self.write(vol, msg.payloads[0], int(msg["offset"]), bool(msg.get("fua")))
        return wire.ok()

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
            "mode": mode, "group": group, "transfer": transfer, "next_seq": next_seq}))
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
            self._mark_dirty(group.journal.unapplied_extents())  # bits first, durably,
            self._mark_dirty(group.journal.fold_unapplied())     # then discard the entries
            for v in self.volumes.values():
                if v.info.group == group.name and v.info.remote_copy_flag == "source":
                    self._suspend_volume(v, reason)
            self.save()

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
        if vol.info.mode == "async":
            group = self.source_groups[vol.info.group]
            with group.lock:
                next_seq = group.journal.counter
                self.peer(dest, wire.Message("pair.resync_begin", {
                    "group": vol.info.group, "next_seq": next_seq, "source": self.name}))
                group.next_send = next_seq
                self._set_copying(members)
        else:
            self.peer(dest, wire.Message("pair.resync_begin", {
                "group": "", "volume": dest.volume, "next_seq": 0, "source": self.name}))
            with vol.locks.hold(0, vol.info.size):
                self._set_copying(members)
        self._copier_wake.set()

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
                if vol.info.remote_copy_flag == "source" and vol.info.pair_state == states.COPYING \
                        and not vol.info.migration.get("frozen"):
                    busy |= self._copy_some(vol)
            if not busy:
                self._copier_wake.wait(0.2)
                self._copier_wake.clear()

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

    def _start_source_group(self, group: SourceGroup) -> None:
        if getattr(group, "_thread", None) is None and self.server is not None:
            group._thread = self._spawn(lambda: self._push_loop(group), f"rcopy-push-{group.name}")  # type: ignore[attr-defined]

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
            applied = int(reply.get("applied", 0))
            if applied:
                journal.mark_applied(min(applied, journal.stored))

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
            journal.mark_applied(min(applied, journal.stored))
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
            group.journal.mark_applied(min(int(msg["applied"]), group.journal.stored))
        return wire.ok()

    # ------------------------------------------------------------------ secondary side
    def _dest_group(self, ginfo: GroupInfo) -> DestGroup:
        dg = self.dest_groups.get(ginfo.name)
        if dg is None:
            applied = self._load_applied(ginfo.name, ginfo.applied)
            ginfo.applied = applied
            dg = DestGroup(ginfo, OrderedApplier(last_applied=applied))
            self.dest_groups[ginfo.name] = dg
        return dg

    def _applied_path(self, group: str) -> Path:
        return self.state_dir / "journals" / f"{group}.applied"

    def _load_applied(self, group: str, default: int) -> int:
        try:
            text = self._applied_path(group).read_text().split()
            return int(text[0])
        except (OSError, ValueError, IndexError):
            return default

    def _store_applied(self, group: str, seq: int) -> None:
        path = self._applied_path(group)
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, f"{seq:020d}\n".encode(), 0)
        finally:
            os.close(fd)

    def _h_pair_join(self, msg: wire.Message) -> wire.Message:
        vol = self.volume(msg["volume"])
        source = PeerVolume(**msg["source"])
        info = vol.info
        if info.remote_copy_flag != "off":
            raise StateError(f"{self.name}:{info.name} is already in a pair ({info.role})")
        if info.size != msg["size"]:
            raise UsageError(f"size mismatch: primary has {msg['size']} bytes, "
                             f"{self.name}:{info.name} has {info.size}")
        mode = msg["mode"]
        group = msg["group"]
        with self.mgmt.lock:
            info.remote_copy_flag = "dest"
            info.mode, info.group, info.transfer = mode, group, msg.get("transfer", "push")
            info.copy_source_info = [source]
            info.copy_source_valid = states.SOURCE_1
            info.consistent = False
            if mode == "async":
                ginfo = self.mgmt.groups.get(group) or GroupInfo(group, mode)
                self.mgmt.groups[group] = ginfo
                joined = any(v.info.group == group and v.info.remote_copy_flag == "dest"
                             for v in self.volumes.values() if v is not vol)
                dg = self._dest_group(ginfo)
                if not joined:  # a new group here: numbering starts where the source's counter is
                    with dg.lock:
                        dg.applier.reset(int(msg["next_seq"]) - 1)
                        self._store_applied(group, int(msg["next_seq"]) - 1)
                self._start_pull(dg)
            self.save()
        return wire.ok()

    def _start_pull(self, dg: DestGroup) -> None:
        if getattr(dg, "_thread", None) is None and self.server is not None:
            dg._thread = self._spawn(lambda: self._pull_loop(dg), f"rcopy-pull-{dg.info.name}")  # type: ignore[attr-defined]

    def _h_pair_leave(self, msg: wire.Message) -> wire.Message:
        vol = self.volume(msg["volume"])
        info = vol.info
        if info.remote_copy_flag != "dest":
            return wire.ok()
        with self.mgmt.lock:
            info.copy_source_info = [p for p in info.copy_source_info if p.node != msg["source"]]
            if not info.copy_source_info:
                group = info.group
                info.remote_copy_flag, info.mode, info.group = "off", "", ""
                info.copy_source_valid = states.SOURCE_1
                if group and not any(v.info.group == group and v.info.remote_copy_flag == "dest"
                                     for v in self.volumes.values()):
                    self.mgmt.groups.pop(group, None)
                    self.dest_groups.pop(group, None)
            self.save()
        return wire.ok()

    def _dest_volume_for(self, source_node: str, source_volume: str) -> tuple[Volume, int]:
        """The local secondary volume fed by ``source_node:source_volume`` and that source's index."""
        for v in self.volumes.values():
            if v.info.remote_copy_flag != "dest":
                continue
            for i, src in enumerate(v.info.copy_source_info, start=1):
                if src.node == source_node and src.volume == source_volume:
                    return v, i
        raise NotFound(f"{self.name} holds no secondary of {source_node}:{source_volume}")

    def _accept_source(self, vol: Volume, source_node: str) -> int:
        for i, src in enumerate(vol.info.copy_source_info, start=1):
            if src.node == source_node:
                if not states.source_accepted(vol.info.copy_source_valid, i):
                    raise StateError(f"{self.name}:{vol.info.name} does not accept data from "
                                     f"{source_node} (copy_source_valid={vol.info.copy_source_valid})")
                return i
        raise StateError(f"{source_node} is not a copy source of {self.name}:{vol.info.name}")

    def _h_pair_write(self, msg: wire.Message) -> wire.Message:
        """A sync remote-copy write or an initial/differential copy of one region (S1207)."""
        vol = self.volume(msg["volume"])
        if vol.info.remote_copy_flag != "dest":
            raise StateError(f"{self.name}:{vol.info.name} is not a remote-copy secondary")
        self._accept_source(vol, msg["source"])
        offset = int(msg["offset"])
        zero = int(msg.get("zero", 0))
        if not zero and not msg.payloads:
            raise ProtocolError("pair.write without data")
        after_seq = int(msg.get("after_seq", 0))
        dg = self.dest_groups.get(vol.info.group) if after_seq else None
        if dg is None:
            self._store_copy(vol, offset, zero, msg.payloads)
            return wire.ok()
        # An async region copy goes between journal entries after_seq and after_seq + 1.
        with dg.progress:
            if not dg.progress.wait_for(lambda: dg.applier.last_applied >= after_seq, COPY_WAIT_S):
                raise StateError(f"secondary is still applying up to {after_seq} "
                                 f"(applied {dg.applier.last_applied}); retry the copy later")
        with dg.lock:
            self._store_copy(vol, offset, zero, msg.payloads)
        return wire.ok()

    def _store_copy(self, vol: Volume, offset: int, zero: int, payloads: list[bytes]) -> None:
        if zero:
            vol.store.check(offset, zero)
            vol.store.zero(offset, zero)
        else:
            vol.store.write(offset, payloads[0])

    def _h_resync_begin(self, msg: wire.Message) -> wire.Message:
        group = msg.get("group")
        with self.mgmt.lock:
            if group:
                dg = self.dest_groups.get(group)
                if dg is None:
                    raise NotFound(f"{self.name} receives no group {group!r}")
                with dg.lock:
                    dg.applier.reset(int(msg["next_seq"]) - 1)
                    dg.consistent_at = 1 << 62
                    self._store_applied(group, int(msg["next_seq"]) - 1)
                vols = [v for v in self.volumes.values() if v.info.group == group and v.info.remote_copy_flag == "dest"]
            else:
                vols = [self.volume(msg["volume"])]
            for v in vols:
                v.info.consistent = False
            self.save()
        return wire.ok()

    def _h_resync_done(self, msg: wire.Message) -> wire.Message:
        vol = self.volume(msg["volume"])
        group = msg.get("group")
        with self.mgmt.lock:
            if group and group in self.dest_groups:
                dg = self.dest_groups[group]
                dg.consistent_at = int(msg.get("consistent_at", 0))
                self._check_consistent(dg)
            else:
                vol.info.consistent = True
            self.save()
        return wire.ok()

    def _check_consistent(self, dg: DestGroup) -> None:
        if dg.applier.last_applied >= dg.consistent_at:
            changed = False
            for v in self.volumes.values():
                if v.info.group == dg.info.name and v.info.remote_copy_flag == "dest" and not v.info.consistent:
                    v.info.consistent = True
                    changed = True
            if changed:
                self.save()

    def _h_journal_push(self, msg: wire.Message) -> wire.Message:
        """Receive journal entries (Fig. 25) and apply what is contiguous (Fig. 27/29)."""
        group = msg["group"]
        dg = self.dest_groups.get(group)
        if dg is None:
            raise NotFound(f"{self.name} receives no group {group!r}")
        source = msg["source"]
        metas = msg["entries"]
        if not isinstance(metas, list) or len(metas) != len(msg.payloads):
            raise ProtocolError("journal.push: entries and payloads do not match")
        self._receive(dg, source, metas, msg.payloads)
        return wire.ok(applied=dg.applier.last_applied, incarnation=self.incarnation)

    def _receive(self, dg: DestGroup, source: str, metas: list, payloads: list[bytes]) -> None:
        with dg.lock:
            for meta, data in zip(metas, payloads):
                try:
                    seq, vname, offset, length = int(meta[0]), str(meta[1]), int(meta[2]), int(meta[3])
                except (TypeError, ValueError, IndexError):
                    raise ProtocolError(f"malformed journal entry {meta!r}") from None
                if length != len(data):
                    raise ProtocolError(f"journal entry {seq}: length {length} but {len(data)} bytes")
                vol, index = self._dest_volume_for(source, vname)
                self._accept_source(vol, source)
                n0 = dg.info.handover_seq
                if vol.info.copy_source_valid == states.TRANSITIONAL and n0:
                    if (index == 1 and seq >= n0) or (index == 2 and seq < n0):
                        raise ProtocolError(f"sequence {seq} from source {index} violates handover at {n0}")
                vol.store.check(offset, length)
                dg.applier.offer(seq, (vol, offset, data), length)
            self._apply_ready(dg)

    def _apply_ready(self, dg: DestGroup) -> None:
        run = dg.applier.ready()
        if not run:
            return
        for seq, (vol, offset, data) in run:
            vol.store.write(offset, data)  # S2702/S2703: apply in ascending order
        last = run[-1][0]
        dg.applier.applied(last)
        self._store_applied(dg.info.name, last)
        dg.info.applied = last
        with dg.progress:
            dg.progress.notify_all()
        self._check_consistent(dg)

    def _pull_loop(self, dg: DestGroup) -> None:
        """Async-transfer (R) 213 at the secondary (Fig. 31): read journals from the source(s)."""
        while not self._stop.is_set() and dg.info.name in self.dest_groups:
            vols = [v for v in self.volumes.values()
                    if v.info.group == dg.info.name and v.info.remote_copy_flag == "dest"]
            if not vols or vols[0].info.transfer != "pull":
                time.sleep(HEARTBEAT_S)
                continue
            got = 0
            for index, src in enumerate(vols[0].info.copy_source_info, start=1):
                if not states.source_accepted(vols[0].info.copy_source_valid, index):
                    continue
                got += self._pull_once(dg, src, index)
            if not got:
                time.sleep(0.02)

    def _pull_once(self, dg: DestGroup, src: PeerVolume, index: int) -> int:
        cursor = dg.pull_cursor.get(src.node, 0)
        start = max(cursor, dg.applier.last_applied + 1)
        if index == 2 and dg.info.handover_seq:
            start = max(start, dg.info.handover_seq) if cursor else max(dg.info.handover_seq, start)
        try:
            reply = self.peer(src, wire.Message("journal.pull", {
                "group": dg.info.name, "from_seq": start, "max_bytes": PUSH_BATCH_BYTES,
                "applied": dg.applier.last_applied}), timeout_s=SYNC_TIMEOUT_S)
        except RangeNotStored:
            return 0
        except RcopyError as exc:
            log.debug("pull from %s failed: %s", src.node, exc)
            time.sleep(0.2)
            return 0
        metas = reply.get("entries") or []
        if metas:
            try:
                self._receive(dg, src.node, metas, reply.payloads)
            except StateError:  # reorder buffer full: ask again later from the same place
                return 0
            dg.pull_cursor[src.node] = int(metas[-1][0]) + 1
        return len(metas)

    # ------------------------------------------------------------------ status
    def _h_status(self, msg: wire.Message) -> wire.Message:
        return wire.ok(**self.status())

    def status(self) -> dict[str, Any]:
        vols, pairs = [], []
        for v in self.volumes.values():
            info = v.info
            vols.append({"node": self.name, "name": info.name, "size": info.size,
                         "rw_mode": info.rw_mode, "role": info.role,
                         "consistent": info.consistent, "writes": v.writes,
                         "bytes_written": v.bytes_written,
                         "copy_source_valid": info.copy_source_valid if info.role == "secondary" else None,
                         "migrated_fraction": v.migrated.fraction_set() if info.rw_mode != "normal" else None,
                         "frozen": bool(info.migration.get("frozen")),
                         "migrated_to": info.migration_dest_info.label if info.migration_dest_info else None,
                         "drained": bool(info.migration.get("drained")),
                         "complete": bool(info.migration.get("complete"))})
            if info.remote_copy_flag == "source" and info.copy_dest_info:
                pairs.append(self._pair_status(v))
        groups = []
        for g in self.source_groups.values():
            j = g.journal
            groups.append({"group": g.name, "role": "source", "counter": j.counter, "stored": j.stored,
                           "transferred": j.transferred, "applied": j.applied, "discarded": j.discarded,
                           "journal_used_bytes": j.used_bytes, "journal_capacity_bytes": j.capacity_bytes,
                           "link_up": g.link_up, "last_error": g.last_error})
        for dg in self.dest_groups.values():
            groups.append({"group": dg.info.name, "role": "dest", "applied": dg.applier.last_applied,
                           "waiting": dg.applier.waiting, "highest_received": dg.applier.highest_received,
                           "buffered_bytes": dg.applier.buffered_bytes, "handover_seq": dg.info.handover_seq})
        migrations = self.migrations.status() if self.migrations else []
        return {"node": self.name, "pid": os.getpid(), "volumes": vols, "pairs": pairs,
                "groups": groups, "migrations": migrations}

    def _pair_status(self, v: Volume) -> dict[str, Any]:
        info = v.info
        dest = info.copy_dest_info
        assert dest is not None
        lag_writes = lag_bytes = 0
        applied = stored = None
        journal_used = 0
        if info.mode == "async" and info.group in self.source_groups:
            j = self.source_groups[info.group].journal
            lag_writes, lag_bytes = j.stored - j.applied, j.pending_bytes
            applied, stored, journal_used = j.applied, j.stored, j.used_bytes
        dirty = v.diff.dirty_bytes() if info.pair_state != states.DUPLEX else 0
        return {"primary": f"{self.name}:{info.name}", "secondary": dest.label, "mode": info.mode,
                "group": info.group, "transfer": info.transfer, "state": info.pair_state,
                "auto_resume": info.auto_resume,
                "suspend_reason": info.suspend_reason,
                "lag_writes": lag_writes, "lag_bytes": lag_bytes + dirty, "dirty_bytes": dirty,
                "applied_seq": applied, "stored_seq": stored, "journal_used_bytes": journal_used,
                "copied_bytes": v.copied_bytes,
                "copy_source_valid": info.migration.get("copy_source_valid", "1")}
