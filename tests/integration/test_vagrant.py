"""The Vagrant lab's files are consistent: the Vagrantfile validates (where vagrant is
installed), the provisioner, the box builder and the lab command are valid, and the
cluster file names the four VMs. tests/vm boots them for real."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from replicator import attach, cluster

REPO = Path(__file__).resolve().parents[2]
VAGRANT = REPO / "vagrant"


def test_cluster_file_matches_the_vms() -> None:
    c = cluster.load(VAGRANT / "cluster.toml")
    ips = dict(re.findall(r'"([\w-]+)"\s*=>\s*"([\d.]+)"', (VAGRANT / "Vagrantfile").read_text()))
    assert set(c.nodes) == {"site-a1", "site-a2", "site-b"}
    assert set(c.vvol_servers) == {"host"}
    for name, ep in {**c.nodes, **c.vvol_servers}.items():
        assert ep.control.startswith(f"tcp://{ips[name]}:"), (name, ep.control)
        assert ep.nbd.startswith(f"{ips[name]}:"), (name, ep.nbd)


@pytest.mark.parametrize("script", ["vagrant/provision.sh", "vagrant/box/build.sh", "vagrant/box/customize.sh"])
def test_scripts_are_valid_bash(script: str) -> None:
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)


def test_lab_command_parses() -> None:
    r = subprocess.run([str(REPO / "scripts" / "vagrant-lab"), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "powerloss" in r.stdout


def test_box_packages_cover_setup_sh() -> None:
    """Everything scripts/setup.sh installs is in the box (the VMs cannot install), plus nbd-client."""
    setup = (REPO / "scripts" / "setup.sh").read_text()
    wanted = re.search(r"apt_packages=\(([^)]*)\)", setup).group(1).split()
    box = {line.strip() for line in (VAGRANT / "box" / "packages.txt").read_text().splitlines()
           if line.strip() and not line.startswith("#")}
    assert set(wanted) <= box, set(wanted) - box
    assert "nbd-client" in box and "linux-image-amd64" in box and "openssh-server" in box


def test_nbd_client_arguments_for_tcp_and_unix() -> None:
    assert attach._nbd_client_server("nbd://192.168.56.10:10809/app") == ["192.168.56.10", "10809"]
    assert attach._nbd_client_server("nbd+unix:///app?socket=/x/nbd.sock") == ["-unix", "/x/nbd.sock"]
    assert attach._nbd_client_server("nbds://rcopy@h:1/app?tls-psk-file=/k") is None  # TLS: nbdfuse


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is not installed (apt-get install vagrant)")
def test_vagrant_validate() -> None:
    r = subprocess.run(["vagrant", "validate"], cwd=VAGRANT, capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(Path.home()),
                            "VAGRANT_CHECKPOINT_DISABLE": "1", "RCOPY_LIBVIRT_DRIVER": "qemu"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout
