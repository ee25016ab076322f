"""The driver of a sans-IO core: threads, real files and ZeroMQ around ``core.handle``.

The core is not thread-safe; every call into it holds ``lock``. The only I/O under
the lock is a small write to the page cache (a volume write, a journal append or a
bitmap put of at most IMMEDIATE_BYTES_MAX), carried out at once inside the core's
step (``Runtime.immediate``), so a host write on an nbdkit thread journals, writes
and is acknowledged in one call into the core. Other storage effects are carried
out by the thread that fed the event, then their results fed back, until a host's
request is answered; what remains goes to a small pool of worker threads. Requests
to other nodes go to one asynchronous client; its replies and the server's incoming
requests are fed from those ZeroMQ threads (their storage I/O again goes to the
workers); timers are fed by the workers.
"""
from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from _thread import allocate_lock as _allocate_lock
from typing import Any, Callable

from .core import effects as E
from .core.node import Completed, Incoming
from .core.runtime import DECLINED
from . import threads
from .errors import RcopyError
from .transport import AsyncClient, Server

log = logging.getLogger("rcopy.driver")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "bug": logging.ERROR}
HOST_WAIT_S = 900.0          # the core answers every host request long before this
GATE_DRAIN_S = 60.0         # a write past a plain gate that takes longer has a sick disk
IMMEDIATE_BYTES_MAX = 256 * 1024   # larger writes go out of the lock (copying them takes a while)


class HostRequest:
    """A host request waiting for the core's HostDone.

    Most requests are answered while the thread that fed them still runs the core's effects,
    so the latch (a plain lock, cheaper than an Event) is only waited on when it is not."""

    __slots__ = ("_latch", "answered", "data", "error")

    def __init__(self) -> None:
        self._latch = _allocate_lock()
        self._latch.acquire()
        self.answered = False
        self.data: bytes | None = None
        self.error: BaseException | None = None

    def done(self, data: bytes | None, error: BaseException | None) -> None:
        self.data, self.error = data, error
        self.answered = True
        self._latch.release()

    def wait(self) -> bytes | None:
        if not self.answered and not self._latch.acquire(timeout=HOST_WAIT_S):
            raise RcopyError(f"request not answered within {HOST_WAIT_S:g} s")
        if self.error is not None:
            raise self.error
        return self.data


