"""Issue 15 item 1: `rcopy verify --online` compares an async pair while fio writes to the host's
device, finds a difference planted behind rcopy's back, marks it, and resume repairs it."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from replicator.terminal import Terminal
from tests.e2e.test_lab_async import RCOPY, lab  # noqa: F401 - the same 64 MiB async lab

pytestmark = pytest.mark.e2e
MiB = 1 << 20
PLANT_AT = (48 * MiB + 12288, 40 * MiB + 5 * 4096)   # outside what fio writes (the first 32 MiB)


def fio(device: str, seconds: int) -> subprocess.Popen:
    return subprocess.Popen(["fio", "--name=load", f"--filename={device}", "--rw=randwrite", "--bs=4k",
                             "--iodepth=8", "--ioengine=libaio", "--direct=1", "--size=32M", "--time_based",
                             f"--runtime={seconds}", "--output-format=json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def verify(cluster: str, *extra: str) -> tuple[int, dict]:
    p = subprocess.run([RCOPY, "--cluster", cluster, "verify", "--online", "site-a1:v1", "site-b:v3", "--json",
                        *extra], capture_output=True, text=True, timeout=300)
    assert p.returncode in (0, 1), p.stderr
    return p.returncode, json.loads(p.stdout)


def plant(t: Terminal, offset: int) -> None:
    """A write to the secondary's image while its node is stopped: rcopy never sees it."""
    t.node_stop("site-b")
    image = t.cluster.node("site-b").state / "volumes" / "v3.img"
    fd = os.open(image, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xa5" * 4096, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    t.node_start("site-b")
    t.wait_duplex("site-a1:v1", timeout_s=120)


def test_online_verify_under_fio(lab):
    up, t = lab
    cluster = up["cluster"]
    load = fio(up["device"], 180)
    try:
        code, r = verify(cluster)                       # a healthy pair under load
        assert code == 0 and r["identical"], r
        assert r["checked_bytes"] == 64 * MiB and r["flapped"] == 0
        print(f"healthy: {r['seconds']} s, {len(r['busy'])} busy chunk(s)")

        plant(t, PLANT_AT[0])
        code, r = verify(cluster)
        chunk = r["chunk_bytes"]
        assert code == 1 and r["different"] == [PLANT_AT[0] - PLANT_AT[0] % chunk], r
        assert r["state"] == "suspended" and r["marked_bytes"] >= chunk
        print(f"planted: found in {r['seconds']} s: {r['different']}")
        time.sleep(3)                                   # the automatic resumer leaves it to the operator
        pair = next(p for p in t.status()["pairs"] if p["primary"] == "site-a1:v1")
        assert pair["state"] == "suspended" and pair["dirty_bytes"] >= chunk, pair
        t.pair_command("resume", "site-a1:v1")
        t.wait_duplex("site-a1:v1", timeout_s=120)
        code, r = verify(cluster)
        assert code == 0 and r["identical"], r

        plant(t, PLANT_AT[1])                           # --repair: found and resynchronised at once
        code, r = verify(cluster, "--repair")
        assert code == 1 and r["different"] == [PLANT_AT[1] - PLANT_AT[1] % chunk] and r["repaired"], r
        code, r = verify(cluster)
        assert code == 0 and r["identical"], r
        assert load.poll() is None, "fio stopped before the last verify"
    finally:
        load.wait(240)
    assert load.returncode == 0, load.stderr
    offline = t.verify("site-a1:v1", "site-b:v3")      # drained and quiet: the classic compare agrees
    assert offline["identical"], offline
