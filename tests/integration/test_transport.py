"""The ZeroMQ transport between nodes, on real sockets over loopback with CURVE: a request made
by a reply's callback on the client's own thread, and a reply made on the server's own thread,
go out without waking either thread (no wake-up message to itself), and none waits for the
poll's timeout."""
from __future__ import annotations

import threading
import time

import pytest

from replicator import keys, wire
from replicator.transport import AsyncClient, Server

CHAIN = 50
POLL_TIMEOUT_S = 0.5         # what a request left for the next poll would wait each time


@pytest.mark.timeout(60)
def test_requests_chained_from_callbacks_and_replies_from_the_server_thread_go_out_at_once(tmp_path):
    k = keys.load(keys.generate(tmp_path / "keys"))
    endpoint = "tcp://127.0.0.1:47719"
    server: Server | None = None

    def submit(req, msg):          # on the server's thread: the reply is made right there
        assert server is not None
        server.reply(req, wire.ok(n=msg["n"] + 1))

    server = Server(endpoint, submit, keys=k)
    server.start()
    client = AsyncClient(k)
    client.start()
    done, got = threading.Event(), []

    def on_reply(result):          # on the client's thread: the next request is made right there
        got.append(wire.raise_if_error(result)["n"])
        if len(got) < CHAIN:
            client.request(endpoint, wire.Message("ping", {"n": got[-1]}), 10, on_reply)
        else:
            done.set()
    try:
        start = time.monotonic()
        client.request(endpoint, wire.Message("ping", {"n": 0}), 10, on_reply)
        assert done.wait(CHAIN * POLL_TIMEOUT_S / 2), f"only {len(got)} of {CHAIN} replies"
        assert got == list(range(1, CHAIN + 1))
        assert time.monotonic() - start < CHAIN * POLL_TIMEOUT_S / 2
    finally:
        client.stop()
        server.stop()
