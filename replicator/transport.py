"""ZeroMQ plumbing: a request server whose replies may come later, and two clients.

Every request carries an id frame: ``[b"", id, header, payloads...]`` from a DEALER,
``[identity, b"", id, header, payloads...]`` at the ROUTER. The reply carries the
same id, so a late reply is never mistaken for another one.

* ``Server``: one I/O thread owns the ROUTER socket. Each request is handed to
  ``submit(req, msg)`` (the node's driver queues it); ``reply(req, msg)`` may be
  called from any thread, at any time later.
* ``AsyncClient``: one I/O thread, one DEALER per endpoint, many requests in
  flight; a callback gets the reply or NodeUnreachable after the timeout.
* ``Client``: a blocking client for one thread (the terminal, tests).
Handlers never see sockets: Message in, Message out (see wire.py).
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import zmq

from . import threads, wire
from .errors import NodeUnreachable, ProtocolError, RcopyError

if TYPE_CHECKING:
    from .keys import CurveKeys

log = logging.getLogger(__name__)
_ids = itertools.count()
Submit = Callable[[Any, wire.Message], None]


def context() -> zmq.Context:
    """The process's ZeroMQ context (created lazily, after nbdkit has forked)."""
    return zmq.Context.instance()


class _Wake:
    """Wakes an I/O thread from any thread (a PUSH/PULL pair over inproc)."""

    def __init__(self) -> None:
        self.address = f"inproc://rcopy-wake-{next(_ids)}"
        self.pull = context().socket(zmq.PULL)
        self.pull.linger = 0
        self.pull.bind(self.address)
        self._push = context().socket(zmq.PUSH)
        self._push.linger = 0
        self._push.connect(self.address)
        self._lock = threading.Lock()
        self._pending = False

    def __call__(self) -> None:
        with self._lock:
            if self._pending:
                return
            self._pending = True
            self._push.send(b"", zmq.NOBLOCK)

    def drain(self) -> None:
        """Consume the wake-ups, then re-arm; the caller looks at its queue after this, so work
        queued by a wake-up that found the flag still set is not missed."""
        while self.pull.get(zmq.EVENTS) & zmq.POLLIN:
            self.pull.recv(zmq.NOBLOCK)
        with self._lock:
            self._pending = False

    def close(self) -> None:
        self._push.close(0)
        self.pull.close(0)


class Server:
    """Serve requests on ``endpoint``; replies are sent with ``reply`` whenever they are ready."""

    def __init__(self, endpoint: str, submit: Submit, keys: "CurveKeys | None" = None) -> None:
        self.endpoint, self.submit, self.keys = endpoint, submit, keys
        self._auth = None
        self._out: collections.deque[tuple[Any, list[Any]]] = collections.deque()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._wake: _Wake | None = None
        self._ident = 0                 # the server thread's: its own replies need no wake-up

    def start(self) -> None:
        """Bind and start serving; raise if the endpoint cannot be bound."""
        if self.keys is not None:
            from zmq.auth.thread import ThreadAuthenticator
            self._auth = ThreadAuthenticator(context())
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(self.keys.authorized))
        self._thread = threads.start(self._loop, "rcopy-server")
        self._ready.wait(10)
        if self._error:
            raise self._error

    def stop(self) -> None:
        self._stop.set()
        if self._wake is not None:
            self._wake()
        if self._thread is not None:
            self._thread.join(timeout=3)
        if self._auth is not None:
            self._auth.stop()

    def reply(self, req: Any, msg: wire.Message) -> None:
        try:
            frames = wire.encode(msg)
        except RcopyError as exc:
            frames = wire.encode(wire.error_reply(exc))
        self._out.append((req, frames))
        if self._wake is not None and threading.get_ident() != self._ident:
            self._wake()        # (a reply made on the server thread goes out after its receive loop)

    def _loop(self) -> None:
        self._ident = threading.get_ident()
        sock = context().socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, wire.MESSAGE_BYTES_MAX)
        if self.keys is not None:
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = self.keys.server_public, self.keys.server_secret
        try:
            sock.bind(self.endpoint)
            self._wake = _Wake()
        except zmq.ZMQError as exc:
            self._error = NodeUnreachable(f"cannot bind {self.endpoint}: {exc}")
            sock.close()
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake.pull, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(500))
                if sock in events:
                    # EVENTS, not recv until zmq.Again: an exception per loop costs more than the check
                    for _ in range(64):
                        if not sock.get(zmq.EVENTS) & zmq.POLLIN:
                            break
                        self._receive(sock.recv_multipart(zmq.NOBLOCK, copy=False))
                if self._wake.pull in events:
                    self._wake.drain()
                while self._out:
                    (identity, rid), frames = self._out.popleft()
                    try:
                        sock.send_multipart([identity, b"", rid, *frames], copy=False)
                    except zmq.ZMQError as exc:
                        log.warning("reply to a client that left: %s", exc)
        finally:
            sock.close()
            self._wake.close()

    def _receive(self, frames: list[Any]) -> None:
        if len(frames) < 3 or frames[1].bytes != b"":
            return  # not a DEALER request with an id: nobody to answer
        req = (frames[0].bytes, frames[2].bytes)
        try:
            msg = wire.decode([f.buffer for f in frames[3:]])
        except ProtocolError as exc:
            self.reply(req, wire.error_reply(exc))
            return
        try:
            self.submit(req, msg)
        except Exception as exc:  # noqa: BLE001 - the server keeps serving
            log.exception("submitting %s failed", msg.kind)
            self.reply(req, wire.error_reply(RcopyError(f"internal error: {exc}")))


