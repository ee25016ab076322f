"""The simulated host: writes self-describing blocks through the virtual volume and keeps a log.

Every block written by host write ``w`` holds ``(w, block)`` repeated, so any image
can be read back as "which write is in each block". The host never has two
requests in flight on the same block, so the writes of one block are totally
ordered; across blocks, a write issued after another was acknowledged comes after it.

What a read may return for a block (``allowed``): the last write acknowledged,
unless a primary-side node lost power since it was acknowledged without a flush
(then any write from the last durable one on), plus any write that failed (it may
have landed).
"""
from __future__ import annotations

import itertools
import random
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import wire
from ..core import effects as E
from ..core.node import Completed, HostIo
from ..errors import RcopyError
from .world import Daemon

BLOCK = 512
_PAT = struct.Struct("<QQ")


_ZERO = bytes(BLOCK)


def block_bytes(write_id: int, block: int) -> bytes:
    return _PAT.pack(write_id, block) * (BLOCK // _PAT.size)


def decode(data: bytes, first_block: int) -> list[int | None]:
    """The write id in each block of ``data`` (0: never written; None: not one write's block)."""
    out: list[int | None] = []
    for i in range(len(data) // BLOCK):
        blk = data[i * BLOCK:(i + 1) * BLOCK]
        head = blk[:_PAT.size]
        if blk == head * (BLOCK // _PAT.size):
            wid, b = _PAT.unpack(head)
            if wid == 0 and b == 0:
                out.append(0)
            else:
                out.append(wid if b == first_block + i else None)
        else:
            out.append(None)
    return out


@dataclass
class Write:
    id: int
    block: int
    count: int
    issued: float
    acked: float | None = None
    failed: str = ""
    fua: bool = False
    zero: bool = False       # a WRITE_ZEROES / TRIM: the blocks read as zeros (write id 0) after it
    durable: bool = False
    suspect: bool = False    # in flight when a primary lost power: its ack may come from before the loss


@dataclass
class History:
    """Per block: the writes in order, and the index of the oldest one a read may still return."""

    writes: list[Write] = field(default_factory=list)
    floor: int = -1                 # -1: the initial zeros are still allowed
    pos: dict[int, int] = field(default_factory=dict)    # write id -> index in writes

    def add(self, w: Write) -> None:
        self.pos[w.id] = len(self.writes)
        self.writes.append(w)


class OldPath(Daemon):
    """The host's old path straight to V1's export (a multipath leftover, a second mount): V1
    takes its writes until the handover and must refuse them from then on (invariant 8)."""

    def __init__(self, world: Any, host: "Host", node: str, volume: str) -> None:
        super().__init__(world, f"old-path-{host.app}", "path")
        self.host, self.node, self.volume = host, node, volume
        self.up = True
        self.ops = itertools.count(1)
        self.waiting: dict[int, Any] = {}

    def send(self, req: Any, offset: int, data: bytes, fua: bool) -> None:
        call = E.Call(self.node, self.node, wire.Message("nbd", {"op": "write", "volume": self.volume,
                                                               "offset": offset, "length": len(data),
                                                               "fua": fua}, [data]), 3.0)
        call.op = next(self.ops)
        self.waiting[call.op] = req
        self.world.execute(self, call)

    def deliver(self, event: Any) -> None:
        req = self.waiting.pop(event.op, None) if isinstance(event, Completed) else None
        if req is None:
            return
        error = event.result if isinstance(event.result, BaseException) else None
        if error is None:
            try:
                wire.raise_if_error(event.result)
            except RcopyError as exc:
                error = exc
        self.host.done(E.HostDone(req, None, error))


class Host:
    """A host with up to ``qd`` requests in flight on distinct blocks."""

    def __init__(self, world: Any, vvol: str, volume_blocks: int, rnd: Any, qd: int = 3,
                 rate_hz: float = 150.0) -> None:
        self.world, self.vvol, self.blocks, self.rnd = world, vvol, volume_blocks, rnd
        self.qd, self.rate_hz = qd, rate_hz
        self.app = "app"
        self.ids = world.ids
        self.busy: set[int] = set()
        self.inflight: dict[Any, tuple[str, Any]] = {}
        self.hist = [History() for _ in range(volume_blocks)]
        self.writes: dict[int, Write] = {}
        self.errors: list[str] = []
        self.reads_checked = 0
        self.running = False
        self.stop_at = 0.0
        self.completed = 0
        self.on_read: Callable[[list[int | None], int, float], None] | None = None
        self.lost_power_at = -1.0            # the last power loss of a primary-side node
        self.old_path: OldPath | None = None
        self.old_share = 0.0                 # the part of the writes that takes the old path
        self.path_rnd = random.Random(rnd.random())
        self.zero_share = 0.0                # the part of the requests that zero blocks (TRIM, WRITE_ZEROES)
        self.zero_rnd = random.Random(0)     # its own stream: seeds without zeroing run as they always did

    # ------------------------------------------------------------------ load
    def start(self, until: float) -> None:
        self.running, self.stop_at = True, until
        for _ in range(self.qd):
            self.world.after(self.rnd.expovariate(self.rate_hz), self._issue)

    def _issue(self) -> None:
        w = self.world
        if not self.running or w.now >= self.stop_at:
            return
        if len(self.inflight) < self.qd and self.zero_share and self.zero_rnd.random() < self.zero_share:
            self._zero()
        elif len(self.inflight) < self.qd:
            r = self.rnd.random()
            if r < 0.8:
                self._write()
            elif r < 0.93:
                self._read()
            else:
                self._flush()
        w.after(self.rnd.expovariate(self.rate_hz / self.qd), self._issue)

    def _free_range(self, count: int, rnd: Any = None) -> int | None:
        for _ in range(8):
            b = (rnd or self.rnd).randrange(0, self.blocks - count + 1)
            if not any(x in self.busy for x in range(b, b + count)):
                return b
        return None

    def _submit(self, kind: str, ctx: Any, op: str, offset: int, length: int, data: bytes | None,
                fua: bool = False) -> None:
        req = ("host", next(self.ids), kind)
        self.inflight[req] = (kind, ctx)
        if kind == "write" and data is not None and self.old_path is not None \
                and self.path_rnd.random() < self.old_share:
            self.old_path.send(req, offset, data, fua)
            return
        vv = self.world.daemons[self.vvol]
        vv.deliver(HostIo(req, op, self.app, offset, length, data, fua))

    def _write(self) -> None:
        count = self.rnd.choice((1, 1, 2, 3, 8))
        b = self._free_range(count)
        if b is None:
            return
        wid = next(self.ids)
        data = b"".join(block_bytes(wid, x) for x in range(b, b + count))
        write = Write(wid, b, count, self.world.now, fua=self.rnd.random() < 0.05)
        self.writes[wid] = write
        for x in range(b, b + count):
            self.busy.add(x)
            self.hist[x].add(write)
        self._submit("write", write, "write", b * BLOCK, len(data), data, write.fua)

    def _zero(self) -> None:
        """A TRIM or WRITE_ZEROES of a few blocks: afterwards they read as zeros."""
        count = self.zero_rnd.choice((1, 2, 4, 8))
        b = self._free_range(count, self.zero_rnd)
        if b is None:
            return
        wid = next(self.ids)
        write = Write(wid, b, count, self.world.now, fua=self.zero_rnd.random() < 0.05, zero=True)
        self.writes[wid] = write
        for x in range(b, b + count):
            self.busy.add(x)
            self.hist[x].add(write)
        self._submit("write", write, self.zero_rnd.choice(("zero", "trim")), b * BLOCK, count * BLOCK, None,
                     write.fua)

    def _read(self) -> None:
        count = self.rnd.choice((1, 2, 4))
        b = self._free_range(count)
        if b is None:
            return
        self.busy.update(range(b, b + count))
        self._submit("read", (b, count, self.world.now), "read", b * BLOCK, count * BLOCK, None)

    def _flush(self) -> None:
        self._submit("flush", self.world.now, "flush", 0, 0, None)

    def read_all(self, done: Callable[[list[int | None]], None]) -> None:
        """Read the whole volume through the virtual volume (at the end of a run)."""
        self.busy.update(range(self.blocks))
        self._submit("readall", done, "read", 0, self.blocks * BLOCK, None)

    # ------------------------------------------------------------------ completions
    def done(self, eff: Any) -> None:
        entry = self.inflight.pop(eff.req, None)
        if entry is None:
            self.world.violation(f"host request {eff.req} completed twice or was never sent")
            return
        self.completed += 1
        kind, ctx = entry
        now = self.world.now
        if kind == "write":
            write: Write = ctx
            for x in range(write.block, write.block + write.count):
                self.busy.discard(x)
            if eff.error is not None:
                write.failed = f"{type(eff.error).__name__}: {eff.error}"
                self.errors.append(f"write {write.id}: {write.failed}")
                return
            write.acked = now
            write.durable = write.fua
            if write.suspect:
                return
            for x in range(write.block, write.block + write.count):
                self.hist[x].floor = self.hist[x].pos[write.id]
        elif kind == "flush":
            if eff.error is not None:
                self.errors.append(f"flush: {type(eff.error).__name__}: {eff.error}")
                return
            for write in self.writes.values():     # a flush after a power loss cannot save what it took
                if write.acked is not None and self.lost_power_at < write.acked <= ctx:
                    write.durable = True
        elif kind == "read":
            b, count, issued = ctx
            for x in range(b, b + count):
                self.busy.discard(x)
            if eff.error is not None:
                self.errors.append(f"read: {type(eff.error).__name__}: {eff.error}")
                return
            got = decode(eff.data, b)
            for i, wid in enumerate(got):
                bad = self.check_block(b + i, wid)
                if bad:
                    self.world.violation(f"host read of block {b + i}: {bad}")
            self.reads_checked += 1
        elif kind == "readall":
            self.busy.difference_update(range(self.blocks))
            if eff.error is not None:
                self.errors.append(f"final read: {type(eff.error).__name__}: {eff.error}")
                ctx(None)
                return
            ctx(decode(eff.data, 0))

    # ------------------------------------------------------------------ what may be read
    def may_hold(self, block: int, wid: int | None) -> bool:
        """Is ``wid`` a write a read of ``block`` may return now (see ``allowed``)?"""
        if wid is None:
            return False
        h = self.hist[block]
        if wid == 0:          # the initial zeros, or a zeroing the host may find
            return h.floor < 0 or any(w.zero and (i >= h.floor or bool(w.failed)) for i, w in enumerate(h.writes))
        i = h.pos.get(wid)
        return i is not None and (i >= h.floor or bool(h.writes[i].failed))

    def check_block(self, block: int, wid: int | None) -> str:
        if wid is None:
            return "a torn or foreign block"
        if self.may_hold(block, wid):
            return ""
        h = self.hist[block]
        last = h.writes[h.floor].id if h.floor >= 0 else 0
        return f"holds write {wid}, expected write {last} (or a later or failed one)"

    def power_lost(self) -> None:
        """A primary-side node lost power: acknowledged writes never flushed may be gone."""
        self.lost_power_at = self.world.now
        for kind, ctx in self.inflight.values():
            if kind == "write":
                ctx.suspect = True
        for h in self.hist:
            floor = -1
            for i, w in enumerate(h.writes):
                if w.acked is not None and w.durable and i <= h.floor:
                    floor = i
            h.floor = floor

    def outstanding(self) -> int:
        return len(self.inflight)
