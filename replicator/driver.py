"""The driver of a sans-IO core: threads, real files and ZeroMQ around ``core.handle``.

The core is not thread-safe; every call into it holds ``lock`` and lasts only as
long as the rules take (no I/O under the lock). Whoever feeds an event runs what
follows to completion: storage effects are carried out in the calling thread,
then their results are fed back, and so on. So a host write on an nbdkit thread
journals, writes and acknowledges without changing threads. Requests to other
nodes go to one asynchronous client; their replies, timers and incoming
requests are fed by a small pool of worker threads.
"""
from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from typing import Any, Callable

from .core import effects as E
from .core.node import Completed, Incoming
from . import threads
from .errors import RcopyError
from .transport import AsyncClient, Server

log = logging.getLogger("rcopy.driver")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "bug": logging.ERROR}
HOST_WAIT_S = 900.0          # the core answers every host request long before this


class HostRequest:
    """A host request waiting for the core's HostDone."""

    __slots__ = ("_event", "data", "error")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None

    def done(self, data: bytes | None, error: BaseException | None) -> None:
        self.data, self.error = data, error
        self._event.set()

    def wait(self) -> bytes | None:
        if not self._event.wait(HOST_WAIT_S):
            raise RcopyError(f"request not answered within {HOST_WAIT_S:g} s")
        if self.error is not None:
            raise self.error
        return self.data


class Driver:
    """Runs one core (a storage node's or a vvol server's)."""

    def __init__(self, core: Any, storage: Callable[[Any], Any] | None, keys: Any = None,
                 workers: int = 4, name: str = "rcopy") -> None:
        self.core, self.storage, self.keys, self.name = core, storage, keys, name
        self.lock = threading.Lock()
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.client = AsyncClient(keys)
        self.server: Server | None = None
        self._timers: list[tuple[float, int]] = []
        self._timer_cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._workers = workers
        self._stop = threading.Event()

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """The client, the worker pool and the timer thread."""
        self.client.start()
        for i in range(self._workers):
            self._spawn(self._worker, f"worker-{i}")
        self._spawn(self._timer_loop, "timers")

    def serve(self, control: str) -> None:
        """Take requests on ``control`` from now on."""
        self.server = Server(control, lambda req, msg: self.jobs.put(Incoming(req, msg)), keys=self.keys)
        self.server.start()

    def stop(self) -> None:
        self._stop.set()
        for _ in self._threads:
            self.jobs.put(None)
        with self._timer_cond:
            self._timer_cond.notify_all()
        if self.server is not None:
            self.server.stop()
        self.client.stop()
        for t in self._threads:
            t.join(timeout=3)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        self._threads.append(threads.start(target, name))

    # ------------------------------------------------------------------ events
    def feed(self, event: Any) -> None:
        """Hand ``event`` to the core and carry out everything that follows from it."""
        todo = [event]
        while todo:
            ev = todo.pop()
            with self.lock:
                effects = self.core.handle(ev, time.monotonic())
            for eff in reversed(effects):
                done = self._carry_out(eff)
                if done is not None:
                    todo.append(done)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (a read of the core's state) under the lock."""
        with self.lock:
            self.core.rt.now = time.monotonic()
            return fn()

    def _carry_out(self, eff: Any) -> Completed | None:
        if isinstance(eff, E.Call):
            self.client.request(eff.endpoint, eff.msg, eff.timeout_s,
                                lambda result, op=eff.op: self.jobs.put(Completed(op, result)))
        elif isinstance(eff, E.SetTimer):
            with self._timer_cond:
                heapq.heappush(self._timers, (eff.at, eff.op))
                self._timer_cond.notify()
        elif isinstance(eff, E.Reply):
            if self.server is not None:
                self.server.reply(eff.req, eff.msg)
        elif isinstance(eff, E.HostDone):
            eff.req.done(eff.data, eff.error)
        elif isinstance(eff, E.Log):
            log.log(LEVELS.get(eff.level, logging.INFO), "%s", eff.text)
        else:
            try:
                result = self.storage(eff) if self.storage is not None else None
            except RcopyError as exc:
                log.error("%s failed: %s", type(eff).__name__, exc)
                result = exc
            except Exception as exc:  # noqa: BLE001 - an I/O failure is the task's error, not the node's
                log.exception("%s failed", type(eff).__name__)
                result = RcopyError(f"{type(eff).__name__} failed: {exc}")
            return Completed(eff.op, result)
        return None

    def _worker(self) -> None:
        while not self._stop.is_set():
            job = self.jobs.get()
            if job is None:
                return
            try:
                self.feed(job)
            except Exception:  # noqa: BLE001 - a worker never dies
                log.exception("event %s failed", type(job).__name__)

    def _timer_loop(self) -> None:
        with self._timer_cond:
            while not self._stop.is_set():
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, op = heapq.heappop(self._timers)
                    self.jobs.put(Completed(op, None))
                wait = self._timers[0][0] - now if self._timers else 1.0
                self._timer_cond.wait(max(0.0, min(wait, 1.0)))