class AsyncClient:
    """Requests to many endpoints from one I/O thread; ``callback(reply_or_error)`` when done."""

    def __init__(self, keys: "CurveKeys | None" = None) -> None:
        self._curve = keys.client_triple() if keys is not None else None
        self._in: collections.deque[tuple[str, wire.Message, float, Callable[[Any], None]]] = collections.deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake: _Wake | None = None
        self._started = threading.Event()
        self._ident = 0                 # the client thread's: its own requests need no wake-up

    def start(self) -> None:
        self._thread = threads.start(self._loop, "rcopy-client")
        self._started.wait(10)

    def stop(self) -> None:
        self._stop.set()
        if self._wake is not None:
            self._wake()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def request(self, endpoint: str, msg: wire.Message, timeout_s: float, callback: Callable[[Any], None]) -> None:
        self._in.append((endpoint, msg, timeout_s, callback))
        if self._wake is not None and threading.get_ident() != self._ident:
            self._wake()        # (a request made by a reply's callback goes out after the receive loop)

    def _socket(self, endpoint: str, sockets: dict[str, zmq.Socket], poller: zmq.Poller) -> zmq.Socket:
        s = sockets.get(endpoint)
        if s is None:
            s = context().socket(zmq.DEALER)
            s.linger = 0
            s.setsockopt(zmq.SNDHWM, 100000)
            if self._curve:
                s.curve_serverkey, s.curve_publickey, s.curve_secretkey = self._curve
            s.connect(endpoint)
            sockets[endpoint] = s
            poller.register(s, zmq.POLLIN)
        return s

    def _loop(self) -> None:
        self._ident = threading.get_ident()
        self._wake = _Wake()
        self._started.set()
        sockets: dict[str, zmq.Socket] = {}
        poller = zmq.Poller()
        poller.register(self._wake.pull, zmq.POLLIN)
        pending: dict[bytes, tuple[Callable[[Any], None], str]] = {}
        deadlines: list[tuple[float, bytes]] = []
        prefix = os.urandom(4)
        counter = itertools.count()

        def send_queued() -> None:
            while self._in:
                endpoint, msg, timeout_s, callback = self._in.popleft()
                rid = prefix + next(counter).to_bytes(8, "little")
                try:
                    frames = wire.encode(msg)
                    self._socket(endpoint, sockets, poller).send_multipart([b"", rid, *frames],
                                                                           zmq.NOBLOCK, copy=False)
                except (zmq.ZMQError, RcopyError) as exc:
                    _call(callback, exc if isinstance(exc, RcopyError) else
                          NodeUnreachable(f"cannot send to {endpoint}: {exc}"))
                    continue
                pending[rid] = (callback, endpoint)
                heapq.heappush(deadlines, (time.monotonic() + timeout_s, rid))

        try:
            while not self._stop.is_set():
                now = time.monotonic()
                while deadlines and deadlines[0][0] <= now:
                    _, rid = heapq.heappop(deadlines)
                    entry = pending.pop(rid, None)
                    if entry is not None:
                        _call(entry[0], NodeUnreachable(f"no answer from {entry[1]} in time"))
                send_queued()            # what the callbacks of the last replies and deadlines asked
                wait_ms = 500 if not deadlines else max(0, int((deadlines[0][0] - now) * 1000) + 1)
                events = dict(poller.poll(min(wait_ms, 500)))
                if self._wake.pull in events:
                    self._wake.drain()
                send_queued()
                for s in sockets.values():
                    if s not in events:
                        continue
                    for _ in range(64):
                        if not s.get(zmq.EVENTS) & zmq.POLLIN:
                            break
                        frames = s.recv_multipart(zmq.NOBLOCK)
                        if len(frames) < 3 or frames[0] != b"":
                            continue
                        entry = pending.pop(frames[1], None)
                        if entry is None:
                            continue  # a reply that came after its timeout
                        try:
                            _call(entry[0], wire.decode(frames[2:]))
                        except ProtocolError as exc:
                            _call(entry[0], exc)
        finally:
            for s in sockets.values():
                s.close(0)
            self._wake.close()


