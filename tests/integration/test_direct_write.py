"""Writes the core admits without a task (NodeCore.direct_write: a volume without a pair, a duplex
async or sync primary) and writes past a plain volume's gate (core/plain_gate.py): eight writers
at once on a real node lose nothing, never hang and are counted exactly (the first test hangs with
the lost wake-up of region locks planted back), a pair created while they write (it closes the
gate) still ends with the secondary equal to the primary, on an async primary most writes take
the path and every block reaches the secondary as last written, and on a sync primary every
block is there as soon as the writers are done. That the initial copy waits for a write in
flight is a race too narrow to hit reliably here: tests/unit/test_core.py and the simulator check it."""
from __future__ import annotations

import hashlib
import random
import threading
import time

import nbd
import pytest

from replicator import process

MiB = 1 << 20
BLOCKS = 2048            # 8 MiB of 4 KiB blocks


def writers(uri: str, n: int, stop: threading.Event, last: dict[int, bytes], errors: list[BaseException],
            rounds: int = 0, stride: int = 1) -> list[threading.Thread]:
    """``n`` threads, each with its own NBD connection, writing its own blocks (block % n == i,
    at ``block * stride`` 4 KiB blocks) until ``stop`` (or ``rounds`` writes); ``last`` keeps
    what each block was last given."""
    def run(i: int) -> None:
        h = nbd.NBD()
        h.connect_uri(uri)
        rnd, done = random.Random(i), 0
        try:
            while not stop.is_set() and (not rounds or done < rounds):
                block = rnd.randrange(BLOCKS // n) * n + i
                data = rnd.randbytes(4096)
                h.pwrite(data, block * stride * 4096)
                last[block] = data
                done += 1
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)
        finally:
            h.shutdown()
    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    return ts


@pytest.mark.timeout(180)
def test_eight_writers_on_a_volume_without_a_pair_lose_nothing(started):
    t = started
    t.volume_create("site-a1:v1", BLOCKS * 4096)
    uri = t.cluster.node("site-a1").nbd_uri("v1")
    last: dict[int, bytes] = {}
    errors: list[BaseException] = []
    ts = writers(uri, 8, threading.Event(), last, errors, rounds=1500)
    for th in ts:
        th.join(timeout=120)
    assert not errors and not any(th.is_alive() for th in ts), errors   # a lost wake-up would hang here
    v1 = next(v for v in t.status()["volumes"] if v["node"] == "site-a1" and v["name"] == "v1")
    assert v1["writes"] == 12000 and v1["bytes_written"] == 12000 * 4096, v1     # counted exactly
    assert v1["gate_writes"] > 11000, v1        # past the plain gate, once a first write opened it
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for block, data in last.items():
            assert h.pread(4096, block * 4096) == data, f"block {block}"
    finally:
        h.shutdown()
    t.volume_delete("site-a1:v1")       # refused while a write is still counted in flight


@pytest.mark.timeout(300)
def test_a_pair_created_while_eight_writers_write_ends_equal(started):
    t = started
    t.volume_create("site-a1:v1", BLOCKS * 4096)
    t.volume_create("site-b:v3", BLOCKS * 4096)
    uri = t.cluster.node("site-a1").nbd_uri("v1")
    stop, last, errors = threading.Event(), {}, []
    ts = writers(uri, 8, stop, last, errors)
    time.sleep(0.5)
    t.pair_create("site-a1:v1", "site-b:v3", mode="async")
    time.sleep(1.5)
    stop.set()
    for th in ts:
        th.join(timeout=60)
    assert not errors, errors
    t.wait_duplex("site-a1:v1", timeout_s=120)
    r = t.verify("site-a1:v1", "site-b:v3", timeout_s=120)
    assert r["identical"], r
    v1 = next(v for v in t.status()["volumes"] if v["node"] == "site-a1" and v["name"] == "v1")
    assert 0 < v1["gate_writes"] < v1["writes"], v1     # past the gate before the pair, not after
    h = nbd.NBD()
    h.connect_uri(t.cluster.node("site-a1").nbd_uri("v1"))
    try:
        digest = hashlib.sha256(b"".join(h.pread(4096, b * 4096) for b in sorted(last))).hexdigest()
    finally:
        h.shutdown()
    assert digest == hashlib.sha256(b"".join(last[b] for b in sorted(last))).hexdigest()


