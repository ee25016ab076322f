"""Asynchronous remote copy: journal, sequence order, groups, push/pull, suspend/resume."""
from __future__ import annotations

import os
import random
import signal
import time

import pytest

from replicator import process
from tests.conftest import make_pair, nbd_handle

MiB = 1 << 20


@pytest.fixture(params=["push", "pull"])
def transfer(request):
    return request.param


def _pair(t, size, transfer, group=None, journal_bytes=None, prim="site-a1:v1", sec="site-b:v3"):
    make_pair(t, size, "async", prim, sec, group=group, transfer=transfer, journal_bytes=journal_bytes)


def test_async_replicates_and_drains(started, transfer):
    t = started
    _pair(t, 32 * MiB, transfer)
    h = nbd_handle(t, "site-a1:v1")
    rnd = random.Random(3)
    for _ in range(300):
        h.pwrite(rnd.randbytes(4096), rnd.randrange(0, 32 * MiB // 4096) * 4096)
    h.shutdown()
    r = t.verify("site-a1:v1", "site-b:v3", timeout_s=120)
    assert r["identical"], r
    p = t.find_pair("site-a1:v1")
    assert p["lag_writes"] == 0 and p["applied_seq"] == p["stored_seq"] >= 300
    assert p["transfer"] == transfer


def test_secondary_restart_catches_up_from_applied(started, transfer):
    t = started
    _pair(t, 32 * MiB, transfer)
    h = nbd_handle(t, "site-a1:v1")
    rnd = random.Random(4)
    for i in range(400):
        h.pwrite(rnd.randbytes(4096), rnd.randrange(0, 32 * MiB // 4096) * 4096)
        if i == 150:
            os.kill(process.read_pid(str(t.cluster.node("site-b").pidfile)), signal.SIGKILL)
    h.shutdown()
    p = t.find_pair("site-a1:v1")
    assert p["state"] == "duplex"  # the journal holds the backlog; nothing suspended
    t.node_start("site-b")
    r = t.verify("site-a1:v1", "site-b:v3", timeout_s=120)
    assert r["identical"], r


def test_suspend_resume_sends_only_dirty_blocks(started, transfer):
    t = started
    size = 64 * MiB
    _pair(t, size, transfer)
    before = t.find_pair("site-a1:v1")["copied_bytes"]
    t.pair_command("suspend", "site-a1:v1")
    h = nbd_handle(t, "site-a1:v1")
    dirty_regions = {3, 17, 40}
    for region in dirty_regions:          # half of each region: the other half is not resent
        for k in range(8):
            h.pwrite(os.urandom(64 * 1024), region * MiB + k * 64 * 1024)
    h.shutdown()
    p = t.find_pair("site-a1:v1")
    assert p["state"] == "suspended" and p["dirty_bytes"] == len(dirty_regions) * MiB // 2
    time.sleep(1.5)
    assert t.find_pair("site-a1:v1")["state"] == "suspended"  # user suspend: no auto-resume
    t.pair_command("resume", "site-a1:v1")
    t.wait_duplex("site-a1:v1", 60)
    sent = t.find_pair("site-a1:v1")["copied_bytes"] - before
    assert sent == len(dirty_regions) * MiB // 2
    assert t.verify("site-a1:v1", "site-b:v3", timeout_s=60)["identical"]


def test_journal_full_suspends_into_bitmap_then_resyncs(started, transfer):
    t = started
    size = 64 * MiB
    _pair(t, size, transfer, journal_bytes=2 * MiB)
    t.node_stop("site-b")  # the secondary is away: the journal fills up
    h = nbd_handle(t, "site-a1:v1")
    for k in range(48):  # 12 MiB burst; every write must succeed
        h.pwrite(os.urandom(256 * 1024), k * 256 * 1024 + 8 * MiB)
    h.shutdown()
    p = t.find_pair("site-a1:v1")
    assert p["state"] == "suspended" and "journal full" in p["suspend_reason"]
    assert p["dirty_bytes"] > 0
    t.node_start("site-b")
    t.wait_duplex("site-a1:v1", 120)  # auto-resume once the link is back
    assert t.verify("site-a1:v1", "site-b:v3", timeout_s=120)["identical"]


def test_consistency_group_shares_one_sequence(started, transfer):
    t = started
    size = 16 * MiB
    _pair(t, size, transfer, group="g1", prim="site-a1:v1", sec="site-b:v3")
    _pair(t, size, transfer, group="g1", prim="site-a1:v4", sec="site-b:v5")
    h1, h4 = nbd_handle(t, "site-a1:v1"), nbd_handle(t, "site-a1:v4")
    for k in range(100):
        (h1 if k % 2 else h4).pwrite(os.urandom(4096), (k % 50) * 4096)
    h1.shutdown()
    h4.shutdown()
    assert t.verify("site-a1:v1", "site-b:v3", timeout_s=60)["identical"]
    assert t.verify("site-a1:v4", "site-b:v5", timeout_s=60)["identical"]
    p1, p4 = t.find_pair("site-a1:v1"), t.find_pair("site-a1:v4")
    assert p1["group"] == p4["group"] == "g1"
    assert p1["stored_seq"] == p4["stored_seq"] >= 100  # one counter for both volumes


@pytest.mark.timeout(120)
def test_group_limits_are_per_group_checked_shown_and_kept(started):
    """Journal and reorder-buffer sizes per async group: checked, in status, kept over a restart."""
    import subprocess
    from pathlib import Path

    from replicator.errors import UsageError
    t = started
    for spec in ("site-a1:v1", "site-a1:v4", "site-a1:v7", "site-b:v3", "site-b:v6", "site-b:v9"):
        t.volume_create(spec, 8 * MiB)
    t.pair_create("site-a1:v1", "site-b:v3", mode="async", group="g1", journal_bytes=4 * MiB,
                  reorder_bytes=8 * MiB)
    with pytest.raises(UsageError, match="group g1 has a reorder buffer of 8388608 bytes"):
        t.pair_create("site-a1:v4", "site-b:v6", mode="async", group="g1", reorder_bytes=16 * MiB)
    with pytest.raises(UsageError, match="reorder buffer must be from 1048576"):
        t.pair_create("site-a1:v4", "site-b:v6", mode="async", group="g2", reorder_bytes=4096)
    with pytest.raises(UsageError, match="a sync pair has neither"):
        t.pair_create("site-a1:v4", "site-b:v6", mode="sync", reorder_bytes=8 * MiB)
    rcopy = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "rcopy")
    r = subprocess.run([rcopy, "--cluster", str(t.cluster.path), "pair", "create", "site-a1:v4", "site-b:v6",
                        "--mode", "async", "--reorder-buffer", "100G"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("rcopy: error: the reorder buffer must be from 1048576 to 17179869184 bytes")
    t.pair_create("site-a1:v4", "site-b:v6", mode="async", group="g1")     # joins with g1's limits
    t.pair_create("site-a1:v7", "site-b:v9", mode="async")                 # its own group, the defaults

    def groups() -> dict:
        return {(g["node"], g["group"]): g for g in t.status()["groups"]}
    for _ in range(2):
        g = groups()
        assert g[("site-a1", "g1")]["journal_capacity_bytes"] == 4 * MiB
        assert g[("site-b", "g1")]["reorder_bytes_max"] == 8 * MiB
        assert g[("site-b", "v7")]["reorder_bytes_max"] == 256 * MiB
        t.node_stop("site-b")
        t.node_start("site-b")
    for p in ("site-a1:v1", "site-a1:v4", "site-a1:v7"):
        t.wait_duplex(p, 60)