def _call(callback: Callable[[Any], None], result: Any) -> None:
    try:
        callback(result)
    except Exception:  # noqa: BLE001 - a broken callback must not stop the client
        log.exception("reply callback failed")


class Client:
    """Send requests to one endpoint and wait for each reply; not thread-safe (one per thread)."""

    def __init__(self, endpoint: str, timeout_s: float = 10.0,
                 curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._curve = curve  # (server_public, client_public, client_secret)
        self._sock: zmq.Socket | None = None
        self._next = itertools.count()
        self._prefix = os.urandom(4)

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            s = context().socket(zmq.DEALER)
            s.linger = 0
            if self._curve:
                s.curve_serverkey, s.curve_publickey, s.curve_secretkey = self._curve
            s.connect(self.endpoint)
            self._sock = s
        return self._sock

    def request(self, msg: wire.Message, timeout_s: float | None = None) -> wire.Message:
        """Send ``msg`` and return the (successful) reply; raise on error or timeout."""
        sock = self._socket()
        rid = self._prefix + next(self._next).to_bytes(8, "little")
        sock.send_multipart([b"", rid, *wire.encode(msg)], copy=False)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                self.close()
                raise NodeUnreachable(f"no answer from {self.endpoint} within {timeout:g} s")
            frames = sock.recv_multipart()
            if len(frames) < 3 or frames[0] != b"":
                self.close()
                raise ProtocolError("malformed reply envelope")
            if frames[1] != rid:
                continue  # the late reply to an earlier request that timed out
            return wire.raise_if_error(wire.decode(frames[2:]))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


class ClientPool:
    """One Client per (OS thread, endpoint), for callers on many threads.

    Keyed by ``threading.get_ident()`` rather than ``threading.local``: nbdkit
    calls into Python on its own threads and drops their Python thread state
    after each callback, which would throw thread-locals (and so a connected,
    CURVE-authenticated socket) away on every request.
    """

    def __init__(self, timeout_s: float = 10.0, keys: "CurveKeys | None" = None) -> None:
        self.timeout_s = timeout_s
        self._clients: dict[tuple[int, str], Client] = {}
        self._lock = threading.Lock()
        self._curve = keys.client_triple() if keys is not None else None

    def get(self, endpoint: str) -> Client:
        key = (threading.get_ident(), endpoint)
        c = self._clients.get(key)
        if c is None:
            with self._lock:
                c = self._clients.setdefault(key, Client(endpoint, self.timeout_s, self._curve))
        return c

    def request(self, endpoint: str, msg: wire.Message, timeout_s: float | None = None) -> wire.Message:
        return self.get(endpoint).request(msg, timeout_s)

    def forget_thread(self) -> None:
        """Close the calling thread's sockets (call it before a short-lived thread ends)."""
        me = threading.get_ident()
        with self._lock:
            mine = [k for k in self._clients if k[0] == me]
            for key in mine:
                self._clients.pop(key).close()


class HandlerServer:
    """A Server whose requests a pool of threads answers with ``handler(msg) -> reply``."""

    def __init__(self, endpoint: str, handler: Callable[[wire.Message], wire.Message],
                 keys: "CurveKeys | None" = None, workers: int = 4) -> None:
        import queue
        self.handler = handler
        self._jobs: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.server = Server(endpoint, lambda req, msg: self._jobs.put((req, msg)), keys)
        self._workers = workers
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.server.start()
        self._threads = [threads.start(self._work, f"rcopy-handler-{i}") for i in range(self._workers)]

    def stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        self.server.stop()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            req, msg = job
            try:
                reply = self.handler(msg)
            except RcopyError as exc:
                reply = wire.error_reply(exc)
            except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
                reply = wire.error_reply(ProtocolError(f"malformed {msg.kind} message: {exc}"))
            except Exception as exc:  # noqa: BLE001 - every failure becomes a reply
                log.exception("handler for %s failed", msg.kind)
                reply = wire.error_reply(exc)
            self.server.reply(req, reply)
