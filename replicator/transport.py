"""ZeroMQ plumbing: a request/reply server with a worker pool, and a client.

Server: ROUTER on the public endpoint, a steerable proxy to an inproc DEALER and
``workers`` threads with REP sockets, so one slow handler never blocks the rest.
Client: a DEALER with a per-request timeout; on timeout the socket is thrown away
(a late reply can never be mistaken for the next one) and NodeUnreachable raised.
Handlers never see sockets: Message in, Message out (see wire.py).
"""
from __future__ import annotations

import itertools
import logging
import threading
from typing import TYPE_CHECKING, Callable

import zmq

from . import wire
from .errors import NodeUnreachable, ProtocolError, RcopyError

if TYPE_CHECKING:
    from .keys import CurveKeys

log = logging.getLogger(__name__)
Handler = Callable[[wire.Message], wire.Message]
_ids = itertools.count()


def context() -> zmq.Context:
    """The process's ZeroMQ context (created lazily, after nbdkit has forked)."""
    return zmq.Context.instance()


class Server:
    """Serve ``handler`` on ``endpoint`` with a pool of worker threads."""

    def __init__(self, endpoint: str, handler: Handler, workers: int = 6,
                 keys: "CurveKeys | None" = None) -> None:
        self.endpoint = endpoint
        self.handler = handler
        self.workers = workers
        self.keys = keys
        self._auth = None
        self._backend = f"inproc://rcopy-workers-{next(_ids)}"
        self._control = f"inproc://rcopy-control-{next(_ids)}"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        """Bind and start serving; raise if the endpoint cannot be bound."""
        if self.keys is not None:
            from zmq.auth.thread import ThreadAuthenticator
            self._auth = ThreadAuthenticator(context())
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(self.keys.authorized))
        t = threading.Thread(target=self._proxy, name="rcopy-proxy", daemon=True)
        t.start()
        self._threads.append(t)
        self._ready.wait(10)
        if self._error:
            raise self._error
        for i in range(self.workers):
            w = threading.Thread(target=self._worker, name=f"rcopy-worker-{i}", daemon=True)
            w.start()
            self._threads.append(w)

    def stop(self) -> None:
        self._stop.set()
        try:
            ctl = context().socket(zmq.PAIR)
            ctl.linger = 0
            ctl.connect(self._control)
            ctl.send(b"TERMINATE")
            ctl.close()
        except zmq.ZMQError:
            pass
        for t in self._threads:
            t.join(timeout=2)
        if self._auth is not None:
            self._auth.stop()

    def _proxy(self) -> None:
        ctx = context()
        front = ctx.socket(zmq.ROUTER)
        front.linger = 0
        front.setsockopt(zmq.MAXMSGSIZE, wire.MESSAGE_BYTES_MAX)
        if self.keys is not None:
            front.curve_server = True
            front.curve_publickey, front.curve_secretkey = self.keys.server_public, self.keys.server_secret
        back = ctx.socket(zmq.DEALER)
        back.linger = 0
        ctl = ctx.socket(zmq.PAIR)
        ctl.linger = 0
        try:
            front.bind(self.endpoint)
            back.bind(self._backend)
            ctl.bind(self._control)
        except zmq.ZMQError as exc:
            self._error = NodeUnreachable(f"cannot bind {self.endpoint}: {exc}")
            self._ready.set()
            for s in (front, back, ctl):
                s.close()
            return
        self._ready.set()
        try:
            zmq.proxy_steerable(front, back, None, ctl)
        except zmq.ZMQError:
            pass
        finally:
            for s in (front, back, ctl):
                s.close()

    def _worker(self) -> None:
        sock = context().socket(zmq.REP)
        sock.linger = 0
        sock.connect(self._backend)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(200):
                    continue
                frames = sock.recv_multipart(copy=False)
                sock.send_multipart(wire.encode(self._handle(frames)), copy=False)
        except zmq.ZMQError:
            pass
        finally:
            sock.close()

    def _handle(self, frames: list) -> wire.Message:
        kind = "?"
        try:
            msg = wire.decode([f.buffer for f in frames])
            kind = msg.kind
            return self.handler(msg)
        except RcopyError as exc:
            return wire.error_reply(exc)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            # a field of the wrong type or shape: the sender's fault, not ours
            return wire.error_reply(ProtocolError(f"malformed {kind} message: {exc}"))
        except Exception as exc:  # every failure becomes a reply; the server keeps serving
            log.exception("handler for %s failed", kind)
            return wire.error_reply(exc)


class Client:
    """Send requests to one endpoint; not thread-safe (use one per thread)."""

    def __init__(self, endpoint: str, timeout_s: float = 10.0,
                 curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._curve = curve  # (server_public, client_public, client_secret)
        self._sock: zmq.Socket | None = None

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
        sock.send_multipart([b"", *wire.encode(msg)], copy=False)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if not sock.poll(int(timeout * 1000)):
            self.close()
            raise NodeUnreachable(f"no answer from {self.endpoint} within {timeout:g} s")
        frames = sock.recv_multipart()
        if not frames or frames[0] != b"":
            self.close()
            raise ProtocolError("malformed reply envelope")
        return wire.raise_if_error(wire.decode(frames[1:]))

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
