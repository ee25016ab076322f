"""One storage node (SPEC 1.2) as a sans-IO state machine: events in, effects out.

``NodeCore.handle(event, now)`` takes one of

* ``Boot``: the state the driver recovered from disk (management information,
  bitmaps, journals, applied pointers, whether the machine lost power);
* ``HostIo``: an NBD request from a host (read, write, flush, trim, zero);
* ``Incoming``: a request from another node or the terminal;
* ``Completed``: the result of an effect it asked for,

and returns the effects to carry out (core/effects.py). The node's rules live in
its parts: primary.py (pairs, sync and async writes, copy and resync),
source_group.py (a consistency group's journal and its transfer), secondary.py
(acceptance and ordered apply), migration.py (programs 203/204, the phase table
in tables.py). No threads, files, sockets or clocks anywhere in this package.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator

from .. import wire
from ..errors import NotFound, ProtocolError, RcopyError, StateError, UsageError
from . import direct, plain_gate, tables as T
from .config import Config
from .direct import DirectWrite
from .effects import Call, Effect, HostDone, Log, Reply, SaveMgmt
from .model import (DestGroupInfo, SourceGroupInfo, SourceMigration, TargetMigration, VolumeInfo,
                    migration_from_dict)
from .runtime import Runtime, Sleep, Task, Wait
from .volume import KINDS, Volume, bitmap_bytes

MGMT_VERSION = 2
# Kinds only rcopy itself sends: a malformed one of these is a bug, not a bad peer.
_INTERNAL_KINDS = {"journal.push", "journal.pull", "pair.write", "mig.handover", "mig.region", "mig.fetch"}


# ---------------------------------------------------------------------- events
@dataclass(slots=True)
class JournalState:
    """What the driver recovered of one source group's journal."""

    counter: int
    stored: int
    discarded: int
    entries: list[tuple[int, str, int, int]] = field(default_factory=list)   # (seq, volume, offset, length)
    head: int = 0
    slots: list[tuple[int, int, int]] = field(default_factory=list)          # (seq, pos, end) of live records
    capacity_bytes: int = 0
    lost_entries: int = 0
    folded: list[tuple[str, int, int]] = field(default_factory=list)


@dataclass(slots=True)
class BootState:
    """The node's durable state as found at start-up."""

    mgmt: dict[str, Any] | None = None
    bitmaps: dict[tuple[str, str], bytes | None] = field(default_factory=dict)  # (volume, kind) -> bits
    journals: dict[str, JournalState] = field(default_factory=dict)
    applied: dict[str, tuple[int, int]] = field(default_factory=dict)          # group -> (applied, applying)
    clean: bool = True           # the last stop was clean (nothing in flight)
    power_lost: bool = False     # the machine rebooted since: page cache writes may be gone
    incarnation: str = ""


@dataclass(slots=True)
class Boot:
    state: BootState


@dataclass(slots=True)
class HostIo:
    req: Any
    op: str                      # read / write / flush / trim / zero / extents
    volume: str
    offset: int = 0
    length: int = 0
    data: bytes | memoryview | None = None
    fua: bool = False


@dataclass(slots=True)
class Incoming:
    req: Any
    msg: wire.Message


@dataclass(slots=True)
class Completed:
    op: int
    result: Any = None


Event = Boot | HostIo | Incoming | Completed
Handler = Callable[[wire.Message], Generator[Any, Any, wire.Message]]


