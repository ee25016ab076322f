"""Issue 4 acceptance: ext4 + fio --verify on the attached device for the whole migration,
in async and sync mode; fsck, verify, remove, replication continues. Issue 15: the same between
two volumes of one node (SPEC 1.7), then the old volume is removed and deleted."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from replicator.cluster import load
from tests.conftest import run

pytestmark = pytest.mark.e2e
RCOPY = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "rcopy")


@pytest.mark.parametrize("mode,target", [("async", "site-a2:v2"), ("sync", "site-a2:v2"),
                                         ("async", "site-a1:v9"), ("sync", "site-a1:v9")])
def test_migrate_under_fio_on_ext4(tmp_path, mode, target):
    d, mnt = tmp_path / "lab", tmp_path / "mnt"
    mnt.mkdir()
    fio = None
    try:
        up = json.loads(run(RCOPY, "lab", "up", "--dir", str(d), "--mode", mode, "--size", "256M",
                            "--json").stdout)
        env = dict(os.environ, RCOPY_CLUSTER=up["cluster"])
        dev = up["device"]
        local = target.startswith("site-a1:")
        if local:                                        # a new volume in the old node (another pool)
            run(RCOPY, "volume", "create", target, "--size", "256M", env=env)
        run("mkfs.ext4", "-q", "-F", dev)
        run("mount", dev, str(mnt))
        fio = subprocess.Popen(
            ["fio", "--name=mig", f"--directory={mnt}", "--rw=randwrite", "--bs=4k", "--size=24M",
             "--numjobs=2", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--time_based=0",
             "--loops=6", "--fsync=64", "--output-format=json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)  # verify state files
        mig = json.loads(run(RCOPY, "migrate", "site-a1:v1", "--to", target, "--json",
                             env=env, timeout=600).stdout)
        out, err = fio.communicate(timeout=600)
        assert fio.returncode == 0, err[-2000:]
        jobs = json.loads(out[out.index("{"):])["jobs"]
        assert all(j["error"] == 0 for j in jobs)
        assert mig["state"] == "done" and mig["host_pause_ms_max"] < 5000
        print(f"{mode} -> {target}: longest host pause {mig['host_pause_ms_max']} ms")
        run("umount", str(mnt))
        fsck = run("e2fsck", "-fn", dev, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        st = json.loads(run(RCOPY, "status", "--json", env=env).stdout)
        pair = next(p for p in st["pairs"] if p["primary"] == target)
        assert pair["secondary"] == "site-b:v3" and pair["state"] == "duplex"
        run(RCOPY, "verify", target, "site-b:v3", env=env)
        if local:                                        # the old volume, not the node, goes
            assert run(RCOPY, "remove", "site-a1", env=env, check=False).returncode != 0
            run(RCOPY, "remove", "site-a1:v1", env=env)
            run(RCOPY, "volume", "delete", "site-a1:v1", env=env)
            assert not (load(Path(up["cluster"])).node("site-a1").state / "volumes" / "v1.img").exists()
        else:
            run(RCOPY, "remove", "site-a1", env=env)
        run("mount", dev, str(mnt))
        (mnt / "after-remove").write_bytes(os.urandom(1 << 20))
        run("sync")
        run(RCOPY, "verify", target, "site-b:v3", env=env)
        st = json.loads(run(RCOPY, "status", "--json", env=env).stdout)
        assert [p["primary"] for p in st["pairs"]] == [target]
        sec = next(v for v in st["volumes"] if v["node"] == "site-b" and v["name"] == "v3")
        assert sec["copy_sources"] == [target], sec
    finally:
        if fio and fio.poll() is None:
            fio.kill()
            fio.wait()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        subprocess.run([RCOPY, "lab", "down", "--dir", str(d)], capture_output=True, timeout=120)
