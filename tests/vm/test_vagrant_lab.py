"""The Vagrant lab boots for real (issue 16).

* ``test_smoke`` (CI): two VMs (host, site-b) from the box built from Debian packages,
  libvirt in a network namespace; on the host VM ``rcopy attach`` gives /dev/nbd0 through
  nbd-client on the kernel NBD driver; ext4 + fio with verify; then everything is gone.
* ``test_full_run`` (RCOPY_VM_FULL=1, or ``scripts/vagrant-lab run`` by hand): the four
  VMs, the migration demo under fio, the power-loss rounds, teardown.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.vm.conftest import vm_skip_reason

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "scripts" / "vagrant-lab"
CACHE = Path(os.environ.get("RCOPY_VAGRANT_CACHE", "/var/cache/rcopy-vagrant"))
NS = os.environ.get("RCOPY_VLAB_NS", "rcopy-vlab")

reason = vm_skip_reason()
pytestmark = pytest.mark.skipif(reason is not None, reason=f"VM lab: {reason}")


def run_lab(command: str, timeout_s: float) -> tuple[subprocess.CompletedProcess, dict]:
    r = subprocess.run([str(LAB), command], capture_output=True, text=True, timeout=timeout_s,
                       stdin=subprocess.DEVNULL)
    print(r.stdout[-6000:])
    print(r.stderr[-6000:])
    try:
        figures = json.loads((CACHE / "last-run" / "figures.json").read_text())
    except (OSError, ValueError):
        figures = {}
    return r, figures


def assert_nothing_left() -> None:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert NS not in netns
    etc = Path("/etc/libvirt")
    assert not list(etc.glob("qemu/rcopy-vlab_*.xml")), "a lab domain is still defined"
    assert not list(etc.glob("qemu/networks/rcopy-vlab*.xml")), "a lab network is still defined"
    assert not (etc / "storage" / "rcopy-vlab.xml").exists(), "the lab's storage pool is still defined"
    assert not (REPO / "vagrant" / ".vagrant").exists()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
                state = (p / "stat").read_text().rsplit(") ", 1)[1][0]
            except (OSError, IndexError):
                continue
            assert state == "Z" or b"rcopy-vlab" not in cmd, f"process {p.name} of the lab still runs"


@pytest.mark.timeout(2700)
def test_smoke():
    r, fig = run_lab("smoke", 2600)
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        assert fig["smoke"]["device"] == "/dev/nbd0"
        assert fig["smoke"]["attach_method"] == "nbd-client"
        assert fig["smoke"]["fio_errors"] == 0
    finally:
        assert_nothing_left()


@pytest.mark.skipif(os.environ.get("RCOPY_VM_FULL") != "1",
                    reason="the full VM run (4 VMs, demo, power loss) is behind RCOPY_VM_FULL=1")
@pytest.mark.timeout(5400)
def test_full_run():
    r, fig = run_lab("run", 5300)
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        demo = fig["demo"]
        assert demo["device"] == "/dev/nbd0" and demo["attach_method"] == "nbd-client"
        assert demo["fio_errors"] == 0 and demo["verify"] == "identical"
        assert len(fig["powerloss"]["rounds"]) == 2
    finally:
        assert_nothing_left()
