"""The secondary side of remote copy (SPEC 2.6, 2.7, 4.7, 4.9, 5.7, 5.9, 5.11 Fig. 31):
accepting data from valid sources, ordered apply, pulling journals, applied reports.

A mixin of Node: it uses the node's volumes, management store and peers.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import states, wire
from .applier import OrderedApplier
from .errors import (
    NotFound,
    ProtocolError,
    RangeNotStored,
    RcopyError,
    StateError,
    UsageError,
)
from .mgmt import GroupInfo, PeerVolume

if TYPE_CHECKING:
    from .node import Volume

from .primary import COPY_WAIT_S, HEARTBEAT_S, PUSH_BATCH_BYTES, SYNC_TIMEOUT_S

log = logging.getLogger("rcopy.node")

@dataclass
class DestGroup:
    """A consistency group at its secondary node: the reorder buffer and apply state."""

    info: GroupInfo
    applier: OrderedApplier
    lock: threading.Lock = field(default_factory=threading.Lock)
    progress: threading.Condition = field(default_factory=threading.Condition)  # applied advanced
    consistent_at: int = 0      # the group is consistent again once applied >= this
    pull_cursor: dict[str, int] = field(default_factory=dict)
    thread: threading.Thread | None = None  # the pull loop


class SecondarySide:
    """Node methods of a remote-copy destination."""

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
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the first one: make the directory
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
            info.copy_epoch = int(msg.get("epoch", 0))
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
        if dg.thread is None and self.server is not None:
            dg.thread = self._spawn(lambda: self._pull_loop(dg), f"rcopy-pull-{dg.info.name}")

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
        epoch = int(msg.get("epoch", 0))
        length = zero or len(msg.payloads[0])
        vol.store.check(offset, length)
        dg = self.dest_groups.get(vol.info.group) if after_seq else None
        if dg is None:
            with vol.locks.hold(offset, length):
                self._check_epoch(vol, epoch, msg["source"])
                self._store_copy(vol, offset, zero, msg.payloads)
            return wire.ok()
        # An async region copy goes between journal entries after_seq and after_seq + 1.
        with dg.progress:
            if not dg.progress.wait_for(lambda: dg.applier.last_applied >= after_seq, COPY_WAIT_S):
                raise StateError(f"secondary is still applying up to {after_seq} "
                                 f"(applied {dg.applier.last_applied}); retry the copy later")
        with dg.lock, vol.locks.hold(offset, length):
            self._check_epoch(vol, epoch, msg["source"])
            self._store_copy(vol, offset, zero, msg.payloads)
        return wire.ok()

    @staticmethod
    def _check_epoch(vol: Volume, epoch: int, source: str) -> None:
        if epoch < vol.info.copy_epoch:
            why = (f"stale copy message from {source} (copy epoch {epoch}, "
                   f"{vol.info.name} is at {vol.info.copy_epoch}); ignored")
            log.warning("%s", why)
            raise StateError(why)

    def _store_copy(self, vol: Volume, offset: int, zero: int, payloads: list[bytes]) -> None:
        if zero:
            vol.store.check(offset, zero)
            vol.store.zero(offset, zero)
        else:
            vol.store.write(offset, payloads[0])

    def _h_resync_begin(self, msg: wire.Message) -> wire.Message:
        group = msg.get("group")
        epoch = int(msg.get("epoch", 0))
        with self.mgmt.lock:
            if group:
                dg = self.dest_groups.get(group)
                if dg is None:
                    raise NotFound(f"{self.name} receives no group {group!r}")
                vols = [v for v in self.volumes.values() if v.info.group == group and v.info.remote_copy_flag == "dest"]
            else:
                dg, vols = None, [self.volume(msg["volume"])]
            for v in vols:  # a late copy of an earlier resync must not reset this one
                self._check_epoch(v, epoch, msg.get("source", "?"))
            with dg.lock if dg is not None else contextlib.nullcontext():
                if dg is not None:
                    dg.applier.reset(int(msg["next_seq"]) - 1)
                    dg.consistent_at = 1 << 62
                    self._store_applied(dg.info.name, int(msg["next_seq"]) - 1)
                for v in vols:
                    with v.locks.hold(0, v.info.size):  # pair.writes in progress finish first
                        v.info.copy_epoch = epoch
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

