"""Virtual volumes (SPEC 1.4, the virtualizing network device 3): stable NBD exports for
hosts that forward every request to the real volume they currently map to.

A path switch (S704, option 2) holds new requests, lets in-flight ones finish,
remaps, then releases the held requests to the new target: the host never sees
an error, only a short delay, which is measured and reported.
"""
from __future__ import annotations

import errno
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from . import wire
from .core import vvol as core_vvol
from .errors import NotFound, RcopyError, StateError, UsageError
from .files import atomic_write

log = logging.getLogger("rcopy.vvol")
T = TypeVar("T")
RETRY_S = 10.0            # a lost connection to the target is retried this long before EIO
HOLD_TIMEOUT_S = 30.0     # a switch waits this long for in-flight requests to drain
CONNECTION_ERRNOS = {errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.ESHUTDOWN,
                     errno.ECONNREFUSED, errno.ENOENT, errno.ECONNABORTED}


class TargetError(RcopyError):
    """The target answered a request with an NBD error; carries its errno."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.errno = code


class Gate:
    """Admission control for one virtual volume: the path switch rule (core/vvol.py) with threads."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.state = core_vvol.Gate()

    @property
    def inflight(self) -> int:
        return self.state.inflight

    @property
    def holding(self) -> bool:
        return self.state.holding

    def enter(self) -> float:
        """Admit a request (waiting while a switch holds the gate); return seconds it was held."""
        with self._cond:
            start = time.monotonic()
            self._cond.wait_for(self.state.may_enter)
            self.state.inflight += 1
            return time.monotonic() - start

    def exit(self) -> None:
        with self._cond:
            self.state.inflight -= 1
            self._cond.notify_all()

    def hold(self, timeout_s: float) -> bool:
        """Stop admitting and wait until nothing is in flight; False (and released) on timeout."""
        with self._cond:
            self.state.holding = True
            if self._cond.wait_for(self.state.drained, timeout_s):
                return True
            self.state.holding = False
            self._cond.notify_all()
            return False

    def release(self) -> None:
        with self._cond:
            self.state.holding = False
            self._cond.notify_all()


@dataclass
class VirtualVolume:
    name: str
    target: str
    target_uri: str
    size: int
    generation: int = 0
    gate: Gate = field(default_factory=Gate)
    requests: int = 0
    held_ms_max: float = 0.0
    idle: list[Any] = field(default_factory=list)    # connections to the target not in use now

    def record(self) -> dict[str, Any]:
        return {"target": self.target, "target_uri": self.target_uri, "size": self.size}


def _is_dead(h: Any) -> bool:
    """Did the connection under a libnbd handle die (as opposed to one request failing)?"""
    try:
        return bool(h.aio_is_dead() or h.aio_is_closed())
    except Exception:
        return True


def block_status(h: Any, count: int, offset: int) -> list[tuple[int, int, bool]]:
    """libnbd block status ("base:allocation") as (offset, length, hole) runs from ``offset``."""
    import nbd
    if not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        return [(offset, count, False)]
    out: list[tuple[int, int, bool]] = []
    zeros = nbd.STATE_HOLE | nbd.STATE_ZERO          # a hole that reads as zeros; anything else is data

    def got(context: str, start: int, entries: list[int], err: Any) -> int:
        if context == nbd.CONTEXT_BASE_ALLOCATION:
            for length, flags in zip(entries[::2], entries[1::2]):
                out.append((start, length, (flags & zeros) == zeros))
                start += length
        return 0
    h.block_status(count, offset, got)
    return out or [(offset, count, False)]


def connect(uri: str) -> Any:
    import nbd
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)   # block status is forwarded
    h.connect_uri(uri)
    return h


