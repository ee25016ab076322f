"""The simulated cluster: one thread, one seeded scheduler, the real cores.

Every daemon (storage nodes, the virtual-volume server) runs the same core the
real processes run; this module plays their driver. It carries out their effects
on SimFile/SimJournal (disk.py) and on a fake network, with latencies drawn from
the seed, and injects faults: link cut and heal (messages in flight are dropped,
or delivered late), a paused process (SIGSTOP: nothing it does advances), a killed
process (page cache kept) and a power loss (only what was fsynced is kept).
Time is a number: nothing sleeps.
"""
from __future__ import annotations

import heapq
import itertools
import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import wire
from ..core import effects as E
from ..core.config import Config
from ..core.node import Boot, BootState, Completed, HostIo, Incoming, NodeCore
from ..core.runtime import DECLINED
from ..core.vvol import VvolCore
from ..errors import NodeUnreachable, RcopyError
from .disk import SimFile, SimJournal

WAN_SITES = ("site-b",)           # across the WAN from everything else


@dataclass
class Disk:
    """Everything one storage node keeps on its disk."""

    volumes: dict[str, SimFile] = field(default_factory=dict)
    bitmaps: dict[tuple[str, str], SimFile] = field(default_factory=dict)
    journals: dict[str, SimJournal] = field(default_factory=dict)
    mgmt: dict[str, Any] | None = None
    applied: dict[str, tuple[int, int]] = field(default_factory=dict)
    clean: bool = True

    def power_loss(self, rnd: random.Random) -> None:
        for f in list(self.volumes.values()) + list(self.bitmaps.values()):
            f.power_loss(rnd)
        for j in self.journals.values():
            j.crash(rnd)


class Daemon:
    """A process of the cluster: a storage node or the vvol server, with its incarnation."""

    def __init__(self, world: "World", name: str, kind: str) -> None:
        self.world, self.name, self.kind = world, name, kind
        self.up = False
        self.paused = False
        self.incarnation = 0
        self.held: list[tuple[Callable[..., None], tuple[Any, ...]]] = []   # what waits while paused
        self.core: Any = None
        self.disk = Disk()
        self.nbd_inflight: dict[Any, tuple[Any, int]] = {}    # NBD requests being served: req -> caller

    def deliver(self, event: Any) -> None:
        if not self.up:
            return
        if self.paused:
            self.held.append((self.deliver, (event,)))
            return
        w = self.world
        try:
            effects = self.core.handle(event, w.now)
        except Exception as exc:  # a bug in the core: a violation, with the event that caused it
            w.violation(f"{self.name}: the core raised {type(exc).__name__}: {exc} on {type(event).__name__}")
            raise
        w.events += 1
        for eff in effects:
            w.execute(self, eff)
        w.after_step(self)


