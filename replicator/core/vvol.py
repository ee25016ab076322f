"""Virtual volumes (SPEC 1.4, the virtualizing network device 3) as a sans-IO state machine.

A virtual volume presents one stable name to hosts and forwards each request to
the real volume it maps to. **The path switch** (S704, option 2): hold new
requests, let the in-flight ones finish, remap, release the held ones to the new
target. The host never sees an error, only a short delay. A request whose
connection to the target breaks is retried (for ``retry_s``) on a new one.

Used by the simulator directly; the real server (replicator/vvol.py) applies the
same ``Gate`` rules with threads around libnbd.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator

from .. import wire
from ..errors import NodeUnreachable, NotFound, RcopyError, StateError, UsageError
from .effects import Call, Effect, HostDone, Reply
from .runtime import Runtime, Sleep, Wait

RETRY_S = 10.0
HOLD_TIMEOUT_S = 30.0


@dataclass
class Gate:
    """Admission for one virtual volume: the rule of the path switch, without threads."""

    inflight: int = 0
    holding: bool = False

    def may_enter(self) -> bool:
        return not self.holding

    def drained(self) -> bool:
        return self.inflight == 0


@dataclass
class VirtualVolume:
    name: str
    target: str                 # NODE:VOLUME
    size: int
    gate: Gate = field(default_factory=Gate)
    requests: int = 0
    held_ms_max: float = 0.0
    generation: int = 0


class VvolCore:
    """The engine of a virtual-volume server: mapping, forwarding, path switch."""

    def __init__(self, name: str, endpoints: dict[str, str], retry_s: float = RETRY_S) -> None:
        self.name, self.endpoints, self.retry_s = name, endpoints, retry_s
        self.rt = Runtime()
        self.vvols: dict[str, VirtualVolume] = {}

    def handle(self, event: Any, now: float) -> list[Effect]:
        from .node import Completed, HostIo, Incoming
        self.rt.now = now
        if isinstance(event, Completed):
            self.rt.complete(event.op, event.result)
        elif isinstance(event, HostIo):
            self.rt.spawn(self._forward(event), "vvol-io")
        elif isinstance(event, Incoming):
            self.rt.spawn(self._request(event), "vvol-req")
        return self.rt.take()

    def _key(self, vv: VirtualVolume) -> tuple[str, str]:
        return ("gate", vv.name)

    def _forward(self, ev: Any) -> Generator[Any, Any, None]:
        rt = self.rt
        try:
            vv = self.vvols.get(ev.volume)
            if vv is None:
                raise NotFound(f"no virtual volume {ev.volume!r}")
            start = rt.now
            while not vv.gate.may_enter():
                yield Wait(self._key(vv))
            vv.gate.inflight += 1
            vv.requests += 1
            vv.held_ms_max = max(vv.held_ms_max, (rt.now - start) * 1000)
            try:
                deadline = rt.now + self.retry_s
                while True:
                    node, vol = vv.target.split(":", 1)
                    msg = wire.Message("nbd", {"op": ev.op, "volume": vol, "offset": ev.offset,
                                               "length": ev.length, "fua": ev.fua},
                                       [ev.data] if ev.data is not None else [])
                    try:
                        reply = yield Call(node, self.endpoints.get(node, node), msg, 3600.0)
                        reply = wire.raise_if_error(reply)
                        break
                    except NodeUnreachable:       # the connection broke: retry on a new one
                        if rt.now >= deadline:
                            raise
                        yield Sleep(0.1)
            finally:
                vv.gate.inflight -= 1
                rt.notify(self._key(vv))
            rt.emit(HostDone(ev.req, reply.payloads[0] if reply.payloads else None))
        except RcopyError as exc:
            rt.emit(HostDone(ev.req, error=exc))

    def _request(self, ev: Any) -> Generator[Any, Any, None]:
        msg = ev.msg
        try:
            if msg.kind == "vvol.create":
                name, target = str(msg["name"]), str(msg["target"])
                if name in self.vvols:
                    raise StateError(f"virtual volume {name!r} already exists")
                self.vvols[name] = VirtualVolume(name, target, int(msg["size"]))
                reply = wire.ok(name=name, target=target)
            elif msg.kind == "vvol.switch":
                reply = yield from self.switch(str(msg["name"]), str(msg["target"]))
            elif msg.kind == "vvol.list":
                reply = wire.ok(vvols=[{"name": v.name, "target": v.target, "size": v.size,
                                        "inflight": v.gate.inflight, "requests": v.requests,
                                        "held_ms_max": round(v.held_ms_max, 2)} for v in self.vvols.values()])
            elif msg.kind == "ping":
                reply = wire.ok(role="vvol_server")
            else:
                raise UsageError(f"unknown message kind {msg.kind!r}")
        except RcopyError as exc:
            reply = wire.error_reply(exc)
        self.rt.emit(Reply(ev.req, reply))

    def switch(self, name: str, target: str) -> Generator[Any, Any, wire.Message]:
        """S704: hold new requests, drain in-flight ones, remap, release."""
        rt = self.rt
        vv = self.vvols.get(name)
        if vv is None:
            raise NotFound(f"no virtual volume {name!r}")
        t0 = rt.now
        vv.gate.holding = True
        deadline = t0 + HOLD_TIMEOUT_S
        try:
            while not vv.gate.drained():
                if rt.now >= deadline:
                    raise StateError(f"{name}: requests still in flight after {HOLD_TIMEOUT_S:g} s; switch cancelled")
                yield Wait(self._key(vv), timeout_s=deadline - rt.now)
            vv.target = target
            vv.generation += 1
        finally:
            vv.gate.holding = False
            rt.notify(self._key(vv))
        held_ms = (rt.now - t0) * 1000
        vv.held_ms_max = max(vv.held_ms_max, held_ms)
        return wire.ok(name=name, target=target, held_ms=round(held_ms, 2))