class NodeCore:
    """The rules of one storage node; the driver carries out its effects."""

    def __init__(self, name: str, control: str, cfg: Config | None = None) -> None:
        from .migration import Migrations
        from .primary import PrimarySide
        from .secondary import SecondarySide
        from .verify import OnlineVerify
        self.name, self.control = name, control
        self.cfg = cfg or Config()
        self.rt = Runtime()
        self.incarnation = ""
        self.pid = 0                 # the process id, for status (the driver sets it)
        self.ready = False
        self.stopping = False
        self.volumes: dict[str, Volume] = {}
        self.source_group_info: dict[str, SourceGroupInfo] = {}
        self.dest_group_info: dict[str, DestGroupInfo] = {}
        self.migrations: dict[str, TargetMigration | SourceMigration] = {}
        self.task_errors: dict[str, str] = {}
        self._mgmt_version = 0
        self._mgmt_saved = 0
        self._mgmt_busy = False
        self.primary = PrimarySide(self)
        self.secondary = SecondarySide(self)
        self.mig = Migrations(self)
        self.verify = OnlineVerify(self)
        self.handlers: dict[str, Handler] = {
            "ping": self._h_ping, "status": self._h_status,
            "volume.create": self._h_volume_create, "volume.delete": self._h_volume_delete,
            "volume.hash": self._h_volume_hash,
        }
        for part in (self.primary, self.secondary, self.mig, self.verify):
            self.handlers.update(part.handlers())

    # ================================================================== events
    def handle(self, event: Event, now: float) -> list[Effect]:
        self.rt.now = now
        if isinstance(event, Completed):
            self.rt.complete(event.op, event.result)
        elif isinstance(event, HostIo):
            self.rt.spawn(self._host(event), f"host-{event.op}")
        elif isinstance(event, Incoming):
            self.rt.spawn(self._request(event), f"req-{event.msg.kind}")
        else:
            self.rt.spawn(self._boot(event.state), "boot", on_exit=self._boot_exit)
        return self.rt.take()

    def direct_write(self, req: Any, volume: str, offset: int, data: Any, now: float,
                     store: Callable[[Effect], Any]) -> DirectWrite | None:
        """Admit a host write without a task (core/direct.py): the caller writes ``w.data`` to the
        volume, then calls ``direct_written``; unless ``w.as_task``: then a task answers ``req``
        (and a sync write's batch sender answers it after ``direct_written``).
        None: feed it as HostIo. Raises for a bad range."""
        self.rt.now = now
        w = self.rt.call(direct.begin, self.primary, req, volume, offset, data, store)
        if w is not None:
            w.effects = self.rt.take()
        return w

    def direct_written(self, w: DirectWrite, now: float, ok: bool = True) -> list[Effect]:
        """A ``direct_write`` is written (or failed, not ``ok``): what the tasks it woke do next.
        A sync write (``w.waits``) written goes to the secondary: its HostDone answers ``req``."""
        self.rt.now = now
        self.rt.call(direct.end, self.primary, w, ok)
        return self.rt.take()

    def _boot_exit(self, task: Task, error: BaseException | None, value: Any) -> None:
        if error is not None:
            self.task_errors["boot"] = f"{type(error).__name__}: {error}"
            self.log("error", f"start-up failed: {error}")

    def _host(self, ev: HostIo) -> Generator[Any, Any, None]:
        yield from self.answer(ev.req, ev.op, self._host_io(ev))

    def answer(self, req: Any, op: str, work: Generator[Any, Any, Any]) -> Generator[Any, Any, None]:
        """Run a host request's ``work`` and answer the host: its value, or the error."""
        try:
            data = yield from work
            self.rt.emit(HostDone(req, data))
        except RcopyError as exc:
            self.rt.emit(HostDone(req, error=exc))
        except Exception as exc:  # noqa: BLE001 - a bug: the host gets EIO, the node keeps serving
            self.log("bug", f"host {op} failed with {type(exc).__name__}: {exc}")
            self.rt.emit(HostDone(req, error=RcopyError(f"internal error: {exc}")))

    def _host_io(self, ev: HostIo) -> Generator[Any, Any, Any]:
        while not self.ready:
            yield Wait("ready")
        vol = self.volume(ev.volume)
        if ev.op in ("read", "extents"):
            read = self.primary.host_read if ev.op == "read" else self.primary.host_extents
            data = yield from read(vol, ev.offset, ev.length)
            return data
        if ev.op == "write":
            assert ev.data is not None
            yield from self.primary.host_write(vol, ev.offset, ev.data, ev.fua)
        elif ev.op == "flush":
            yield from self.primary.host_flush(vol)
        elif ev.op in ("trim", "zero"):
            yield from self.primary.host_trim(vol, ev.offset, ev.length, ev.fua)
        else:
            raise UsageError(f"unknown host request {ev.op!r}")
        return None

    def _request(self, ev: Incoming) -> Generator[Any, Any, None]:
        msg = ev.msg
        try:
            handler = self.handlers.get(msg.kind)
            if handler is None:
                raise ProtocolError(f"unknown message kind {msg.kind!r}")
            if msg.kind != "ping":
                while not self.ready:
                    yield Wait("ready")
            reply = yield from handler(msg)
        except RcopyError as exc:
            reply = wire.error_reply(exc)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            # a field of the wrong type or shape (or a bug: logged as one, so the simulator sees it)
            self.log("bug" if msg.kind in _INTERNAL_KINDS else "warning",
                     f"{msg.kind} failed with {type(exc).__name__}: {exc}")
            reply = wire.error_reply(ProtocolError(f"malformed {msg.kind} message: {exc}"))
        except Exception as exc:  # noqa: BLE001 - a bug: an error reply, the node keeps serving
            self.log("bug", f"{msg.kind} failed with {type(exc).__name__}: {exc}")
            reply = wire.error_reply(RcopyError(f"internal error in {msg.kind}: {exc}"))
        self.rt.emit(Reply(ev.req, reply))

    # ================================================================== boot
    def _boot(self, st: BootState) -> Generator[Any, Any, None]:
        self.incarnation = st.incarnation
        raw = st.mgmt or {}
        for name, d in raw.get("volumes", {}).items():
            info = VolumeInfo.from_dict(d)
            bits = {k: st.bitmaps.get((name, k)) for k in KINDS}
            for k, found in bits.items():
                if found is not None and len(found) != bitmap_bytes(info, k, self.cfg.region_bytes):
                    st.bitmaps[(name, k)] = bits[k] = None     # not this volume's geometry: damaged
            vol = Volume.make(self.rt, info, self.cfg.region_bytes, bits)
            # What the last incarnation wrote may still be only in the page cache: the first
            # flush of this one must really sync.
            vol.syncer.wrote()
            for bf in vol.maps.values():
                bf.syncer.wrote()
            self.volumes[name] = vol
        for name, d in raw.get("source_groups", {}).items():
            self.source_group_info[name] = SourceGroupInfo.from_dict(d)
        for name, d in raw.get("dest_groups", {}).items():
            self.dest_group_info[name] = DestGroupInfo.from_dict(d)
        for mid, d in raw.get("migrations", {}).items():
            self.migrations[mid] = migration_from_dict(d)
        changed = self.primary.check_bitmaps(st)
        changed |= self.mig.check_bitmaps(st)
        for name, info in self.source_group_info.items():
            yield from self.primary.recover_group(info, st.journals.get(name))
        yield from self.primary.recover_activity(st)
        yield from self.primary.settle_groups()
        for name, info in self.dest_group_info.items():
            self.secondary.recover_group(info, st.applied.get(name, (0, 0)))
        if changed or st.mgmt is not None:
            yield from self.save()
        self.ready = True
        self.rt.notify("ready")
        self.primary.start()
        self.secondary.start()
        self.mig.start()
        self.log("info", f"node {self.name} ready (incarnation {self.incarnation})")

    # ================================================================== shared helpers
    def volume(self, name: Any) -> Volume:
        try:
            return self.volumes[name]
        except (KeyError, TypeError):
            raise NotFound(f"node {self.name} has no volume {name!r}") from None

    def log(self, level: str, text: str) -> None:
        self.rt.emit(Log(level, text))

    def call(self, node: str, endpoint: str, kind: str, fields: dict[str, Any] | None = None,
             payloads: list[Any] | None = None, timeout_s: float | None = None) -> Generator[Any, Any, wire.Message]:
        """Send a request to another node; returns its reply or raises its error."""
        msg = wire.Message(kind, fields or {}, list(payloads or []))
        reply = yield Call(node, endpoint, msg, timeout_s or self.cfg.control_timeout_s)
        return wire.raise_if_error(reply)

    def service(self, name: str, factory: Callable[[], Generator[Any, Any, Any]]) -> Task:
        """A background task that is restarted (with backoff) if it fails; failures show in status."""
        def supervise() -> Generator[Any, Any, None]:
            backoff = self.cfg.restart_backoff_s
            while not self.stopping:
                try:
                    yield from factory()
                    self.task_errors.pop(name, None)
                    return
                except RcopyError as exc:
                    self.task_errors[name] = f"{type(exc).__name__}: {exc}"
                    self.log("warning", f"task {name} failed, restarting: {exc}")
                except Exception as exc:  # noqa: BLE001 - a bug: reported, restarted, never silent
                    self.task_errors[name] = f"{type(exc).__name__}: {exc}"
                    self.log("bug", f"task {name} failed with {type(exc).__name__}, restarting: {exc}")
                yield Sleep(backoff)
                backoff = min(backoff * 2, self.cfg.restart_backoff_max_s)
        return self.rt.spawn(supervise(), name, on_exit=self._service_exit)

    def _service_exit(self, task: Task, error: BaseException | None, value: Any) -> None:
        if error is not None:  # only a GeneratorExit-like escape gets here
            self.task_errors[task.name] = f"{type(error).__name__}: {error}"

    def members(self, group: str, flag: str = "source") -> list[Volume]:
        """The volumes of consistency group ``group`` on this node that are sources (or dests)."""
        return [v for v in self.volumes.values() if v.info.group == group and v.info.remote_copy_flag == flag]

    # ---------------------------------------------------------------- management information
    def record(self) -> dict[str, Any]:
        return {"version": MGMT_VERSION,
                "volumes": {n: v.info.to_dict() for n, v in self.volumes.items()},
                "source_groups": {n: vars(g).copy() for n, g in self.source_group_info.items()},
                "dest_groups": {n: vars(g).copy() for n, g in self.dest_group_info.items()},
                "migrations": {m: r.to_dict() for m, r in self.migrations.items()}}

    def save(self) -> Generator[Any, Any, None]:
        """Make the management information as it is now durable (saves are written in order)."""
        self._mgmt_version += 1
        target = self._mgmt_version
        while self._mgmt_saved < target:
            if self._mgmt_busy:
                yield Wait("mgmt")
                continue
            self._mgmt_busy, covered = True, self._mgmt_version
            try:
                yield SaveMgmt(self.record())
                self._mgmt_saved = max(self._mgmt_saved, covered)
            finally:
                self._mgmt_busy = False
                self.rt.notify("mgmt")

    # ================================================================== volumes
    def _h_ping(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        return wire.ok(name=self.name, role="node", pid=self.pid, incarnation=self.incarnation, ready=self.ready)
        yield  # a generator

    def _h_volume_create(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        from .effects import VolCreate
        from .model import check_name
        name = check_name("volume", msg["name"])
        size = msg["size"]
        if not isinstance(size, int) or size <= 0 or size % 512:
            raise UsageError("volume size must be a positive multiple of 512 bytes")
        if name in self.volumes:
            raise StateError(f"volume {self.name}:{name} already exists")
        info = VolumeInfo(name=name, size=size, diff_block_bytes=self.cfg.diff_block_bytes)
        vol = Volume.make(self.rt, info, self.cfg.region_bytes)
        self.volumes[name] = vol
        try:
            yield VolCreate(name, size, info.diff_block_bytes)
            for bf in vol.maps.values():
                bf.note(bf.bits.clear_all())
                yield from bf.persist(sync=True)
            yield from self.save()
        except RcopyError:
            self.volumes.pop(name, None)
            raise
        return wire.ok(volume=name, size=size)

    def _h_volume_delete(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        from .effects import VolDelete
        vol = self.volume(msg["name"])
        if vol.info.remote_copy_flag != "off" or vol.info.rw_mode != T.NORMAL or vol.info.migration:
            raise StateError(f"volume {self.name}:{vol.name} is in a pair or migration; delete that first")
        plain_gate.shut(vol, f"volume {self.name}:{vol.name} has I/O in flight")
        del self.volumes[vol.name]
        yield from self.save()
        yield VolDelete(vol.name)
        return wire.ok()

    def _h_volume_hash(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """Per-chunk digests, so verify compares volumes without moving their bytes."""
        from .effects import VolHash
        vol = self.volume(msg["name"])
        chunk = int(msg.get("chunk", self.cfg.region_bytes))
        if chunk <= 0 or chunk > 64 << 20:
            raise UsageError("chunk must be in (0, 64 MiB]")
        offset = int(msg.get("offset", 0))
        length = int(msg.get("length", vol.info.size - offset))
        if offset % chunk or length < 0:
            raise UsageError("offset must be a multiple of chunk, length >= 0")
        vol.check(offset, min(length, vol.info.size - offset))
        digests = yield VolHash(vol.name, chunk, offset, length)
        return wire.ok(size=vol.info.size, chunk=chunk, offset=offset, digests=digests)

    # ================================================================== status
    def _h_status(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        return wire.ok(**self.status())
        yield  # a generator

    def fold_gates(self) -> None:
        """Count the writes that passed the volumes' plain gates (plain_gate.py)."""
        for v in list(self.volumes.values()):
            v.gate.fold()

    def status(self) -> dict[str, Any]:
        vols, pairs = [], []
        for v in self.volumes.values():
            info = v.info
            src = self.mig.source_of(v)
            gate_writes, gate_bytes = v.gate.fold()
            vols.append({"node": self.name, "name": info.name, "size": info.size,
                         "rw_mode": info.rw_mode, "role": info.role,
                         "consistent": info.consistent, "copy_epoch": info.copy_epoch,
                         "writes": v.writes + gate_writes, "direct_writes": v.direct_writes,
                         "gate_writes": gate_writes, "bytes_written": v.bytes_written + gate_bytes,
                         "copy_source_valid": info.copy_source_valid if info.role == "secondary" else None,
                         "copy_sources": [p.label for p in info.copy_source_info] if info.role == "secondary"
                         else None,
                         "migrated_fraction": v.migrated.fraction_set() if info.rw_mode != T.NORMAL else None,
                         "frozen": bool(src and src.stage != T.PREPARED),
                         "migrated_to": info.migration_dest_info.label if info.migration_dest_info else None,
                         "drained": bool(src and self.mig.saved_stage.get(src.id) in (T.DRAINED, T.COMPLETE)),
                         "complete": bool(src and self.mig.saved_stage.get(src.id) == T.COMPLETE)})
            if info.remote_copy_flag == "source" and info.copy_dest_info:
                pairs.append(self.primary.pair_status(v))
        groups = [g.status() for g in self.primary.groups.values()]
        groups += [g.status() for g in self.secondary.groups.values()]
        return {"node": self.name, "pid": self.pid, "ready": self.ready, "volumes": vols, "pairs": pairs, "groups": groups,
                "migrations": self.mig.status(), "task_errors": dict(self.task_errors)}
