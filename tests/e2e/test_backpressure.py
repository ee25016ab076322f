"""Issue 14 item 4: back-pressure before the journal is full. Host writes faster than the WAN
link drains them: past the journal's high-water mark the primary slows the host, so the pair
stays duplex and never cycles through suspended and resync under a steady overload."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from replicator.terminal import Terminal
from tests.conftest import run

pytestmark = pytest.mark.e2e
RCOPY = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "rcopy")
MiB = 1 << 20


def rcopy(cluster: str, *args: str) -> dict:
    return json.loads(run(RCOPY, "--cluster", cluster, *args, "--json").stdout)


@pytest.fixture
def slow_wan(tmp_path):
    d = tmp_path / "lab"
    try:
        up = json.loads(run(RCOPY, "lab", "up", "--netns", "--dir", str(d), "--size", "16M",
                            "--wan-rate", "8mbit", "--json").stdout)
        yield up["cluster"], Terminal(Path(up["cluster"]))
    finally:
        subprocess.run([RCOPY, "lab", "down", "--dir", str(d)], capture_output=True, timeout=120)


def test_a_steady_overload_is_slowed_not_suspended(slow_wan):
    cluster, t = slow_wan
    for spec in ("site-a1:j1", "site-b:j3"):
        rcopy(cluster, "volume", "create", spec, "--size", "64M")
    rcopy(cluster, "pair", "create", "site-a1:j1", "site-b:j3", "--mode", "async", "--journal-size", "4M",
          "--wait")
    rcopy(cluster, "vvol", "create", "jv", "--target", "site-a1:j1")
    device = rcopy(cluster, "attach", "jv")["device"]
    # about 4 MiB/s of 4 KiB writes wanted, 1 MiB/s of link: the 4 MiB journal would be full in 2 s
    fio = subprocess.Popen(["fio", "--name=over", f"--filename={device}", "--rw=randwrite", "--bs=4k",
                            "--iodepth=8", "--ioengine=libaio", "--direct=1", "--size=48M", "--time_based",
                            "--runtime=40", "--output-format=json"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    states, fills = [], []
    try:
        deadline = time.monotonic() + 38
        while time.monotonic() < deadline:
            p = t.find_pair("site-a1:j1")
            states.append(p["state"])
            fills.append(p["journal_used_bytes"] / (4 * MiB))
            time.sleep(0.5)
    finally:
        out, err = fio.communicate(timeout=120)
    assert fio.returncode == 0, err
    iops = json.loads(out)["jobs"][0]["write"]["iops"]
    p = t.find_pair("site-a1:j1")
    print(f"host {iops:.0f} IOPS ({iops * 4096 / MiB:.2f} MiB/s), journal fill max {max(fills):.0%}, "
          f"throttled {p['throttled_writes']} writes, states {sorted(set(states))}")
    assert set(states) == {"duplex"}, states          # never suspended, never a resync
    assert p["throttled_writes"] > 100 and max(fills) > 0.8
    assert p["suspend_reason"] in ("", None)
