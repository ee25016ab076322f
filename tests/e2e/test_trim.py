"""Issue 14 item 1: TRIM is replicated. ext4 on the lab device, write then delete 200 MiB,
`fstrim`: the allocated size of V1's and V3's files shrinks back, and verify passes; the same
on V2 after a migration (async, then sync)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from replicator.terminal import Terminal
from tests.conftest import run
from tests.e2e.test_lab_migration import RCOPY

pytestmark = pytest.mark.e2e
MiB = 1 << 20


def allocated(t: Terminal, spec: str) -> int:
    node, vol = spec.split(":")
    return os.stat(t.cluster.node(node).state / "volumes" / f"{vol}.img").st_blocks * 512


def write_delete_trim(t: Terminal, mnt: Path, primary: str, env: dict[str, str]) -> dict[str, int]:
    """200 MiB into a file, drained to V3; delete it, fstrim, drained again: what each file freed."""
    with open(mnt / "big", "wb") as f:
        for _ in range(200):
            f.write(os.urandom(MiB))
        os.fsync(f.fileno())
    run(RCOPY, "verify", primary, "site-b:v3", env=env, timeout=600)        # drained, and identical
    full = {spec: allocated(t, spec) for spec in (primary, "site-b:v3")}
    (mnt / "big").unlink()
    run("sync")
    trimmed = run("fstrim", "-v", str(mnt)).stdout
    run(RCOPY, "verify", primary, "site-b:v3", env=env, timeout=600)
    freed = {spec: full[spec] - allocated(t, spec) for spec in full}
    print(f"{primary}: {trimmed.strip()}; freed {({k: v // MiB for k, v in freed.items()})} MiB")
    return freed


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_fstrim_frees_space_on_every_replica_and_across_a_migration(tmp_path, mode):
    d, mnt = tmp_path / "lab", tmp_path / "mnt"
    mnt.mkdir()
    try:
        up = json.loads(run(RCOPY, "lab", "up", "--dir", str(d), "--mode", mode, "--size", "512M",
                            "--json").stdout)
        env = dict(os.environ, RCOPY_CLUSTER=up["cluster"])
        t = Terminal(Path(up["cluster"]))
        dev = up["device"]
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev)
        run("mount", dev, str(mnt))
        freed = write_delete_trim(t, mnt, "site-a1:v1", env)
        assert all(n >= 150 * MiB for n in freed.values()), freed

        mig = json.loads(run(RCOPY, "migrate", "site-a1:v1", "--to", "site-a2:v2", "--json",
                             env=env, timeout=600).stdout)
        assert mig["state"] == "done"
        freed = write_delete_trim(t, mnt, "site-a2:v2", env)
        assert all(n >= 150 * MiB for n in freed.values()), freed
        run("umount", str(mnt))
        fsck = run("e2fsck", "-fn", dev, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        subprocess.run([RCOPY, "lab", "down", "--dir", str(d)], capture_output=True, timeout=120)
