"""Drive one NodeCore by hand in a unit test: storage effects run at once on simulated files,
requests to other nodes wait in ``calls`` until the test answers them."""
from __future__ import annotations

from typing import Any

from replicator import wire
from replicator.core import effects as E
from replicator.core.config import Config
from replicator.core.node import Boot, BootState, Completed, HostIo, Incoming, NodeCore
from replicator.sim.scenario import SIM_CONFIG
from replicator.sim.world import Daemon, World


class Harness:
    def __init__(self, name: str = "site-a1", boot: BootState | None = None, cfg: Config = SIM_CONFIG) -> None:
        self.world = World(1, cfg)
        self.daemon = Daemon(self.world, name, "node")
        self.core = NodeCore(name, name, cfg)
        self.daemon.core = self.core
        self.now = 0.0
        self.calls: list[E.Call] = []
        self.replies: dict[Any, wire.Message] = {}
        self.host: dict[Any, E.HostDone] = {}
        self.timers: list[E.SetTimer] = []
        self.logs: list[E.Log] = []
        self.drains: list[E.GateDrain] = []
        self.storage_log: list[Any] = []
        self.trace: list[Any] = []          # every effect, in the order the core emitted them
        self.feed(Boot(boot or BootState(incarnation=f"{name}#1")))

    def feed(self, event: Any) -> None:
        self.feed_effects(self.core.handle(event, self.now))

    def feed_effects(self, effects: list[Any]) -> None:
        """Carry out ``effects`` (and feed back what follows from them) as the driver would."""
        todo: list[Any] = []
        while True:
            for eff in effects:
                self.trace.append(eff)
                if isinstance(eff, E.Call):
                    self.calls.append(eff)
                elif isinstance(eff, E.SetTimer):
                    self.timers.append(eff)
                elif isinstance(eff, E.Reply):
                    self.replies[eff.req] = eff.msg
                elif isinstance(eff, E.HostDone):
                    self.host[eff.req] = eff
                elif isinstance(eff, E.Log):
                    self.logs.append(eff)
                elif isinstance(eff, E.GateDrain):
                    self.drains.append(eff)         # the test says when it is done: ``drained``
                else:
                    self.storage_log.append(eff)
                    try:
                        result = self.world.storage(self.daemon, eff)
                    except Exception as exc:  # noqa: BLE001
                        result = exc
                    todo.append(Completed(eff.op, result))
            if not todo:
                return
            effects = self.core.handle(todo.pop(0), self.now)

    # ------------------------------------------------------------------ helpers
    def request(self, kind: str, payloads: list[bytes] | None = None, **fields: Any) -> wire.Message | None:
        req = ("test", len(self.replies) + len(self.calls) + 1000)
        self.feed(Incoming(req, wire.Message(kind, fields, payloads or [])))
        return self.replies.get(req)

    def ok(self, kind: str, payloads: list[bytes] | None = None, **fields: Any) -> dict[str, Any]:
        reply = self.request(kind, payloads, **fields)
        assert reply is not None, f"{kind} did not answer"
        return wire.raise_if_error(reply).fields

    def write(self, volume: str, offset: int, data: bytes, fua: bool = False) -> Any:
        req = ("host", len(self.host) + 2000 + len(self.calls))
        self.feed(HostIo(req, "write", volume, offset, len(data), data, fua))
        return req

    def direct(self, volume: str, offset: int, data: Any, fail: BaseException | None = None) -> Any:
        """NodeCore.direct_write as the driver makes it (the journal append stored at once, or
        failing with ``fail``), its effects carried out; the host's request is ``last_req``."""
        self.last_req = ("host", len(self.host) + 5000 + len(self.calls))

        def store(eff: Any) -> Any:
            if fail is not None and isinstance(eff, E.JournalAppend):
                return fail
            return self.world.storage(self.daemon, eff)
        w = self.core.direct_write(self.last_req, volume, offset, data, self.now, store)
        if w is not None:
            self.feed_effects(w.effects)
        return w

    def direct_landed(self, w: Any) -> None:
        """The volume write of a direct write lands, then the core is told."""
        self.world.storage(self.daemon, E.VolWrite(w.vol.name, w.offset, w.data))
        self.feed_effects(self.core.direct_written(w, self.now))

    def drained(self) -> None:
        """The oldest GateDrain is done (no write is past its gate any more)."""
        self.feed(Completed(self.drains.pop(0).op, None))

    def answer(self, call: E.Call, reply: wire.Message | BaseException) -> None:
        self.calls.remove(call)
        self.feed(Completed(call.op, reply))

    def pending(self, kind: str) -> list[E.Call]:
        return [c for c in self.calls if c.msg.kind == kind]

    def advance(self, seconds: float) -> None:
        """Let time pass: fire every timer due by then, in order."""
        end = self.now + seconds
        while True:
            due = sorted((t for t in self.timers if t.at <= end), key=lambda t: t.at)
            if not due:
                break
            t = due[0]
            self.timers.remove(t)
            self.now = max(self.now, t.at)
            self.feed(Completed(t.op, None))
        self.now = end

    def durable_boot(self, incarnation: str) -> BootState:
        """What a restart after a power loss finds: the durable bytes of every file."""
        disk = self.daemon.disk
        return BootState(mgmt=disk.mgmt, bitmaps={k: bytes(f.durable) for k, f in disk.bitmaps.items()},
                         clean=False, power_lost=True, incarnation=incarnation)

    def volume_file(self, volume: str) -> bytes:
        return bytes(self.daemon.disk.volumes[volume].current)