class VirtualVolumes:
    """The engine of a virtual-volume server: mapping, forwarding, path switch, control."""

    def __init__(self, state_dir: Path, connector: Callable[[str], Any] = connect) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / "vvols.json"
        self.connect = connector
        self.lock = threading.Lock()
        self.vvols: dict[str, VirtualVolume] = {}
        # Connections to targets are pooled per virtual volume: as many as requests were ever in
        # flight at once, not one per nbdkit thread (each costs the node nbdkit's threads).
        self._pool_lock = threading.Lock()
        if self.path.exists():
            for name, rec in json.loads(self.path.read_text()).items():
                self.vvols[name] = VirtualVolume(name, rec["target"], rec["target_uri"], rec["size"])
        self.handlers = {"ping": self._h_ping, "vvol.create": self._h_create, "vvol.delete": self._h_delete,
                         "vvol.switch": self._h_switch, "vvol.list": self._h_list}

    def _save(self) -> None:
        atomic_write(self.path, json.dumps({n: v.record() for n, v in self.vvols.items()}, indent=1).encode())

    def get(self, name: str) -> VirtualVolume:
        try:
            return self.vvols[name]
        except KeyError:
            raise NotFound(f"no virtual volume {name!r}") from None

    # ------------------------------------------------------------------ forwarding
    def _take(self, vv: VirtualVolume) -> tuple[int, Any]:
        """An idle connection to the current target, or a new one; with the generation it is for."""
        with self._pool_lock:
            gen, uri = vv.generation, vv.target_uri
            if vv.idle:
                return gen, vv.idle.pop()
        return gen, self.connect(uri)

    def _give(self, vv: VirtualVolume, gen: int, h: Any) -> None:
        """Back to the pool; a connection to a target switched away from meanwhile is closed."""
        with self._pool_lock:
            if gen == vv.generation and vv.name in self.vvols:
                vv.idle.append(h)
                return
        self._close(h)

    def _close_idle(self, vv: VirtualVolume) -> None:
        with self._pool_lock:
            idle, vv.idle = vv.idle, []
        for h in idle:
            self._close(h)

    @staticmethod
    def _close(h: Any) -> None:
        try:
            h.shutdown()
        except Exception:
            pass

    def forward(self, vv: VirtualVolume, op: Callable[[Any], T]) -> T:
        """Run ``op(handle)`` against the current target, behind the gate, retrying lost connections."""
        held = vv.gate.enter()
        try:
            vv.requests += 1
            if held:
                vv.held_ms_max = max(vv.held_ms_max, held * 1000)
            deadline = time.monotonic() + RETRY_S
            while True:
                gen, h = vv.generation, None
                try:
                    gen, h = self._take(vv)
                    result = op(h)
                except Exception as exc:
                    code = getattr(exc, "errno", None)
                    dead = h is None or code in CONNECTION_ERRNOS or code is None or _is_dead(h)
                    if not dead:
                        self._give(vv, gen, h)
                        raise TargetError(f"{vv.target}: {exc}", code or errno.EIO) from None
                    if h is not None:
                        self._close(h)
                    self._close_idle(vv)           # the others to that target are likely dead too
                    log.info("%s: connection to %s lost (%s); retrying", vv.name, vv.target, exc)
                    if time.monotonic() > deadline:
                        raise TargetError(f"{vv.target} unreachable for {RETRY_S:g} s: {exc}", errno.EIO) from None
                    time.sleep(0.1)
                else:
                    self._give(vv, gen, h)
                    return result
        finally:
            vv.gate.exit()

    def pread(self, vv: VirtualVolume, count: int, offset: int) -> bytes:
        return self.forward(vv, lambda h: h.pread(count, offset))

    def pwrite(self, vv: VirtualVolume, buf: Any, offset: int, fua: bool) -> None:
        import nbd
        data = bytes(buf)
        flags = nbd.CMD_FLAG_FUA if fua else 0
        self.forward(vv, lambda h: h.pwrite(data, offset, flags))

    def flush(self, vv: VirtualVolume) -> None:
        self.forward(vv, lambda h: h.flush())

    def trim(self, vv: VirtualVolume, count: int, offset: int) -> None:
        self.forward(vv, lambda h: h.trim(count, offset))

    def zero(self, vv: VirtualVolume, count: int, offset: int, fua: bool) -> None:
        import nbd
        flags = nbd.CMD_FLAG_FUA if fua else 0
        self.forward(vv, lambda h: h.zero(count, offset, flags))

    def extents(self, vv: VirtualVolume, count: int, offset: int) -> list[tuple[int, int, bool]]:
        """Block status of the target: (offset, length, hole) runs; all data if it has none."""
        return self.forward(vv, lambda h: block_status(h, count, offset))

    # ------------------------------------------------------------------ control
    def _h_ping(self, msg: wire.Message) -> wire.Message:
        import os
        return wire.ok(role="vvol_server", pid=os.getpid())

    def _probe(self, uri: str, what: str) -> int:
        try:
            h = self.connect(uri)
        except Exception as exc:
            raise StateError(f"cannot reach {what} ({uri}): {exc}") from None
        try:
            return int(h.get_size())
        finally:
            self._close(h)

    def _h_create(self, msg: wire.Message) -> wire.Message:
        name, target, uri = msg["name"], msg["target"], msg["target_uri"]
        if not isinstance(name, str) or not name or "/" in name:
            raise UsageError(f"invalid virtual volume name {name!r}")
        with self.lock:
            if name in self.vvols:
                raise StateError(f"virtual volume {name!r} already exists (-> {self.vvols[name].target})")
            size = self._probe(uri, target)
            self.vvols[name] = VirtualVolume(name, target, uri, size)
            self._save()
        return wire.ok(name=name, target=target, size=size)

    def _h_delete(self, msg: wire.Message) -> wire.Message:
        with self.lock:
            vv = self.get(msg["name"])
            if vv.gate.inflight:
                raise StateError(f"virtual volume {vv.name} has I/O in flight")
            del self.vvols[vv.name]
            self._save()
        self._close_idle(vv)
        return wire.ok()

    def switch(self, name: str, target: str, uri: str) -> dict[str, Any]:
        """S704: hold new requests, drain in-flight ones, remap, release."""
        vv = self.get(name)
        size = self._probe(uri, target)
        if size != vv.size:
            raise StateError(f"{target} has {size} bytes but {name} presents {vv.size}; refusing the switch")
        t0 = time.monotonic()
        if not vv.gate.hold(HOLD_TIMEOUT_S):
            raise StateError(f"{name}: requests still in flight after {HOLD_TIMEOUT_S:g} s; switch cancelled")
        drained = time.monotonic()
        try:
            with self.lock, self._pool_lock:
                vv.target, vv.target_uri = target, uri
                vv.generation += 1
                self._save()
            self._close_idle(vv)        # nothing is in flight: every connection to the old target
        finally:
            vv.gate.release()
        held_ms = (time.monotonic() - t0) * 1000
        vv.held_ms_max = max(vv.held_ms_max, held_ms)
        log.info("switched %s to %s (held %.1f ms)", name, target, held_ms)
        return {"name": name, "target": target, "held_ms": round(held_ms, 2),
                "drain_ms": round((drained - t0) * 1000, 2)}

    def _h_switch(self, msg: wire.Message) -> wire.Message:
        return wire.ok(**self.switch(msg["name"], msg["target"], msg["target_uri"]))

    def _h_list(self, msg: wire.Message) -> wire.Message:
        return wire.ok(vvols=[{"name": v.name, "target": v.target, "target_uri": v.target_uri,
                               "size": v.size, "inflight": v.gate.inflight, "requests": v.requests, "connections_idle": len(v.idle),
                               "held_ms_max": round(v.held_ms_max, 2)} for v in self.vvols.values()])

    def handle(self, msg: wire.Message) -> wire.Message:
        handler = self.handlers.get(msg.kind)
        if handler is None:
            raise UsageError(f"unknown message kind {msg.kind!r}")
        return handler(msg)
