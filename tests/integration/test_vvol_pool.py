"""The virtual volume holds as many connections to its target as requests were in flight at once
(each costs the node nbdkit's threads), not one per server thread, and lets go of the old target's
connections at a path switch (issue 14: no thread per volume)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import nbd
import pytest

from replicator import process

MiB = 1 << 20


def threads(t, node: str) -> int:
    pid = process.read_pid(str(t.cluster.daemon(node).pidfile))
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("Threads:")).split()[1])


def connections(t) -> int:
    return next(v for v in t.vvols() if v["name"] == "app")["connections_idle"]


@pytest.mark.timeout(120)
def test_a_virtual_volume_keeps_one_connection_per_request_in_flight(started):
    t = started
    t.volume_create("site-a1:v1", 8 * MiB)
    t.volume_create("site-a2:v2", 8 * MiB)
    base = threads(t, "site-a1")
    t.vvol_create("app", "site-a1:v1")
    host = nbd.NBD()
    host.connect_uri(t.cluster.vvol_server().nbd_uri("app"))
    try:
        for i in range(300):                         # one request at a time: one connection
            host.pwrite(bytes([i % 256]) * 4096, (i % 64) * 4096)
        assert connections(t) == 1

        def writer(k: int) -> None:
            h = nbd.NBD()
            h.connect_uri(t.cluster.vvol_server().nbd_uri("app"))
            for i in range(100):
                h.pwrite(bytes([k]) * 4096, (k * 100 + i) * 4096)
            h.shutdown()
        ws = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for w in ws:
            w.start()
        for w in ws:
            w.join(60)
        assert 1 <= connections(t) <= 5                 # at most one per request in flight
        t.vvol_switch("app", "site-a2:v2")
        assert connections(t) == 0                      # the old target's connections are closed
        deadline = time.monotonic() + 10
        while threads(t, "site-a1") > base and time.monotonic() < deadline:
            time.sleep(0.1)
        assert threads(t, "site-a1") == base            # and their threads at the node are gone
        host.pwrite(b"x" * 4096, 0)
        assert connections(t) == 1
    finally:
        host.shutdown()


@pytest.mark.timeout(120)
def test_pairs_and_groups_add_no_thread_to_a_node(started):
    """Eight async groups and four sync pairs: the nodes run as many threads as with none."""
    t = started
    base = {n: threads(t, n) for n in ("site-a1", "site-b")}
    for i in range(12):
        t.volume_create(f"site-a1:p{i}", 4 * MiB)
        t.volume_create(f"site-b:s{i}", 4 * MiB)
        t.pair_create(f"site-a1:p{i}", f"site-b:s{i}", mode="async" if i < 8 else "sync")
    for i in range(12):
        t.wait_duplex(f"site-a1:p{i}", 60)
    assert {n: threads(t, n) for n in base} == base
