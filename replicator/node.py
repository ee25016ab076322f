"""A storage node process: the core (replicator/core) driven by real files, nbdkit and ZeroMQ.

One Node lives inside each nbdkit process; nbd_plugins/storage_node.py forwards
every NBD callback here. No replication or migration rule is in this module:
it loads the state directory (storage.py), feeds the core its events and carries
out the core's effects (driver.py).
"""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

from .core.config import Config
from .core.effects import VolRead
from .core.node import Boot, HostIo, NodeCore
from .driver import Driver, HostRequest
from .errors import NotFound
from .keys import load as load_keys
from .storage import NodeStorage

log = logging.getLogger("rcopy.node")


class Node:
    """One storage system (SPEC 1.2): its core, its files, its control server."""

    def __init__(self, name: str, state_dir: Path | str, control: str, keys_dir: str | None = None,
                 metrics: str | None = None, cfg: Config | None = None) -> None:
        self.name, self.control = name, control
        self.state_dir = Path(state_dir)
        self.cfg = cfg or Config()
        self.core = NodeCore(name, control, self.cfg)
        self.storage = NodeStorage(self.state_dir, self.cfg.region_bytes)
        self.keys = load_keys(Path(keys_dir)) if keys_dir else None
        self.driver = Driver(self.core, self.storage.run, self.keys, name=name)
        self.metrics_address = metrics
        self._metrics_server: Any = None
        self.incarnation = uuid.uuid4().hex[:12]
        self._boot = self.storage.load(self.incarnation)

    def start(self) -> None:
        """Start the threads and the control server, then boot the core (call after nbdkit forked)."""
        self.core.pid = os.getpid()
        self.driver.ticks.append(self.core.fold_gates)
        self.driver.start()
        self.driver.feed(Boot(self._boot))      # the boot only does local I/O: done when this returns
        if self.metrics_address:
            from .metrics import serve
            self._metrics_server = serve(self, self.metrics_address)
        # Control requests last: a node that answers ping has booted (requests sent before wait in
        # their ZeroMQ queues; nothing is lost).
        self.driver.serve(self.control)
        log.info("node %s started (control %s, incarnation %s)", self.name, self.control, self.incarnation)

    def stop(self) -> None:
        idle = self.driver.call(lambda: all(v.inflight == 0 and not v.gate.active and not v.gate.reading
                                            for v in self.core.volumes.values()))
        self.driver.stop()
        self.storage.stop(clean=idle and self.core.ready)

    # ------------------------------------------------------------------ NBD callbacks
    def _host(self, op: str, volume: str, offset: int = 0, length: int = 0, data: Any = None,
              fua: bool = False, req: HostRequest | None = None) -> Any:
        req = req or HostRequest()
        self.driver.feed(HostIo(req, op, volume, offset, length, data, fua), req)
        return req.wait()

    def read(self, volume: str, offset: int, length: int) -> bytes:
        """A volume whose gate lets reads pass (core/plain_gate.py: plain, or a primary in rw_mode
        NORMAL) is read at once, without the core (as ``write``); others through the core."""
        vol = self.core.volumes.get(volume)
        if vol is not None:
            reading = vol.gate.reading
            reading.append(None)
            if vol.gate.reads and 0 <= offset and offset + length <= vol.info.size:
                try:
                    return self.storage.run(VolRead(volume, offset, length))
                finally:
                    reading.pop()
            reading.pop()
        data = self._host("read", volume, offset, length)
        assert data is not None
        return data

    def write(self, volume: str, data: Any, offset: int, fua: bool = False) -> None:
        """A volume in no pair and no migration whose gate is open (core/plain_gate.py) is written
        at once, without the driver's lock. The common case of the others (a volume without a pair
        whose gate is closed, a duplex async or a sync primary; core/direct.py) is admitted (and
        journaled) in one call and written from nbdkit's buffer (a volume without a pair: without
        a copy); a sync write then waits for its batch's answer. Anything else goes through the
        core's task."""
        if not fua:
            # The plain gate's enter and leave, inlined: this is every write of a plain volume, and
            # each call here costs its share of the GIL that eight nbdkit threads share.
            vol = self.core.volumes.get(volume)     # one dict read: atomic, no lock needed
            if vol is not None:
                gate = vol.gate
                active = gate.active
                active.append(None)
                n = len(data)
                if gate.open and 0 <= offset and offset + n <= vol.info.size:   # else the core says why
                    try:
                        self.storage.write_volume(volume, offset, data, keep_gil=False)   # no lock held
                        gate.done.append(n)
                    finally:
                        gate.dirty = True
                        active.pop()
                    return
                active.pop()
        req = HostRequest()         # untouched when the core declines the write without a task
        if not fua and self.driver.direct_write(
                req, volume, offset, data, lambda d: self.storage.write_volume(volume, offset, d)):
            return
        self._host("write", volume, offset, len(data), bytes(data), bool(fua), req)

    def flush(self, volume: str) -> None:
        self._host("flush", volume)

    def trim(self, volume: str, length: int, offset: int, fua: bool = False) -> None:
        self._host("trim", volume, offset, length, fua=fua)

    def zero(self, volume: str, length: int, offset: int, fua: bool = False) -> None:
        self._host("zero", volume, offset, length, fua=fua)

    def extents(self, volume: str, length: int, offset: int) -> list[tuple[int, int, bool]]:
        """NBD block status: (offset, length, hole) from ``offset`` on (possibly fewer bytes)."""
        runs = self._host("extents", volume, offset, length)
        out = []
        for n, hole in runs or [(length, False)]:
            out.append((offset, n, hole))
            offset += n
        return out

    def size(self, volume: str) -> int:
        def get() -> int:
            v = self.core.volumes.get(volume)
            if v is None:
                raise NotFound(f"node {self.name} has no volume {volume!r}")
            return v.info.size
        return self.driver.call(get)

    def export_names(self) -> list[str]:
        return self.driver.call(lambda: sorted(self.core.volumes))

    # ------------------------------------------------------------------ status (metrics, tests)
    def status(self) -> dict[str, Any]:
        return self.driver.call(self.core.status)
