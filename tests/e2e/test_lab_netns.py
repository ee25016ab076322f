"""Issue 5: the lab with one network namespace per site and a rate-limited WAN link that
``rcopy fault cut|heal|throttle`` drives. Replication survives a cut link: async writes keep
being acknowledged while the link is down, and the secondary converges after ``heal``."""
from __future__ import annotations

import json
import mmap
import os
import subprocess
import time
from pathlib import Path

import pytest

from replicator import netlab, process
from replicator.terminal import Terminal
from tests.conftest import run

pytestmark = pytest.mark.e2e
RCOPY = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "rcopy")
MiB = 1 << 20


def rcopy_json(*args: str) -> dict:
    return json.loads(run(RCOPY, *args, "--json").stdout)


@pytest.fixture
def netlab_up(tmp_path):
    d = tmp_path / "lab"
    try:
        up = rcopy_json("lab", "up", "--netns", "--dir", str(d), "--size", "32M", "--wan-rate", "50mbit")
        yield d, up, Terminal(Path(up["cluster"]))
    finally:
        down = subprocess.run([RCOPY, "lab", "down", "--dir", str(d)], capture_output=True, timeout=120)
        print(down.stdout.decode(), down.stderr.decode())


def write(device: str, offset: int, data: bytes) -> None:
    with open(device, "r+b", buffering=0) as f:
        f.seek(offset)
        f.write(data)
        os.fsync(f.fileno())


def test_netns_lab_cut_heal_throttle(netlab_up):
    d, up, t = netlab_up
    net = up["netns"]
    assert net["wan"] == "up" and net["rate"] == "50000000bit"
    names = set(net["namespaces"])
    assert names <= {p.name for p in netlab.NETNS_DIR.iterdir()}
    # every daemon listens inside its own namespace, on its own address
    for name, addr in net["addresses"].items():
        assert addr in t.cluster.daemon(name).control
        assert t.cluster.daemon(name).netns in names
    # site-b is really behind the WAN: reached through the switch namespace, not loopback
    assert net["addresses"]["site-b"].rsplit(".", 1)[0] != net["addresses"]["site-a1"].rsplit(".", 1)[0]

    write(up["device"], 0, b"a" * MiB)
    t.wait_duplex("site-a1:v1", 60)

    cut = rcopy_json("fault", "cut", "--dir", str(d))
    assert cut["wan"] == "down"
    with pytest.raises(subprocess.CalledProcessError):   # site-b cannot be reached from here
        run(RCOPY, "--cluster", up["cluster"], "status", "site-b", timeout=60)
    write(up["device"], 4 * MiB, b"b" * (2 * MiB))        # acknowledged with the link down (async)
    p = t.find_pair("site-a1:v1")
    assert p["state"] == "suspended" or p["lag_writes"] > 0

    slow = rcopy_json("fault", "throttle", "--rate", "20mbit", "--dir", str(d))
    assert slow["rate"] == "20000000bit" and "tbf" in slow["qdisc"]
    healed = rcopy_json("fault", "heal", "--dir", str(d))
    assert healed["wan"] == "up"
    p = t.find_pair("site-a1:v1")
    if p["state"] == "suspended":
        t.pair_command("resume", "site-a1:v1")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        p = t.find_pair("site-a1:v1")
        if p["state"] == "duplex" and p["lag_writes"] == 0:
            break
        time.sleep(0.5)
    assert t.verify("site-a1:v1", "site-b:v3", timeout_s=120)["identical"]

    # kill / pause / resume by PID file
    paused = rcopy_json("fault", "pause", "site-a2", "--dir", str(d))
    assert paused["signal"] == "SIGSTOP"
    rcopy_json("fault", "resume", "site-a2", "--dir", str(d))
    killed = rcopy_json("fault", "kill", "site-a2", "--dir", str(d))
    assert killed["signal"] == "SIGKILL"
    bad = subprocess.run([RCOPY, "fault", "kill", "site-a2", "--dir", str(d)], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "not running" in bad.stderr


def test_lab_down_removes_the_namespaces(tmp_path):
    d = tmp_path / "lab"
    up = rcopy_json("lab", "up", "--netns", "--dir", str(d), "--size", "16M")
    names = up["netns"]["namespaces"]
    down = subprocess.run([RCOPY, "lab", "down", "--dir", str(d)], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    left = {p.name for p in netlab.NETNS_DIR.iterdir()} if netlab.NETNS_DIR.exists() else set()
    assert not set(names) & left
    assert not d.exists()


def test_wan_delay_line_adds_latency_and_can_be_changed(tmp_path):
    """``--wan-delay``: a sync write waits at least one WAN round trip (2 x the one-way delay);
    ``rcopy fault delay`` changes it while replication goes on; lab down stops the delay line."""
    d = tmp_path / "lab"
    delay_ms = 25
    try:
        up = rcopy_json("lab", "up", "--netns", "--mode", "sync", "--dir", str(d), "--size", "16M",
                        "--wan-delay", str(delay_ms))
        t = Terminal(Path(up["cluster"]))
        assert up["netns"]["delay_ms"] == delay_ms
        pid = int((d / netlab.DELAY_PID).read_text())
        flags = os.O_WRONLY | os.O_DIRECT | os.O_DSYNC
        aligned = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
        for i in range(5):
            aligned[:] = os.urandom(4096)
            fd = os.open(up["device"], flags)
            try:
                t0 = time.monotonic()
                os.pwrite(fd, aligned, i * 4096)
                took_ms = (time.monotonic() - t0) * 1000
            finally:
                os.close(fd)
            assert took_ms >= 2 * delay_ms * 0.95, f"a sync write took {took_ms:.1f} ms"
        changed = rcopy_json("fault", "delay", "--ms", "0", "--dir", str(d))
        assert changed["delay_ms"] == 0
        write(up["device"], MiB, b"c" * MiB)
        assert t.verify("site-a1:v1", "site-b:v3", timeout_s=120)["identical"]
        bad = subprocess.run([RCOPY, "fault", "delay", "--ms", "-5", "--dir", str(d)], capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode != 0 and "0 to 10000 ms" in bad.stderr
    finally:
        down = subprocess.run([RCOPY, "lab", "down", "--dir", str(d)], capture_output=True, timeout=120)
        print(down.stdout.decode(), down.stderr.decode())
    assert not process.alive(pid), "lab down left the WAN delay line running"
