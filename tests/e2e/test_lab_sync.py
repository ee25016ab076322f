"""The foundation acceptance test: the lab in sync mode, ext4 on the attached device,
kill -9 of the primary, the secondary holds every acknowledged write and fsck passes."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from replicator import process
from tests.conftest import run

pytestmark = pytest.mark.e2e
RCOPY = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "rcopy")


def rcopy(*args: str, check: bool = True, env=None, timeout=600) -> subprocess.CompletedProcess:
    return run(RCOPY, *args, check=check, env=env, timeout=timeout)


@pytest.fixture
def lab_dir(tmp_path):
    d = tmp_path / "lab"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        subprocess.run([RCOPY, "lab", "down", "--dir", str(d)], capture_output=True, timeout=120)


def test_lab_sync_kill_primary_secondary_complete(lab_dir, tmp_path):
    up = json.loads(rcopy("lab", "up", "--dir", str(lab_dir), "--mode", "sync", "--size", "256M", "--json").stdout)
    assert set(up) >= {"cluster", "device", "nodes", "vvol"} and up["vvol"] == "app"
    env = dict(os.environ, RCOPY_CLUSTER=up["cluster"])
    dev, mnt = up["device"], tmp_path / "mnt"
    status = json.loads(rcopy("status", "--json", env=env).stdout)
    assert status["pairs"][0]["state"] == "duplex" and status["pairs"][0]["mode"] == "sync"
    assert {n["name"] for n in status["nodes"] if n["up"]} == {"site-a1", "site-a2", "site-b"}

    run("mkfs.ext4", "-q", "-F", dev)
    run("mount", dev, str(mnt))
    sums = {}
    for i in range(12):
        data = os.urandom(16 << 20)
        (mnt / f"f{i}").write_bytes(data)
        sums[f"f{i}"] = hashlib.sha256(data).hexdigest()
    for i in (2, 5, 7):
        (mnt / f"f{i}").unlink()
        del sums[f"f{i}"]
    run("sync")

    pid = process.read_pid(str(lab_dir / "site-a1" / "nbdkit.pid"))
    os.kill(pid, signal.SIGKILL)
    run("umount", "-l", str(mnt))

    # site-b's v3, read through its own NBD export, holds every acknowledged write.
    image = tmp_path / "v3.img"
    v3 = next(v for v in status["volumes"] if v["node"] == "site-b" and v["name"] == "v3")
    run("nbdcopy", v3["nbd_uri"], str(image))
    check_mnt = tmp_path / "check"
    check_mnt.mkdir()
    run("mount", "-o", "loop", str(image), str(check_mnt))  # our copy: the journal may replay
    try:
        got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in check_mnt.glob("f*")}
    finally:
        run("umount", str(check_mnt))
    assert got == sums
    # Checked after the journal replayed: the filesystem was still mounted when its primary was
    # killed, so metadata written after `sync` (ext4's own background work) may sit in the ext4
    # journal only, as after any crash; `e2fsck -n` does not replay it (seen once, 2026-12-03).
    fsck = run("e2fsck", "-fn", str(image), check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    rcopy("node", "start", "site-a1", env=env)
    v = rcopy("verify", "site-a1:v1", "site-b:v3", env=env, check=False)
    assert v.returncode == 0, v.stdout + v.stderr


def test_cli_errors_are_one_line(tmp_path):
    missing = rcopy("--cluster", str(tmp_path / "none.toml"), "status", check=False)
    assert missing.returncode != 0 and missing.stderr.startswith("rcopy: error:")
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    bad = rcopy("volume", "create", "nocolon", "--size", "1G", "--cluster", str(tmp_path / "none.toml"), check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    usage = rcopy("pair", "create", "a:b", check=False)
    assert usage.returncode == 2 and "usage" in usage.stderr
