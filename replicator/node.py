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
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import states, wire
from .activity import ActivityLog
from .errors import (
    IOErrorRange,
    NotFound,
    ProtocolError,
    RcopyError,
    ReadOnlyError,
    StateError,
    UsageError,
)
from .keys import load as load_keys
from .mgmt import ManagementStore, PeerVolume, VolumeInfo, check_name
from .primary import PrimarySide, SourceGroup
from .regionmap import RegionMap
from .secondary import DestGroup, SecondarySide
from .transport import ClientPool, Server
from .volume import InFlight, RegionLocks, VolumeStore

log = logging.getLogger("rcopy.node")

REGION_BYTES = 1 << 20




@dataclass
class Volume:
    """A volume at run time: its management info, bytes, bitmaps and locks."""

    info: VolumeInfo
    store: VolumeStore
    diff: RegionMap
    migrated: RegionMap
    locks: RegionLocks
    activity: ActivityLog
    inflight: InFlight = field(default_factory=InFlight)
    writes: int = 0
    bytes_written: int = 0
    copied_bytes: int = 0       # sent by initial copy and differential resync






class Node(PrimarySide, SecondarySide):
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
            "volume.flush": self._h_volume_flush,
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
        for group in self.source_groups.values():
            self._roll_forward(group)
        for vol in self.volumes.values():
            self._recover_activity(vol)
        for gname, ginfo in self.mgmt.groups.items():
            self._dest_group(ginfo)

    def _open_volume(self, info: VolumeInfo, create: bool) -> Volume:
        vdir = self.state_dir / "volumes"
        store = VolumeStore(vdir / f"{info.name}.img", info.size, create=create)
        diff = self._bitmap(info, "diff")
        migrated = self._bitmap(info, "migrated")
        vol = Volume(info, store, diff, migrated, RegionLocks(REGION_BYTES),
                     ActivityLog(self._bitmap(info, "active")))
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
        if self.metrics_address:
            from .metrics import serve
            self._metrics_server = serve(self, self.metrics_address)
        self._spawn(self._copier_loop, "rcopy-copier")
        for group in list(self.source_groups.values()):
            self._start_source_group(group)
        for dg in list(self.dest_groups.values()):
            self._start_pull(dg)
        self.migrations.resume_after_restart()
        # Control requests last: a node that answers ping has finished starting (peers'
        # requests sent before wait in their ZeroMQ queues, nothing is lost).
        self.server.start()
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
            v.activity.retire_idle()  # a clean stop leaves nothing to resynchronise

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

    def trim(self, vol: Volume, length: int, offset: int) -> None:
        """Accepted and ignored (NBD lets a server ignore TRIM): the contents stay as they were."""
        vol.store.check(offset, length)

    def flush(self, vol: Volume) -> None:
        if vol.info.rw_mode == states.THROUGH:  # V1 holds the data: the flush is its to do
            self.migrations.relay_flush(vol)
            return
        vol.store.flush()
        if vol.info.remote_copy_flag == "source" and vol.info.mode == "async":
            self.source_groups[vol.info.group].journal.sync()
        vol.diff.sync()
        vol.activity.map.sync()

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

    def _h_volume_flush(self, msg: wire.Message) -> wire.Message:
        self.flush(self.volume(msg["volume"]))
        return wire.ok()

    def _h_volume_write(self, msg: wire.Message) -> wire.Message:
        """A host write relayed by another node (THROUGH mode, S1105/S1106)."""
        vol = self.volume(msg["volume"])
        if not msg.payloads:
            raise ProtocolError("volume.write without data")
        self.write(vol, msg.payloads[0], int(msg["offset"]), bool(msg.get("fua")))
        return wire.ok()

    # ------------------------------------------------------------------ status
    def _h_status(self, msg: wire.Message) -> wire.Message:
        return wire.ok(**self.status())

    def status(self) -> dict[str, Any]:
        vols, pairs = [], []
        for v in self.volumes.values():
            info = v.info
            vols.append({"node": self.name, "name": info.name, "size": info.size,
                         "rw_mode": info.rw_mode, "role": info.role,
                         "consistent": info.consistent, "copy_epoch": info.copy_epoch, "writes": v.writes,
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
        lag_seconds = 0.0
        applied = stored = None
        journal_used = 0
        if info.mode == "async" and info.group in self.source_groups:
            j = self.source_groups[info.group].journal
            lag_writes, lag_bytes = j.stored - j.applied, j.pending_bytes
            applied, stored, journal_used = j.applied, j.stored, j.used_bytes
            lag_seconds = self.source_groups[info.group].lag_seconds(j.applied)
        dirty = v.diff.dirty_bytes() if info.pair_state != states.DUPLEX else 0
        return {"primary": f"{self.name}:{info.name}", "secondary": dest.label, "mode": info.mode,
                "group": info.group, "transfer": info.transfer, "state": info.pair_state,
                "auto_resume": info.auto_resume,
                "suspend_reason": info.suspend_reason,
                "lag_writes": lag_writes, "lag_bytes": lag_bytes + dirty, "dirty_bytes": dirty,
                "lag_seconds": round(lag_seconds, 3),
                "applied_seq": applied, "stored_seq": stored, "journal_used_bytes": journal_used,
                "copied_bytes": v.copied_bytes,
                "copy_source_valid": info.migration.get("copy_source_valid", "1")}
