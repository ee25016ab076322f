"""The Vagrant lab's files are consistent: the Vagrantfile validates (where vagrant is
installed), the provisioner is valid bash, and its cluster file names the four VMs."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from replicator import cluster

VAGRANT = Path(__file__).resolve().parents[2] / "vagrant"


def test_cluster_file_matches_the_vms() -> None:
    c = cluster.load(VAGRANT / "cluster.toml")
    ips = dict(re.findall(r'"([\w-]+)"\s*=>\s*"([\d.]+)"', (VAGRANT / "Vagrantfile").read_text()))
    assert set(c.nodes) == {"site-a1", "site-a2", "site-b"}
    assert set(c.vvol_servers) == {"host"}
    for name, ep in {**c.nodes, **c.vvol_servers}.items():
        assert ep.control.startswith(f"tcp://{ips[name]}:"), (name, ep.control)
        assert ep.nbd.startswith(f"{ips[name]}:"), (name, ep.nbd)


def test_provisioner_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(VAGRANT / "provision.sh")], check=True)


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is not installed (apt-get install vagrant)")
def test_vagrant_validate() -> None:
    r = subprocess.run(["vagrant", "validate"], cwd=VAGRANT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout
