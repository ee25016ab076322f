"""tests/vm: the Vagrant lab for real (scripts/vagrant-lab): VMs under libvirt in a network
namespace. Skipped, with the reason on one line, where this machine cannot boot them."""
from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path


def vm_skip_reason() -> str | None:
    """Why the VM tests cannot run here, or None."""
    if os.environ.get("RCOPY_SKIP_VM") == "1":
        return "RCOPY_SKIP_VM=1"
    if os.geteuid() != 0:
        return "needs root (libvirtd, network namespaces)"
    if platform.machine() != "x86_64":
        return f"needs an x86_64 machine (this is {platform.machine()})"
    if not Path("/etc/debian_version").exists() or shutil.which("apt-get") is None:
        return "needs Debian (the lab installs qemu, libvirt and vagrant with apt-get)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip netns)"
    mem_kib = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal:")), 0)
    if mem_kib < 6 * 1024 * 1024:
        return f"needs 6 GiB of memory for the VMs (this machine has {mem_kib // 1024} MiB)"
    if not Path("/run/netns").exists() and not os.access("/run", os.W_OK):
        return "cannot create network namespaces (/run is not writable)"
    return None
