"""Synchronous remote copy between real nbdkit storage nodes over ZeroMQ (issue: foundation)."""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import nbd
import pytest

from replicator import process
from replicator.errors import NodeUnreachable, StateError, UsageError
from tests.conftest import make_pair, nbd_handle

MiB = 1 << 20


def _fill(h, size: int, seed: int, chunks: int = 40, length: int = 64 * 1024) -> dict[int, bytes]:
    rnd = random.Random(seed)
    written = {}
    for _ in range(chunks):
        off = rnd.randrange(0, size - length) // 4096 * 4096
        data = rnd.randbytes(length)
        h.pwrite(data, off)
        written[off] = data
    return written


def test_pair_on_volume_with_data_and_concurrent_writes(started):
    t = started
    size = 64 * MiB
    t.volume_create("site-a1:v1", size)
    t.volume_create("site-b:v3", size)
    h = nbd_handle(t, "site-a1:v1")
    _fill(h, size, seed=1, chunks=200)
    stop = threading.Event()
    errors = []

    def writer():
        w = nbd_handle(t, "site-a1:v1")
        rnd = random.Random(2)
        try:
            while not stop.is_set():
                off = rnd.randrange(0, size // 4096) * 4096
                w.pwrite(rnd.randbytes(4096), off)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            w.shutdown()
    th = threading.Thread(target=writer)
    th.start()
    try:
        r = t.pair_create("site-a1:v1", "site-b:v3", mode="sync")
        assert r["state"] == "copying"
        t.wait_duplex("site-a1:v1", timeout_s=120)
    finally:
        stop.set()
        th.join()
    assert not errors
    result = t.verify("site-a1:v1", "site-b:v3")
    assert result["identical"], result
    st = t.find_pair("site-a1:v1")
    assert st["mode"] == "sync" and st["state"] == "duplex" and st["lag_writes"] == 0
    h.shutdown()


def test_secondary_refuses_host_writes_and_bad_io_keeps_serving(started):
    t = started
    make_pair(t, 8 * MiB, "sync")
    sec = nbd_handle(t, "site-b:v3")
    with pytest.raises(nbd.Error) as exc:
        sec.pwrite(b"x" * 4096, 0)
    assert "EPERM" in str(exc.value)  # EROFS travels as EPERM in the NBD protocol
    prim = nbd_handle(t, "site-a1:v1")
    with pytest.raises(nbd.Error):
        prim.pread(4096, 8 * MiB)  # out of range: client or server refuses
    prim.pwrite(b"y" * 4096, 4096)
    assert sec.pread(4096, 4096) == b"y" * 4096  # sync: on the secondary before the ack
    prim.shutdown()
    sec.shutdown()


def test_size_mismatch_and_unknown_things_are_clear_errors(started):
    t = started
    t.volume_create("site-a1:v1", 8 * MiB)
    t.volume_create("site-b:v3", 16 * MiB)
    with pytest.raises(UsageError, match="size mismatch"):
        t.pair_create("site-a1:v1", "site-b:v3", mode="sync")
    # the node still serves, and nothing changed:
    assert [v["role"] for v in t.status()["volumes"] if v["name"] in ("v1", "v3")] == ["simplex", "simplex"]
    with pytest.raises(StateError, match="already exists"):
        t.volume_create("site-a1:v1", 8 * MiB)


def test_management_info_survives_restart(started):
    t = started
    make_pair(t, 8 * MiB, "sync")
    h = nbd_handle(t, "site-a1:v1")
    h.pwrite(b"z" * 8192, 0)
    h.shutdown()
    t.node_stop("site-a1")
    t.node_stop("site-b")
    t.node_start("site-a1")
    t.node_start("site-b")
    p = t.find_pair("site-a1:v1")
    assert p["state"] == "duplex" and p["secondary"] == "site-b:v3"
    assert t.verify("site-a1:v1", "site-b:v3")["identical"]


def test_kill_primary_secondary_has_every_acknowledged_write(started):
    t = started
    size = 32 * MiB
    make_pair(t, size, "sync")
    h = nbd_handle(t, "site-a1:v1")
    acked = _fill(h, size, seed=7, chunks=100, length=4096)
    os.kill(process.read_pid(str(t.cluster.node("site-a1").pidfile)), signal.SIGKILL)
    sec = nbd_handle(t, "site-b:v3")
    for off, data in acked.items():
        assert sec.pread(len(data), off) == data
    sec.shutdown()


def test_kill_during_sync_write_resyncs_the_region_on_restart(started):
    """Killed between its local write and the secondary's answer, the primary holds bytes the
    secondary lacks; the activity log makes the restart resynchronise that region."""
    t = started
    size = 16 * MiB
    make_pair(t, size, "sync")
    sec_pid = process.read_pid(str(t.cluster.node("site-b").pidfile))
    os.kill(sec_pid, signal.SIGSTOP)          # the secondary cannot answer
    try:
        h = nbd_handle(t, "site-a1:v1")
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"k" * 4096)), 3 * MiB)
        deadline = time.monotonic() + 3
        image = t.cluster.node("site-a1").state / "volumes" / "v1.img"
        while time.monotonic() < deadline:       # wait until the local write has landed
            with open(image, "rb") as f:
                f.seek(3 * MiB)
                if f.read(4096) == b"k" * 4096:
                    break
            time.sleep(0.02)
        else:
            raise AssertionError("the local write never landed")
        os.kill(process.read_pid(str(t.cluster.node("site-a1").pidfile)), signal.SIGKILL)
    finally:
        os.kill(sec_pid, signal.SIGKILL)      # the write it had not read yet dies with it
    del h
    t.node_start("site-b")
    sec = nbd_handle(t, "site-b:v3")
    assert sec.pread(4096, 3 * MiB) != b"k" * 4096   # the copies now differ
    sec.shutdown()
    t.node_start("site-a1")
    t.wait_duplex("site-a1:v1", 60)
    assert t.verify("site-a1:v1", "site-b:v3")["identical"]


