"""Issue 3/4 acceptance on the lab (async): write-order-consistent prefixes at the secondary
under a QD1 writer of self-describing blocks, with kill -9 of the primary at random moments,
including during a live migration."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from replicator import blockwriter, process
from replicator.terminal import Terminal
from tests.conftest import run

pytestmark = pytest.mark.e2e
RCOPY = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "rcopy")
BLOCKS = 4096  # 16 MiB of self-describing blocks


@pytest.fixture
def lab(tmp_path):
    d = tmp_path / "lab"
    try:
        up = json.loads(run(RCOPY, "lab", "up", "--dir", str(d), "--size", "64M", "--json").stdout)
        yield up, Terminal(Path(up["cluster"]))
    finally:
        subprocess.run([RCOPY, "lab", "down", "--dir", str(d)], capture_output=True, timeout=120)


def start_writer(device: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "replicator.blockwriter", "write", "--device", device,
                             "--log", str(log), "--blocks", str(BLOCKS), "--duration", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=str(Path(__file__).resolve().parents[2]))


def wait_applied_settles(t: Terminal, timeout_s: float = 30) -> None:
    """The primary is dead: wait until the secondary has applied everything it received."""
    last, stable_since = None, time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        groups = [g for g in t.node_request("site-b", "status")["groups"] if g["role"] == "dest"]
        now = [(g["applied"], g["waiting"]) for g in groups]
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since > 1.0:
            return
        time.sleep(0.1)


def snapshot_v3(t: Terminal, path: Path) -> None:
    run("nbdcopy", t.cluster.node("site-b").nbd_uri("v3"), str(path))


def test_kill_primary_secondary_is_prefix(lab, tmp_path):
    up, t = lab
    log = tmp_path / "writes.log"
    w = start_writer(up["device"], log)
    time.sleep(random.uniform(2, 5))
    os.kill(process.read_pid(str(t.cluster.node("site-a1").pidfile)), signal.SIGKILL)
    w.wait(60)
    wait_applied_settles(t)
    image = tmp_path / "v3.img"
    snapshot_v3(t, image)
    verdict = blockwriter.check([str(image)], str(log), BLOCKS)
    assert verdict.consistent, verdict.problems
    assert verdict.acked_max > 50
    print(f"acked {verdict.acked_max}, secondary holds prefix up to {verdict.prefix_seq}")


def test_secondary_restart_catches_up(lab, tmp_path):
    up, t = lab
    log = tmp_path / "writes.log"
    w = start_writer(up["device"], log)
    time.sleep(2)
    os.kill(process.read_pid(str(t.cluster.node("site-b").pidfile)), signal.SIGKILL)
    time.sleep(2)
    t.node_start("site-b")
    time.sleep(2)
    w.send_signal(signal.SIGTERM)
    w.wait(60)
    r = t.verify("site-a1:v1", "site-b:v3", timeout_s=120)
    assert r["identical"], r


@pytest.mark.parametrize("phase_delay", [0.0, 0.3, 1.0])
def test_migration_with_kill_keeps_prefix(lab, tmp_path, phase_delay):
    up, t = lab
    log = tmp_path / "writes.log"
    w = start_writer(up["device"], log)
    time.sleep(2)
    t.migrate("site-a1:v1", "site-a2:v2", wait=False)
    time.sleep(phase_delay)
    os.kill(process.read_pid(str(t.cluster.node("site-a2").pidfile)), signal.SIGKILL)
    w.wait(60)
    wait_applied_settles(t)
    image = tmp_path / "v3.img"
    snapshot_v3(t, image)
    verdict = blockwriter.check([str(image)], str(log), BLOCKS)
    assert verdict.consistent, verdict.problems