class World:
    """The scheduler, the network and the daemons of one simulated run."""

    def __init__(self, seed: int, cfg: Config, trace_max: int = 4000) -> None:
        self.seed = seed
        self.rnd = random.Random(seed)
        self.fault_rnd = random.Random(seed * 7919 + 1)
        self.cfg = cfg
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._tick = 0
        self.daemons: dict[str, Daemon] = {}
        self.cut = False
        self.limbo: list[tuple[Callable[..., None], tuple[Any, ...]]] = []   # messages across a cut link
        self.events = 0
        self.trace: list[str] = []
        self.trace_max = trace_max
        self.violations: list[str] = []
        self.checkers: list[Callable[[Daemon], None]] = []
        self.taps: list[Callable[[Daemon, Any], None]] = []      # every effect, when it is emitted
        self.landed: list[Callable[[Daemon, Any], None]] = []    # storage effects, when they land
        self.slow_disk: dict[str, float] = {}
        self.host_done: Callable[[Any], None] = lambda eff: None
        self.verbose = False
        self.ids = itertools.count(1)      # host write and request ids, unique in the run
        self._handled = 0
        self.events_max = 400_000          # a seed needs ~2,000; far more means a loop that never waits
        # Half the seeds make host writes the way the real driver does, without a task where the
        # core admits it (NodeCore.direct_write: a volume in no pair, an async or sync primary); its own
        # generator, so the other draws stay as they were.
        draw = random.Random(seed * 31 + 7)
        self.direct_writes = draw.random() < 0.5
        # ... and half carry out small page-cache writes inside the core's step (Runtime.immediate)
        self.immediate_io = draw.random() < 0.5

    # ------------------------------------------------------------------ scheduling
    def at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        self._tick += 1
        heapq.heappush(self._queue, (when, self._tick, fn, args))

    def after(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        self.at(self.now + delay, fn, *args)

    def run_until(self, t_end: float, stop: Callable[[], bool] | None = None) -> None:
        while self._queue and not self.violations:
            when, _, fn, args = self._queue[0]
            if when > t_end:
                break
            heapq.heappop(self._queue)
            self.now = max(self.now, when)
            self._handled += 1
            if self._handled > self.events_max:
                self.violation(f"runaway: more than {self.events_max} scheduled events "
                               f"(a loop that never waits?) at {self.now:.6f}")
                break
            fn(*args)
            if stop is not None and stop():
                break
        self.now = max(self.now, t_end) if not self.violations and (stop is None or not stop()) else self.now

    def log(self, text: str) -> None:
        if len(self.trace) >= self.trace_max:
            del self.trace[: self.trace_max // 4]
        self.trace.append(f"{self.now:10.6f} {text}")

    def violation(self, text: str) -> None:
        if not self.violations:
            self.log(f"VIOLATION {text}")
        self.violations.append(text)

    def after_step(self, d: Daemon) -> None:
        for check in self.checkers:
            check(d)

    # ------------------------------------------------------------------ daemons
    def add_node(self, name: str) -> Daemon:
        d = Daemon(self, name, "node")
        self.daemons[name] = d
        return d

    def add_vvol(self, name: str) -> Daemon:
        d = Daemon(self, name, "vvol")
        self.daemons[name] = d
        return d

    def start(self, d: Daemon, power_lost: bool = False) -> None:
        d.incarnation += 1
        d.up, d.paused, d.held = True, False, []
        d.nbd_inflight.clear()
        if d.kind == "vvol":
            if d.core is None:
                d.core = VvolCore(d.name, {})
            return
        d.core = NodeCore(d.name, d.name, self.cfg)
        if self.immediate_io:
            d.core.rt.immediate = lambda eff, d=d: self._immediate(d, eff)
        st = BootState(
            mgmt=json.loads(json.dumps(d.disk.mgmt)) if d.disk.mgmt is not None else None,
            bitmaps={k: bytes(f.current) for k, f in d.disk.bitmaps.items()},
            journals={g: j.recovered() for g, j in d.disk.journals.items()},
            applied=dict(d.disk.applied), clean=d.disk.clean, power_lost=power_lost,
            incarnation=f"{d.name}#{d.incarnation}")
        d.disk.clean = False
        self.log(f"{d.name}: start (incarnation {d.incarnation}{', after power loss' if power_lost else ''})")
        d.deliver(Boot(st))

    def kill(self, d: Daemon, power: bool = False) -> None:
        if not d.up:
            return
        self.log(f"{d.name}: {'power loss' if power else 'kill -9'}")
        d.up, d.paused, d.held = False, False, []
        if d.core is not None:
            d.core.rt.cancel_all()
        if power:
            d.disk.power_loss(self.fault_rnd)
        for req, (caller, inc) in list(d.nbd_inflight.items()):   # NBD connections reset at once
            self.after(self._lan(), self._complete, caller, inc, req[2], NodeUnreachable(f"{d.name}: connection reset"))
        d.nbd_inflight.clear()
        if d.kind == "vvol":
            d.core = None

    def pause(self, d: Daemon) -> None:
        if d.up and not d.paused:
            self.log(f"{d.name}: SIGSTOP")
            d.paused = True

    def resume(self, d: Daemon) -> None:
        if d.up and d.paused:
            self.log(f"{d.name}: SIGCONT")
            d.paused = False
            held, d.held = d.held, []
            for fn, args in held:
                self.after(0.0, fn, *args)

    def set_cut(self, cut: bool) -> None:
        self.log("WAN cut" if cut else "WAN healed")
        self.cut = cut
        if not cut:
            limbo, self.limbo = self.limbo, []
            for fn, args in limbo:
                self.after(self._lan(), fn, *args)

    # ------------------------------------------------------------------ effects
    def _lan(self) -> float:
        return self.rnd.uniform(0.00005, 0.0005)

    def _disk_latency(self, d: Daemon, sync: bool = False) -> float:
        base = self.rnd.uniform(0.002, 0.01) if sync else self.rnd.uniform(0.00001, 0.0002)
        return base * self.slow_disk.get(d.name, 1.0)

    def _complete(self, d: Daemon, incarnation: int, op: int, result: Any) -> None:
        if d.up and d.incarnation == incarnation:
            d.deliver(Completed(op, result))

    def _gated(self, d: Daemon, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` unless ``d`` is paused (then when it resumes) or gone."""
        if not d.up:
            return
        if d.paused:
            d.held.append((fn, args))
            return
        fn(*args)

    def execute(self, d: Daemon, eff: Any) -> None:
        for tap in self.taps:
            tap(d, eff)
        if self.verbose:
            self.log(f"{d.name} > {_describe(eff)}")
        inc = d.incarnation
        if isinstance(eff, E.SetTimer):
            self.at(eff.at, self._gated, d, self._complete, d, inc, eff.op, None)
        elif isinstance(eff, E.Call):
            self._send_call(d, eff)
        elif isinstance(eff, E.Reply):
            caller_name, cinc, op = eff.req
            caller = self.daemons[caller_name]
            self._send(d, caller, self._complete, caller, cinc, op, eff.msg)
        elif isinstance(eff, E.HostDone):
            self._host_done(d, eff)
        elif isinstance(eff, E.Log):
            if eff.level in ("warning", "error"):
                self.log(f"{d.name}: {eff.level}: {eff.text}")
        elif isinstance(eff, E.GateDrain):
            self.after(0.0, self._gated, d, self._drain, d, inc, eff)
        else:
            sync = isinstance(eff, (E.VolSync, E.BitmapSync, E.JournalSync, E.SaveMgmt, E.SaveApplied,
                                    E.JournalDiscard, E.JournalCreate))
            t1 = self._disk_latency(d) if not sync else self._disk_latency(d, True) * self.rnd.random()
            self.after(t1, self._gated, d, self._storage, d, inc, eff, sync)

    def _immediate(self, d: Daemon, eff: Any) -> Any:
        """A volume write, journal append or bitmap put carried out at once, inside the core's
        step, as the real driver does (Runtime.immediate): it lands in the page cache now."""
        if type(eff) not in (E.VolWrite, E.JournalAppend, E.BitmapPut):
            return DECLINED
        return self._land_or_fail(d, eff, "at once")

    def _land_or_fail(self, d: Daemon, eff: Any, how: str) -> Any:
        """``_land_now``, with the disk's error as the result (what a task would get)."""
        try:
            return self._land_now(d, eff, how)
        except RcopyError as exc:
            return exc

    def _land_now(self, d: Daemon, eff: Any, how: str) -> Any:
        """A storage effect the core never put out (it was carried out inside a step, or by a
        write without a task): every tap sees it as it lands."""
        if self.verbose:
            self.log(f"{d.name} = {_describe(eff)} ({how})")
        for tap in self.taps + self.landed:
            tap(d, eff)
        return self.storage(d, eff)

    def _storage(self, d: Daemon, inc: int, eff: Any, sync: bool) -> None:
        if d.incarnation != inc:
            return
        for tap in self.landed:
            tap(d, eff)
        try:
            result = self.storage(d, eff)
        except RcopyError as exc:
            result = exc
        self.after(self._disk_latency(d, sync) * (0.2 if not sync else 1.0), self._gated, d,
                   self._complete, d, inc, eff.op, result)

    def storage(self, d: Daemon, eff: Any) -> Any:
        """Carry out one storage effect on the node's disk (it lands now; it is acknowledged later)."""
        disk = d.disk
        if isinstance(eff, E.VolWrite):
            disk.volumes[eff.volume].write(eff.offset, bytes(eff.data))
        elif isinstance(eff, E.VolWriteMany):
            for volume, offset, data in eff.writes:
                disk.volumes[volume].write(offset, bytes(data.length) if isinstance(data, E.Zeros) else bytes(data))
        elif isinstance(eff, E.VolRead):
            data = disk.volumes[eff.volume].read(eff.offset, eff.length)
            return None if eff.sparse and not any(data) else data
        elif isinstance(eff, E.VolHoleRun):
            data = disk.volumes[eff.volume].read(eff.offset, eff.length)
            stripped = data.lstrip(b"\0")
            return len(data) - len(stripped)
        elif isinstance(eff, E.VolExtents):     # one run: a mixed range is data (never a false hole)
            data = disk.volumes[eff.volume].read(eff.offset, eff.length)
            return [(len(data), not any(data))] if data else []
        elif isinstance(eff, E.VolZero):
            disk.volumes[eff.volume].write(eff.offset, bytes(eff.length))
        elif isinstance(eff, E.VolSync):
            disk.volumes[eff.volume].fsync()
        elif isinstance(eff, E.VolCreate):
            disk.volumes[eff.volume] = SimFile(eff.size)
            disk.volumes[eff.volume].fsync()
            for kind in ("diff", "migrated", "activity"):
                block = eff.diff_block_bytes if kind == "diff" else self.cfg.region_bytes
                disk.bitmaps[(eff.volume, kind)] = SimFile(-(-(-(-eff.size // block)) // 8))
        elif isinstance(eff, E.VolDelete):
            disk.volumes.pop(eff.volume, None)
            for kind in ("diff", "migrated", "activity"):
                disk.bitmaps.pop((eff.volume, kind), None)
        elif isinstance(eff, E.VolHash):
            import hashlib
            f = disk.volumes[eff.volume]
            end = len(f.current) if eff.length < 0 else min(len(f.current), eff.offset + eff.length)
            out = []
            for off in range(eff.offset, end, eff.chunk):
                chunk = f.read(off, min(eff.chunk, end - off))
                out.append("0" if not any(chunk) else hashlib.blake2b(chunk, digest_size=16).hexdigest())
            return out
        elif isinstance(eff, E.BitmapPut):
            disk.bitmaps[(eff.volume, eff.kind)].write(eff.first, eff.data)
        elif isinstance(eff, E.BitmapSync):
            disk.bitmaps[(eff.volume, eff.kind)].fsync()
        elif isinstance(eff, E.BitmapCreate):
            disk.bitmaps[(eff.volume, eff.kind)] = SimFile(-(-(-(-eff.size // eff.block_bytes)) // 8))
        elif isinstance(eff, E.JournalCreate):
            j = SimJournal(eff.capacity_bytes)
            j.continue_at(eff.counter, eff.head)
            disk.journals[eff.group] = j
        elif isinstance(eff, E.JournalAppend):
            disk.journals[eff.group].append(eff.entries)
        elif isinstance(eff, E.JournalSync):
            disk.journals[eff.group].sync()
        elif isinstance(eff, E.JournalRead):
            return disk.journals[eff.group].read(eff.first, eff.last)
        elif isinstance(eff, E.JournalDiscard):
            disk.journals[eff.group].discard(eff.through, eff.counter)
        elif isinstance(eff, E.JournalDelete):
            disk.journals.pop(eff.group, None)
        elif isinstance(eff, E.SaveMgmt):
            disk.mgmt = json.loads(json.dumps(eff.record))
        elif isinstance(eff, E.SaveApplied):
            disk.applied[eff.group] = (eff.applied, eff.applying)
        else:
            raise TypeError(f"unknown effect {eff!r}")
        return None

    # ------------------------------------------------------------------ network
    def _crosses_wan(self, a: str, b: str) -> bool:
        return (a in WAN_SITES) != (b in WAN_SITES)

    def _send(self, src: Daemon, dst_name: str | Daemon, fn: Callable[..., None], *args: Any,
              refused: bool = False) -> None:
        """One message from ``src`` to ``dst``: a latency, and across a cut WAN, lost or late."""
        dst = dst_name if isinstance(dst_name, Daemon) else self.daemons.get(dst_name)
        if dst is None:
            return
        wan = self._crosses_wan(src.name, dst.name)
        delay = self.rnd.uniform(0.0005, 0.003) if wan else self._lan()

        def arrive() -> None:
            if wan and self.cut:
                fate = self.fault_rnd.random()
                if fate < 0.5:
                    self.log(f"lost {src.name}->{dst.name}")
                    return
                self.limbo.append((lambda: self._gated(dst, fn, *args), ()))
                if fate < 0.55:   # delivered twice after the link heals
                    self.limbo.append((lambda: self._gated(dst, fn, *args), ()))
                return
            if refused:       # NBD: the kernel takes the request even from a stopped process
                fn(*args)
                return
            self._gated(dst, fn, *args)
        self.after(delay, arrive)

    def _send_call(self, d: Daemon, eff: Any) -> None:
        inc = d.incarnation
        target = self.daemons.get(eff.node)
        if target is None:
            self.after(0.0, self._complete, d, inc, eff.op, NodeUnreachable(f"no node {eff.node}"))
            return
        req = (d.name, inc, eff.op)
        self.after(eff.timeout_s, self._gated, d, self._complete, d, inc, eff.op,
                   NodeUnreachable(f"no answer from {eff.node} within {eff.timeout_s:g} s"))
        msg = _copy_msg(eff.msg)
        if msg.kind == "nbd" and target.kind == "node":
            self._send(d, target, self._nbd_arrive, target, req, msg, refused=True)
        else:
            self._send(d, target, self._call_arrive, target, req, msg)

    def _call_arrive(self, target: Daemon, req: Any, msg: wire.Message) -> None:
        if not target.up:
            return
        target.deliver(Incoming(req, msg))

    def _nbd_arrive(self, target: Daemon, req: Any, msg: wire.Message) -> None:
        caller = self.daemons[req[0]]
        if not target.up:
            self.after(self._lan(), self._complete, caller, req[1], req[2],
                       NodeUnreachable(f"{target.name}: connection refused"))
            return
        f = msg.fields
        target.nbd_inflight[req] = (caller, req[1])
        io = HostIo(req, f["op"], f["volume"], f["offset"], f["length"],
                    msg.payloads[0] if msg.payloads else None, bool(f.get("fua")))
        if self.direct_writes and io.op == "write" and not io.fua:
            self._gated(target, self._direct_write, target, io)
        elif self.direct_writes and io.op == "read":
            self._gated(target, self._read, target, io)
        else:
            self._gated(target, target.deliver, io)

    def _direct_write(self, d: Daemon, io: HostIo) -> None:
        """A write as the real driver makes it when the core admits it without a task: admitted
        (and, async, journaled at once) in one call, the bytes land after a disk latency, then
        the core is told and the host answered."""
        if not d.up:
            return
        vol = d.core.volumes.get(io.volume)
        if vol is not None and vol.gate.enter():
            self._plain_write(d, io, vol)
            return
        try:
            w = d.core.direct_write(io.req, io.volume, io.offset, io.data, self.now,
                                    lambda eff: self._land_or_fail(d, eff, "without a task"))
        except RcopyError as exc:
            self._host_done(d, E.HostDone(io.req, error=exc))
            return
        if w is None:
            d.deliver(io)
            return
        for out in w.effects:
            self.execute(d, out)
        self.after_step(d)
        if w.as_task:
            return                       # its append failed: the task that finishes it answers
        # sometimes a long stall (page cache writeback): a pair create or a migration step may run meanwhile
        stall = self.rnd.uniform(0.001, 0.02) if self.rnd.random() < 0.2 else 0.0
        self.after(self._disk_latency(d) + stall, self._gated, d, self._direct_landed, d, d.incarnation, io, w)

    def _plain_write(self, d: Daemon, io: HostIo, vol: Any) -> None:
        """A write past a plain volume's open gate (core/plain_gate.py), as Node.write makes it:
        no core step; the bytes land after a disk latency (sometimes a long stall: a pair create
        or a migration to the volume may start meanwhile), then it leaves the gate and the host
        is answered."""
        assert io.data is not None
        try:
            vol.check(io.offset, len(io.data))
        except RcopyError as exc:
            vol.gate.leave(None)
            self._host_done(d, E.HostDone(io.req, error=exc))
            return
        # a pwrite the kernel throttles (dirty page limits) can take long: past the pair's first copy
        r = self.rnd.random()
        stall = self.rnd.uniform(0.05, 0.3) if r < 0.05 else self.rnd.uniform(0.001, 0.02) if r < 0.25 else 0.0
        self.after(self._disk_latency(d) + stall, self._gated, d, self._plain_landed, d, d.incarnation, io, vol)

    def _read(self, d: Daemon, io: HostIo) -> None:
        """A read as Node.read makes it: past a gate open to reads without the core, else the core's."""
        vol = d.core.volumes.get(io.volume)
        if vol is None or not vol.gate.enter(read=True):
            d.deliver(io)
            return
        try:
            vol.check(io.offset, io.length)
        except RcopyError as exc:
            vol.gate.leave_read()
            self._host_done(d, E.HostDone(io.req, error=exc))
            return
        self.after(self._disk_latency(d), self._gated, d, self._plain_read, d, d.incarnation, io, vol)

    def _plain_read(self, d: Daemon, inc: int, io: HostIo, vol: Any) -> None:
        if d.incarnation != inc:
            return
        try:
            result = self.storage(d, E.VolRead(io.volume, io.offset, io.length))
        except RcopyError as exc:
            result = exc
        vol.gate.leave_read()
        if isinstance(result, RcopyError):
            self._host_done(d, E.HostDone(io.req, error=result))
        else:
            self._host_done(d, E.HostDone(io.req, result))

    def _plain_landed(self, d: Daemon, inc: int, io: HostIo, vol: Any) -> None:
        if d.incarnation != inc:
            return
        result = self._land_or_fail(d, E.VolWrite(io.volume, io.offset, io.data), "past the plain gate")
        error = result if isinstance(result, RcopyError) else None
        vol.gate.leave(None if error else len(io.data))
        self._host_done(d, E.HostDone(io.req, error=error))

    def _drain(self, d: Daemon, inc: int, eff: Any) -> None:
        """GateDrain: done once no write is past the gate (the real driver polls too)."""
        if eff.gate.active:
            self.after(0.0005, self._gated, d, self._drain, d, inc, eff)
        else:
            self._complete(d, inc, eff.op, None)

    def _direct_landed(self, d: Daemon, inc: int, io: HostIo, w: Any) -> None:
        if d.incarnation != inc:
            return
        self._land_now(d, E.VolWrite(io.volume, io.offset, w.data), "a write without a task")
        for out in d.core.direct_written(w, self.now):
            self.execute(d, out)
        self.after_step(d)
        if not w.waits:                  # a sync write: its batch's sender answers (a HostDone effect)
            self._host_done(d, E.HostDone(io.req))

    def _host_done(self, d: Daemon, eff: Any) -> None:
        if d.kind == "node":
            caller_inc = d.nbd_inflight.pop(eff.req, None)
            if caller_inc is None:
                return
            caller, cinc = caller_inc
            reply = wire.error_reply(eff.error) if eff.error else wire.ok([eff.data] if eff.data is not None else [])
            self._send(d, caller, self._complete, caller, cinc, eff.req[2], reply)
        else:
            self.host_done(eff)


def _copy_msg(msg: wire.Message) -> wire.Message:
    """What crosses the network is a copy (a sender may not change what it already sent)."""
    return wire.Message(msg.kind, json.loads(json.dumps(msg.fields)), [bytes(p) for p in msg.payloads])


def _describe(eff: Any) -> str:
    name = type(eff).__name__
    if isinstance(eff, E.Call):
        return f"Call#{eff.op} {eff.node} {eff.msg.kind} {_short(eff.msg.fields)}"
    if isinstance(eff, E.Reply):
        return f"Reply {eff.req} {eff.msg.kind} {_short(eff.msg.fields)}"
    if isinstance(eff, E.HostDone):
        return f"HostDone {eff.req} {'error ' + str(eff.error) if eff.error else 'ok'}"
    if isinstance(eff, E.JournalAppend):
        return f"JournalAppend#{eff.op} {eff.group} {[e.seq for e in eff.entries]}"
    if isinstance(eff, E.Log):
        return f"Log {eff.level}: {eff.text}"
    if isinstance(eff, E.VolWriteMany):
        return f"VolWriteMany#{eff.op} {[(v, o, len(d)) for v, o, d in eff.writes]}"
    fields = {k: getattr(eff, k) for k in getattr(eff, "__slots__", ()) if k not in ("data", "record", "entries")}
    return f"{name} {fields}"


def _short(fields: dict[str, Any]) -> str:
    text = json.dumps(fields, default=str)
    return text if len(text) < 160 else text[:157] + "..."