def test_secondary_down_suspends_then_resumes_with_resync(started):
    t = started
    size = 16 * MiB
    make_pair(t, size, "sync")
    t.node_stop("site-b")
    h = nbd_handle(t, "site-a1:v1")
    h.pwrite(b"a" * 4096, 0)          # waits for the sync timeout, then the pair suspends
    h.pwrite(b"b" * 4096, 5 * MiB)    # suspended: tracked in the bitmap, acknowledged at once
    p = t.find_pair("site-a1:v1")
    assert p["state"] == "suspended" and p["dirty_bytes"] == 2 * 4096    # two 4 KiB blocks
    t.node_start("site-b")
    t.wait_duplex("site-a1:v1", 60)   # auto-resume: differential resync
    assert t.verify("site-a1:v1", "site-b:v3")["identical"]
    h.shutdown()


def test_a_copy_message_from_before_a_resync_is_refused(started):
    """A pair.write that timed out at the primary (the pair then suspended) can still reach
    the secondary later, from a TCP buffer once a cut link heals. After the resync that
    followed, its old copy epoch gets it refused: it must not overwrite newer data."""
    t = started
    make_pair(t, 4 * MiB, "sync")
    h = nbd_handle(t, "site-a1:v1")
    h.pwrite(b"new!" * 1024, 0)
    old = t.node_request("site-b", "status")["volumes"]
    epoch = next(v for v in old if v["name"] == "v3").get("copy_epoch", 0)
    t.pair_command("suspend", "site-a1:v1")
    t.pair_command("resume", "site-a1:v1")
    t.wait_duplex("site-a1:v1", 60)
    late = {"volume": "v3", "offset": 0, "source": "site-a1", "zero": 0, "after_seq": 0, "epoch": epoch}
    with pytest.raises(StateError, match="stale copy message"):
        t.request(t.cluster.node("site-b"), "pair.write", payloads=[b"old!" * 1024], **late)
    with pytest.raises(StateError, match="stale copy message"):
        t.node_request("site-b", "pair.resync_begin", group="", volume="v3", next_seq=0,
                       source="site-a1", epoch=epoch)
    assert t.verify("site-a1:v1", "site-b:v3")["identical"]
    h.shutdown()


def test_unreachable_node_is_a_clear_error(cluster):
    with pytest.raises(NodeUnreachable, match="rcopy node start site-a1"):
        cluster.volume_create("site-a1:v1", 8 * MiB)


def test_zero_fua_flush_trim_replicate(started):
    t = started
    make_pair(t, 8 * MiB, "sync")
    h = nbd_handle(t, "site-a1:v1")
    assert h.can_zero() and h.can_fua() and h.can_flush() and h.can_trim()
    h.pwrite(b"z" * 65536, 0, nbd.CMD_FLAG_FUA)
    h.zero(16384, 4096)
    h.trim(4096, 65536)  # allowed to be ignored; must not fail
    h.flush()
    sec = nbd_handle(t, "site-b:v3")
    expect = b"z" * 4096 + bytes(16384) + b"z" * (65536 - 4096 - 16384)
    assert h.pread(65536, 0) == expect
    assert sec.pread(65536, 0) == expect
    h.shutdown()
    sec.shutdown()
