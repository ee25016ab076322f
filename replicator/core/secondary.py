"""The secondary side of remote copy (SPEC 2.6, 2.7, 4.7, 4.9, 5.7, 5.9, 5.10, 5.11 Fig. 31).

**The secondary applies in sequence order** (``DestGroup.apply_loop``): entries of
a group arrive with their numbers, possibly out of order and from two sources (V1
and V2 during a migration); the ordered applier hands out only the contiguous run
after the last applied number, so the volumes are always a write-order-consistent
prefix. Data is accepted only from a source that copy_source_valid allows, and
while transitional V1 may send only numbers below the handover number N0 and V2
only numbers from N0 (invariants 12, 17, 18).

Durability: before a batch is applied, ``SaveApplied(applied, applying)`` records
the batch's end durably; the entries are written, the volumes fsynced, and only a
later record naming the new applied number makes it reportable. So a number the
secondary reports applied survives a power loss, and after a crash in the middle
of a batch the group says inconsistent until it has applied that far again.
Sync writes and region copies are fsynced before they are acknowledged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generator

from .. import wire
from ..errors import NotFound, ProtocolError, RangeNotStored, RcopyError, StateError, UsageError
from . import plain_gate, tables as T
from .applier import OrderedApplier
from .effects import SaveApplied, VolWrite, VolWriteMany, VolZero, Zeros
from .journal_space import ZERO_RECORD_DATA_BYTES
from .payload import ZERO_MARK, entry_data, entry_payloads, write_data
from .model import DestGroupInfo, PeerVolume
from .runtime import Sleep, Wait
from .verify import ChangeLog

if TYPE_CHECKING:
    from .node import NodeCore
    from .volume import Volume



@dataclass(eq=False)
class DestGroup:
    """A consistency group at its secondary node: the reorder buffer and the apply state."""

    info: DestGroupInfo
    applier: OrderedApplier
    durable_applied: int = 0          # what a durable SaveApplied record says (and what is reported)
    record: tuple[int, int] = (0, 0)  # the last (applied, applying) made durable
    applying: bool = False            # a batch is being written
    synced: int = 0                   # entries up to here are applied and durable in the volumes
    record_busy: bool = False         # a SaveApplied is in flight (they are written one at a time)
    pull_cursor: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    changes: ChangeLog = field(default_factory=lambda: ChangeLog(64 * 1024))   # for online verify

    @property
    def name(self) -> str:
        return self.info.name

    def status(self) -> dict[str, Any]:
        return {"group": self.name, "role": "dest", "applied": self.durable_applied,
                "applied_in_memory": self.applier.last_applied, "waiting": self.applier.waiting,
                "highest_received": self.applier.highest_received,
                "buffered_bytes": self.applier.buffered_bytes, "reorder_bytes_max": self.applier.buffer_bytes_max,
                "handover_seq": self.info.handover_seq,
                "consistent_at": self.info.consistent_at}


class SecondarySide:
    """Node methods of a remote-copy destination."""

    def __init__(self, core: "NodeCore") -> None:
        self.core = core
        self.groups: dict[str, DestGroup] = {}

    def handlers(self) -> dict[str, Any]:
        return {"pair.join": self._h_pair_join, "pair.leave": self._h_pair_leave,
                "pair.write": self._h_pair_write, "pair.resync_begin": self._h_resync_begin,
                "pair.resync_done": self._h_resync_done, "journal.push": self._h_journal_push}

    def reorder_limit(self, info: DestGroupInfo) -> int:
        """Bytes the group's reorder buffer may hold: its own limit, else the node's default."""
        return info.reorder_bytes or self.core.cfg.reorder_bytes_max

    # ================================================================== start and restart
    def recover_group(self, info: DestGroupInfo, record: tuple[int, int]) -> None:
        applied, applying = record
        dg = DestGroup(info, OrderedApplier(last_applied=applied, buffer_bytes_max=self.reorder_limit(info)),
                       changes=ChangeLog(self.core.verify.chunk_bytes()))
        dg.durable_applied, dg.record = applied, (applied, max(applied, applying))
        dg.applier.highest_received = applied
        if applying > applied:
            # A batch was being applied when the node stopped: some of it may be on disk, some not.
            info.consistent_at = max(info.consistent_at or 0, applying)
            for v in self.core.members(info.name, "dest"):
                v.info.consistent = False
            self.core.log("warning", f"group {info.name}: an apply up to {applying} was interrupted; "
                                     f"inconsistent until it is applied again")
        self.groups[info.name] = dg

    def start(self) -> None:
        for dg in self.groups.values():
            self._start_group(dg)

    def _start_group(self, dg: DestGroup) -> None:
        self.core.service(f"apply-{dg.name}", lambda: self.apply_loop(dg))
        self.core.service(f"pull-{dg.name}", lambda: self.pull_loop(dg))

    # ================================================================== ordered apply (Fig. 14, 27, 29)
    def apply_loop(self, dg: DestGroup) -> Generator[Any, Any, None]:
        core, cfg = self.core, self.core.cfg
        dg.synced = dg.applier.last_applied
        while self.groups.get(dg.name) is dg:
            run = dg.applier.peek_run(cfg.apply_batch_bytes)
            want = (dg.synced, run[-1][0]) if run else (dg.synced, dg.synced)
            if want != dg.record:
                yield from self._save_record(dg, want)
                continue                        # look again: more may have arrived meanwhile
            if self._check_consistent(dg):
                yield from core.save()
                continue
            if not run:
                yield Wait(("offered", dg.name))
                continue
            if self.groups.get(dg.name) is not dg or run[0][0] != dg.applier.last_applied + 1:
                continue                        # a resync reset the group meanwhile
            dg.applying = True
            touched: dict[str, "Volume"] = {}
            try:
                for seq, (vol, offset, data) in run:
                    dg.changes.note(core.rt.now, vol.name, offset, len(data), seq)
                    touched[vol.name] = vol
                # S2702/S2703: the whole batch, oldest first, in one effect
                yield VolWriteMany([(vol.name, offset, data) for _, (vol, offset, data) in run])
                for vol in touched.values():
                    vol.syncer.wrote()
                last = run[-1][0]
                dg.applier.drop_through(last)
                dg.applier.applied(last)
                dg.batches += 1
            finally:
                dg.applying = False
                core.rt.notify(("applying", dg.name))
            core.rt.notify(("applied", dg.name))
            for vol in touched.values():
                yield from vol.syncer.sync()
            if dg.applier.last_applied == last:   # not reset by a resync meanwhile
                dg.synced = last

    def _save_record(self, dg: DestGroup, want: tuple[int, int]) -> Generator[Any, Any, None]:
        """Write (applied, applying) durably; records are written one at a time, so the file never
        goes back to an older one."""
        while dg.record_busy:
            yield Wait(("record", dg.name))
        dg.record_busy = True
        try:
            yield SaveApplied(dg.name, *want)
            dg.record = want
            dg.durable_applied = max(dg.durable_applied, want[0])
        finally:
            dg.record_busy = False
            self.core.rt.notify(("record", dg.name))

    def _check_consistent(self, dg: DestGroup) -> bool:
        """Mark the group's volumes consistent once applied reached consistent_at; True if changed."""
        if dg.info.resyncing or dg.info.consistent_at is None or dg.durable_applied < dg.info.consistent_at:
            return False
        for v in self.core.members(dg.name, "dest"):
            v.info.consistent = True
        dg.info.consistent_at = None
        dg.info.done_at = {}
        return True

    # ================================================================== receiving
    def dest_volume_for(self, source_node: str, source_volume: str) -> tuple["Volume", int]:
        """The local secondary volume fed by ``source_node:source_volume`` and that source's index."""
        for v in self.core.volumes.values():
            if v.info.remote_copy_flag != "dest":
                continue
            for i, src in enumerate(v.info.copy_source_info, start=1):
                if src.node == source_node and src.volume == source_volume:
                    return v, i
        raise NotFound(f"{self.core.name} holds no secondary of {source_node}:{source_volume}")

    def accept_source(self, vol: "Volume", source_node: str, source_volume: str = "") -> int:
        """SPEC 4.7 [INFERRED]: accept only from a source copy_source_valid allows. Both sources
        may be on one node (a migration inside it): then ``source_volume`` tells them apart;
        without it, any accepted source of that node will do."""
        known = [(i, src) for i, src in enumerate(vol.info.copy_source_info, start=1)
                 if src.names(source_node, source_volume)]
        if not known:
            label = f"{source_node}:{source_volume}" if source_volume else source_node
            raise StateError(f"{label} is not a copy source of {self.core.name}:{vol.name}")
        for i, _ in known:
            if T.source_accepted(vol.info.copy_source_valid, i):
                return i
        raise StateError(f"{self.core.name}:{vol.name} does not accept data from "
                         f"{known[0][1].label} (copy_source_valid={vol.info.copy_source_valid})")

    def _h_journal_push(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """Receive journal entries (Fig. 25); the apply loop applies what is contiguous."""
        dg = self._group(msg["group"])
        self.receive(dg, str(msg["source"]), msg["entries"], entry_payloads(msg["entries"], msg.payloads,
                                                                             msg.get("packed")))
        return wire.ok(applied=dg.durable_applied, incarnation=self.core.incarnation)
        yield

    def receive(self, dg: DestGroup, source: str, metas: Any, payloads: list[Any]) -> None:
        if not isinstance(metas, list) or len(metas) != len(payloads):
            raise ProtocolError("journal entries and payloads do not match")
        offered = False
        try:
            for meta, data in zip(metas, payloads):
                try:
                    seq, vname, offset, length = int(meta[0]), str(meta[1]), int(meta[2]), int(meta[3])
                except (TypeError, ValueError, IndexError):
                    raise ProtocolError(f"malformed journal entry {meta!r}") from None
                data = entry_data(meta, data, seq, length)
                vol, index = self.dest_volume_for(source, vname)
                self.accept_source(vol, source, vname)
                n0 = dg.info.handover_seq
                if vol.info.copy_source_valid == T.TRANSITIONAL and n0:
                    if (index == 1 and seq >= n0) or (index == 2 and seq < n0):
                        raise ProtocolError(f"sequence {seq} from source {index} violates the handover at {n0}")
                vol.check(offset, length)
                held = ZERO_RECORD_DATA_BYTES if isinstance(data, Zeros) else length   # what it holds in memory
                offered |= dg.applier.offer(seq, (vol, offset, data), held)
        finally:
            if offered:
                self.core.rt.notify(("offered", dg.name))

    def pull_loop(self, dg: DestGroup) -> Generator[Any, Any, None]:
        """Async-transfer (R) 213 at the secondary (Fig. 31): read journals from the valid source(s)."""
        cfg = self.core.cfg
        while self.groups.get(dg.name) is dg:
            vols = self.core.members(dg.name, "dest")
            if not vols or vols[0].info.transfer != "pull":
                yield Sleep(cfg.heartbeat_s)
                continue
            got, nodes = 0, set()
            for index, src in enumerate(list(vols[0].info.copy_source_info), start=1):
                # both sources on one node (a migration inside it) share one journal: read it once
                if T.source_accepted(vols[0].info.copy_source_valid, index) and src.node not in nodes:
                    nodes.add(src.node)
                    got += yield from self._pull_once(dg, src, index)
            if not got:
                yield Wait(("applied", dg.name), timeout_s=cfg.pull_idle_s)

    def _pull_once(self, dg: DestGroup, src: PeerVolume, index: int) -> Generator[Any, Any, int]:
        cursor = dg.pull_cursor.get(src.node, 0)
        start = max(cursor, dg.applier.last_applied + 1)
        if index == 2 and dg.info.handover_seq:
            start = max(start, dg.info.handover_seq)
        try:
            reply = yield from self.core.call(src.node, src.control, "journal.pull", {
                "group": dg.name, "from_seq": start, "max_bytes": self.core.cfg.push_batch_bytes,
                "applied": dg.durable_applied}, timeout_s=self.core.cfg.sync_timeout_s)
        except RangeNotStored:
            return 0
        except RcopyError as exc:
            self.core.log("debug", f"pull from {src.node} failed: {exc}")
            yield Sleep(self.core.cfg.link_retry_s)
            return 0
        metas = reply.get("entries") or []
        if metas:
            try:
                self.receive(dg, src.node, metas, entry_payloads(metas, reply.payloads, reply.get("packed")))
            except StateError:          # reorder buffer full: ask again later from the same place
                return 0
            dg.pull_cursor[src.node] = int(metas[-1][0]) + 1
        return len(metas)

    # ================================================================== sync writes and copies
    def _h_pair_write(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """A sync remote-copy write, or one region of an initial/differential copy (S1207)."""
        core = self.core
        vol = core.volume(msg["volume"])
        if vol.info.remote_copy_flag != "dest":
            raise StateError(f"{core.name}:{vol.name} is not a remote-copy secondary")
        source = str(msg["source"])
        self.accept_source(vol, source, str(msg.get("source_volume", "")))
        parts = self._write_parts(vol, msg)
        offset = parts[0][0]
        length = parts[-1][0] + parts[-1][1] - offset
        epoch = int(msg.get("epoch", 0))
        self._check_epoch(vol, epoch, source)
        after_seq = int(msg.get("after_seq", 0))
        dg = self.groups.get(vol.info.group) if after_seq else None
        if dg is not None:
            # An async region copy goes between journal entries after_seq and after_seq + 1.
            deadline = core.rt.now + core.cfg.copy_wait_s
            while dg.applier.last_applied < after_seq:
                if core.rt.now >= deadline:
                    raise StateError(f"secondary is still applying up to {after_seq} "
                                     f"(applied {dg.applier.last_applied}); retry the copy later")
                yield Wait(("applied", dg.name), timeout_s=deadline - core.rt.now)
            self._check_epoch(vol, epoch, source)
        # one region (a copy), or the regions of a batch of sync writes, in ascending order
        locked = [vol.regions(offset, length)] if "writes" not in msg.fields else \
            _distinct([vol.regions(off, n) for off, n, _ in parts])
        held: list[range] = []
        try:
            for regions in locked:
                yield from vol.locks.acquire(regions)
                held.append(regions)
            if dg is not None:       # a copy holds the primary's bytes after entry after_seq, and more
                for off, n, _ in parts:
                    dg.changes.note(core.rt.now, vol.name, off, n, after_seq + 1)
            if len(parts) == 1:
                off, n, data = parts[0]
                yield VolZero(vol.name, off, n) if data is None else VolWrite(vol.name, off, data)
            else:
                yield VolWriteMany([(vol.name, off, Zeros(n) if data is None else data) for off, n, data in parts])
            vol.syncer.wrote()
        finally:
            for regions in held:
                vol.locks.release(regions)
        yield from vol.syncer.sync()                  # durable before it is acknowledged
        return wire.ok()

    @staticmethod
    def _write_parts(vol: "Volume", msg: wire.Message) -> list[tuple[int, int, Any]]:
        """(offset, length, data or None for zeros) of a pair.write: one range (``offset`` with a
        payload, or ``zero`` bytes), or a copy's dirty runs (``extents``, one payload each, empty
        for zeros) in ascending order within one region."""
        if "writes" in msg.fields:
            return _sync_writes(vol, msg)
        if "extents" not in msg.fields:
            offset, data = int(msg["offset"]), write_data(msg.fields, msg.payloads, "pair.write")
            parts = [(offset, len(data), None if isinstance(data, Zeros) else data)]
        else:
            extents = msg["extents"]
            if not extents or len(extents) != len(msg.payloads):
                raise ProtocolError(f"pair.write with {len(extents)} extents and {len(msg.payloads)} payloads")
            parts = []
            for (off, n), data in zip(extents, msg.payloads):
                off, n = int(off), int(n)
                if n <= 0 or len(data) not in (0, n) or (parts and off < parts[-1][0] + parts[-1][1]):
                    raise ProtocolError(f"pair.write extent ({off}, {n}) with {len(data)} bytes out of order or size")
                parts.append((off, n, data if len(data) else None))
            if len(vol.regions(parts[0][0], parts[-1][0] + parts[-1][1] - parts[0][0])) > 1:
                raise ProtocolError("pair.write extents span more than one region")
        for off, n, _ in parts:
            vol.check(off, n)
        return parts

    def _check_epoch(self, vol: "Volume", epoch: int, source: str) -> None:
        if epoch < vol.info.copy_epoch:
            raise StateError(f"stale copy message from {source} (copy epoch {epoch}, "
                             f"{vol.name} is at {vol.info.copy_epoch}); ignored")

    # ================================================================== pairs (secondary side)
    def _group(self, name: Any) -> DestGroup:
        dg = self.groups.get(name)
        if dg is None:
            raise NotFound(f"{self.core.name} receives no group {name!r}")
        return dg

    def _h_pair_join(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        core = self.core
        vol = core.volume(msg["volume"])
        source = PeerVolume.of(msg["source"])
        info = vol.info
        rejoin = (info.remote_copy_flag == "dest" and len(info.copy_source_info) == 1
                  and info.copy_source_info[0].node == source.node
                  and info.copy_source_info[0].volume == source.volume)
        if info.remote_copy_flag != "off" and not rejoin:   # a retried pair create may join again
            raise StateError(f"{core.name}:{vol.name} is already in a pair ({info.role})")
        if info.size != msg["size"]:
            raise UsageError(f"size mismatch: primary has {msg['size']} bytes, "
                             f"{core.name}:{vol.name} has {info.size}")
        mode, group = msg["mode"], msg["group"]
        if mode not in ("sync", "async"):
            raise UsageError("mode must be sync or async")
        plain_gate.shut(vol, f"{core.name}:{vol.name} has host I/O in flight; is a host using it?")
        new_group = mode == "async" and group not in self.groups
        info.remote_copy_flag = "dest"
        info.mode, info.group, info.transfer = mode, group, msg.get("transfer") or "push"
        info.copy_source_info = [source]
        T.start_over(T.COPY_SOURCE_VALID, info, T.SOURCE_1)
        info.consistent = False
        info.copy_epoch = int(msg.get("epoch", 0))
        if mode == "async" and not new_group:
            ginfo = core.dest_group_info[group]
            ginfo.resyncing = [n for n in ginfo.resyncing if n != vol.name] + [vol.name]
            for m in core.members(group, "dest"):
                m.info.consistent = False
        if new_group:  # a new group here: numbering starts where the source's counter is
            ginfo = DestGroupInfo(group, reorder_bytes=int(msg.get("reorder_bytes") or 0), resyncing=[vol.name])
            core.dest_group_info[group] = ginfo
            start = int(msg["next_seq"]) - 1
            dg = DestGroup(ginfo, OrderedApplier(last_applied=start, buffer_bytes_max=self.reorder_limit(ginfo)),
                           changes=ChangeLog(core.verify.chunk_bytes()))
            dg.applier.highest_received = start
            yield SaveApplied(group, start, start)
            dg.durable_applied, dg.record = start, (start, start)
            self.groups[group] = dg
            self._start_group(dg)
        yield from core.save()
        return wire.ok()

    def _h_pair_leave(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        core = self.core
        vol = core.volume(msg["volume"])
        info = vol.info
        if info.remote_copy_flag != "dest":
            return wire.ok()
        info.copy_source_info = [p for p in info.copy_source_info
                                 if not p.names(str(msg["source"]), str(msg.get("source_volume", "")))]
        if not info.copy_source_info:
            group = info.group
            info.remote_copy_flag, info.mode, info.group = "off", "", ""
            T.start_over(T.COPY_SOURCE_VALID, info, T.SOURCE_1)
            info.consistent = True
            if group and not core.members(group, "dest"):
                core.dest_group_info.pop(group, None)
                self.groups.pop(group, None)
                core.rt.notify(("offered", group))
        yield from core.save()
        return wire.ok()

    def _h_resync_begin(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        core = self.core
        group = msg.get("group")
        epoch = int(msg.get("epoch", 0))
        source = str(msg.get("source", "?"))
        if group:
            dg: DestGroup | None = self._group(group)
            vols = core.members(group, "dest")
        else:
            dg, vols = None, [core.volume(msg["volume"])]
        for v in vols:
            if v.info.remote_copy_flag != "dest":
                raise StateError(f"{core.name}:{v.name} is not a remote-copy secondary")
            self.accept_source(v, source, "" if group else str(msg.get("source_volume", "")))   # only the
            # valid source may restart the copy
            self._check_epoch(v, epoch, source)  # a late copy of an earlier resync must not reset this one
        if dg is not None:
            yield from self._check_forward(dg, int(msg["next_seq"]), source)
        for v in vols:                          # inconsistent from now until the resync is done,
            v.info.consistent = False           # durably before the applied pointer moves (a crash in
            v.info.copy_epoch = epoch           # between must not come back "consistent" at it)
        if dg is not None:
            dg.info.consistent_at = 0
            dg.info.resyncing = [v.name for v in vols]
            dg.info.done_at = {}
        yield from core.save()
        if dg is not None:
            next_seq = int(msg["next_seq"])
            yield from self._check_forward(dg, next_seq, source)
            dg.applier.reset(next_seq - 1)
            dg.synced = next_seq - 1
            dg.pull_cursor.clear()
            yield from self._save_record(dg, (next_seq - 1, next_seq - 1))
            core.rt.notify(("applied", dg.name))
        for v in vols:
            regions = range(0, v.diff.nregions)   # copies that passed the old epoch's check finish first
            yield from v.locks.acquire(regions)
            v.locks.release(regions)
        yield from core.save()
        return wire.ok()

    def _check_forward(self, dg: DestGroup, next_seq: int, source: str) -> Generator[Any, Any, None]:
        """Invariant 13: a resync may move the applied pointer forward, never back."""
        while dg.applying:                      # the batch being written finishes first
            yield Wait(("applying", dg.name))
        if next_seq - 1 < dg.applier.last_applied:
            raise StateError(f"resync from {source} would move group {dg.name}'s applied pointer back "
                             f"from {dg.applier.last_applied} to {next_seq - 1}")

    def _h_resync_done(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        core = self.core
        vol = core.volume(msg["volume"])
        source = str(msg.get("source", "?"))
        self.accept_source(vol, source, str(msg.get("source_volume", "")))
        self._check_epoch(vol, int(msg.get("epoch", vol.info.copy_epoch)), source)
        group = msg.get("group")
        if group and group in self.groups:
            dg = self.groups[group]
            dg.info.resyncing = [n for n in dg.info.resyncing if n != vol.name]
            dg.info.done_at[vol.name] = int(msg.get("consistent_at", 0))   # a repeated done replaces it
            dg.info.consistent_at = max(dg.info.done_at.values())
            self._check_consistent(dg)
            core.rt.notify(("offered", dg.name))    # the apply loop marks it once applied reaches it
        else:
            vol.info.consistent = True
        yield from core.save()
        return wire.ok()


def _sync_writes(vol: "Volume", msg: wire.Message) -> list[tuple[int, int, Any]]:
    """The parts of a pair.write carrying a batch of sync writes (``writes``: [offset, length] or
    [offset, length, "z"] each, a frame each, empty for a zeroing), in ascending order. The
    primary's region locks keep writes of one batch apart; overlapping ones are refused."""
    writes = msg["writes"]
    if not isinstance(writes, list) or not writes or len(writes) != len(msg.payloads):
        raise ProtocolError(f"pair.write with {len(writes) if isinstance(writes, list) else writes!r} writes "
                            f"and {len(msg.payloads)} payloads")
    parts = []
    for w, data in zip(writes, msg.payloads):
        if not isinstance(w, list) or len(w) not in (2, 3):
            raise ProtocolError(f"malformed sync write {w!r}")
        off, n, zero = int(w[0]), int(w[1]), len(w) == 3 and w[2] == ZERO_MARK
        if n <= 0 or len(data) != (0 if zero else n):
            raise ProtocolError(f"sync write ({off}, {n}) with {len(data)} bytes")
        vol.check(off, n)
        parts.append((off, n, None if zero else data))
    parts.sort(key=lambda p: p[0])
    for a, b in zip(parts, parts[1:]):
        if b[0] < a[0] + a[1]:
            raise ProtocolError(f"sync writes at {a[0]} and {b[0]} overlap")
    return parts


def _distinct(ranges: list[range]) -> list[range]:
    """Region ranges (ascending, as the parts are) merged where they overlap or touch."""
    out: list[range] = []
    for r in ranges:
        if out and r.start <= out[-1].stop:
            out[-1] = range(out[-1].start, max(out[-1].stop, r.stop))
        else:
            out.append(r)
    return out