class _Carry:
    """A job for a worker: an effect to carry out (then its result is fed back)."""

    __slots__ = ("effect",)

    def __init__(self, effect: Any) -> None:
        self.effect = effect


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
        self.ticks: list[Callable[[], None]] = []     # run under the lock about once a second
        if storage is not None and hasattr(core, "rt"):
            core.rt.immediate = self._immediate

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """The client, the worker pool and the timer thread."""
        self.client.start()
        for i in range(self._workers):
            self._spawn(self._worker, f"worker-{i}")
        self._spawn(self._timer_loop, "timers")

    def serve(self, control: str) -> None:
        """Take requests on ``control`` from now on."""
        self.server = Server(control, lambda req, msg: self.feed_light(Incoming(req, msg)), keys=self.keys)
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
    def feed(self, event: Any, req: HostRequest | None = None) -> None:
        """Hand ``event`` to the core and carry out everything that follows from it. A host's
        thread (``req``) stops once its request is answered: what other tasks still want done
        (a journal sync before a push, say) goes to the workers, off the host's path."""
        todo = [event]
        while todo:
            ev = todo.pop()
            with self.lock:
                effects = self.core.handle(ev, time.monotonic())
            if req is not None and len(effects) > 1:
                # the host's answer first: another task's fsync in the same step is not its to wait for
                effects.sort(key=lambda e: type(e) is not E.HostDone)
            for i, eff in enumerate(effects):
                if req is not None and req.answered:
                    for rest in effects[i:]:
                        self._hand_off(rest)
                    for done in todo:
                        self.jobs.put(done)
                    return
                done = self._carry_out(eff)
                if done is not None:
                    todo.append(done)

    def feed_light(self, event: Any) -> None:
        """Feed ``event`` from an I/O thread (a reply from the client, a request at the server):
        the core's step and its messages, timers and host answers run here, storage I/O that is
        not immediate goes to a worker. One thread hand-off fewer for a reply that completes a
        host write or a request answered from memory (a journal push)."""
        with self.lock:
            effects = self.core.handle(event, time.monotonic())
        for eff in effects:
            self._hand_off(eff)

    def direct_write(self, req: HostRequest, volume: str, offset: int, data: Any,
                     write: Callable[[Any], None]) -> bool:
        """A host write the core admits without a task (NodeCore.direct_write; an async one is
        journaled in that call, under the lock): ``write`` puts the bytes it gives outside the
        lock, then the core is told. False: feed the write as HostIo. When the journal append
        failed, a task finishes the write and answers ``req``: wait for it; so for a sync write,
        once written: its batch's sender answers when the secondary holds it."""
        with self.lock:
            w = self.core.direct_write(req, volume, offset, data, time.monotonic(), self._store)
        if w is None:
            return False
        for eff in w.effects:
            self._hand_off(eff)
        if w.as_task:
            req.wait()
            return True
        ok = False
        try:
            write(w.data)
            ok = True
        finally:
            with self.lock:
                effects = self.core.direct_written(w, time.monotonic(), ok)
            for eff in effects:
                self._hand_off(eff)
        if w.waits:
            req.wait()
        return True

    def _hand_off(self, eff: Any) -> None:
        """Carry out a message, timer or log now; leave storage I/O to a worker."""
        if isinstance(eff, (E.Call, E.SetTimer, E.Reply, E.HostDone, E.Log)):
            self._carry_out(eff)
        else:
            self.jobs.put(_Carry(eff))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (a read of the core's state) under the lock."""
        with self.lock:
            self.core.rt.now = time.monotonic()
            return fn()

    def _immediate(self, eff: Any) -> Any:
        """Carry out a small write to the page cache at once, under the lock (runtime.immediate)."""
        kind = type(eff)
        if kind is E.VolWrite:
            if len(eff.data) > IMMEDIATE_BYTES_MAX:
                return DECLINED
        elif kind is E.JournalAppend:
            if sum(len(e.data) for e in eff.entries) > IMMEDIATE_BYTES_MAX:
                return DECLINED
        elif kind is not E.BitmapPut:
            return DECLINED
        return self._store(eff)

    def _store(self, eff: Any) -> Any:
        """A storage effect's result, or the error the task gets."""
        try:
            return self.storage(eff)
        except RcopyError as exc:
            log.error("%s failed: %s", type(eff).__name__, exc)
            return exc
        except Exception as exc:  # noqa: BLE001 - an I/O failure is the task's error, not the node's
            log.exception("%s failed", type(eff).__name__)
            return RcopyError(f"{type(eff).__name__} failed: {exc}")

    def _carry_out(self, eff: Any) -> Completed | None:
        if isinstance(eff, E.Call):
            self.client.request(eff.endpoint, eff.msg, eff.timeout_s,
                                lambda result, op=eff.op: self.feed_light(Completed(op, result)))
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
        elif type(eff) is E.GateDrain:
            return Completed(eff.op, _drained(eff))
        else:
            return Completed(eff.op, self._store(eff) if self.storage is not None else None)
        return None

    def _worker(self) -> None:
        while not self._stop.is_set():
            job = self.jobs.get()
            if job is None:
                return
            try:
                if type(job) is _Carry:
                    job = self._carry_out(job.effect)
                    if job is None:
                        continue
                self.feed(job)
            except Exception:  # noqa: BLE001 - a worker never dies
                log.exception("event %s failed", type(job).__name__)

    def _timer_loop(self) -> None:
        next_tick = time.monotonic() + 1.0
        with self._timer_cond:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + 1.0
                    for tick in self.ticks:
                        with self.lock:
                            tick()
                while self._timers and self._timers[0][0] <= now:
                    _, op = heapq.heappop(self._timers)
                    self.jobs.put(Completed(op, None))
                wait = self._timers[0][0] - now if self._timers else 1.0
                self._timer_cond.wait(max(0.0, min(wait, 1.0)))


def _drained(eff: Any) -> RcopyError | None:
    """Wait until no write is past ``eff.gate`` (a write past it is one pwrite: microseconds)."""
    deadline = time.monotonic() + GATE_DRAIN_S
    while eff.gate.active:
        if time.monotonic() > deadline:
            return RcopyError(f"{eff.volume}: writes still in flight after {GATE_DRAIN_S:g} s")
        time.sleep(0.0002)
    return None