def read_blocks(uri: str, blocks: list[int], stride: int = 1) -> dict[int, bytes]:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return {b: h.pread(4096, b * stride * 4096) for b in blocks}
    finally:
        h.shutdown()


@pytest.mark.timeout(300)
def test_eight_writers_on_an_async_primary_reach_the_secondary_as_last_written(started):
    t = started
    t.volume_create("site-a1:v1", BLOCKS * 4096)
    t.volume_create("site-b:v3", BLOCKS * 4096)
    t.pair_create("site-a1:v1", "site-b:v3", mode="async")
    t.wait_duplex("site-a1:v1", timeout_s=120)
    last: dict[int, bytes] = {}
    errors: list[BaseException] = []
    ts = writers(t.cluster.node("site-a1").nbd_uri("v1"), 8, threading.Event(), last, errors, rounds=800)
    for th in ts:
        th.join(timeout=120)
    assert not errors and not any(th.is_alive() for th in ts), errors
    t.wait_drained("site-a1:v1", "site-b:v3", 120)
    v1 = next(v for v in t.status()["volumes"] if v["node"] == "site-a1" and v["name"] == "v1")
    assert v1["writes"] >= 6400 and v1["direct_writes"] > v1["writes"] // 2, v1
    assert read_blocks(t.cluster.node("site-b").nbd_uri("v3"), sorted(last)) == last
    assert read_blocks(t.cluster.node("site-a1").nbd_uri("v1"), sorted(last)) == last


@pytest.mark.timeout(300)
def test_eight_writers_on_a_sync_primary_find_each_block_on_the_secondary_once_acknowledged(started):
    """A sync write without a task is acknowledged only once the secondary holds it: as soon as
    every writer is done, with nothing to drain, the secondary reads each block as last written.
    The blocks are spread over 128 regions (a sync write holds its 1 MiB region for a round trip:
    a write to a held region takes the task)."""
    t = started
    stride = 16
    t.volume_create("site-a1:v1", BLOCKS * stride * 4096)
    t.volume_create("site-b:v3", BLOCKS * stride * 4096)
    t.pair_create("site-a1:v1", "site-b:v3", mode="sync")
    t.wait_duplex("site-a1:v1", timeout_s=120)
    last: dict[int, bytes] = {}
    errors: list[BaseException] = []
    ts = writers(t.cluster.node("site-a1").nbd_uri("v1"), 8, threading.Event(), last, errors, rounds=400,
                 stride=stride)
    for th in ts:
        th.join(timeout=120)
    assert not errors and not any(th.is_alive() for th in ts), errors
    assert read_blocks(t.cluster.node("site-b").nbd_uri("v3"), sorted(last), stride) == last
    status = t.status()
    pair = next(p for p in status["pairs"] if p["primary"] == "site-a1:v1")
    assert pair["state"] == "duplex" and pair["dirty_bytes"] == 0, pair
    v1 = next(v for v in status["volumes"] if v["node"] == "site-a1" and v["name"] == "v1")
    assert v1["writes"] >= 3200 and v1["direct_writes"] > v1["writes"] // 2, v1
    assert read_blocks(t.cluster.node("site-a1").nbd_uri("v1"), sorted(last), stride) == last
    # one more write without a task, to a block written above: not acknowledged while the
    # secondary cannot answer (under sync_timeout_s), acknowledged once it holds it
    block = sorted(last)[0]
    h = nbd.NBD()
    h.connect_uri(t.cluster.node("site-a1").nbd_uri("v1"))
    try:
        with process.paused(process.read_pid(str(t.cluster.node("site-b").pidfile))):
            cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"s" * 4096)), block * stride * 4096)
            time.sleep(1.0)
            h.poll(0)
            assert not h.aio_command_completed(cookie), "acknowledged before the secondary answered"
        deadline, done = time.monotonic() + 30, False
        while not done and time.monotonic() < deadline:
            h.poll(100)
            done = h.aio_command_completed(cookie)      # true once: the command is retired
        assert done
    finally:
        h.shutdown()
    assert read_blocks(t.cluster.node("site-b").nbd_uri("v3"), [block], stride) == {block: b"s" * 4096}
    after = next(v for v in t.status()["volumes"] if v["node"] == "site-a1" and v["name"] == "v1")
    assert after["direct_writes"] == v1["direct_writes"] + 1, after
