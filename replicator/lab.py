"""``rcopy lab up|down``: a complete three-site lab on this machine (CLI.md, "The lab").

Nodes site-a1 and site-a2 (the local site's old and new systems) and site-b (the
remote site), volumes v1/v2/v3, the pair site-a1:v1 -> site-b:v3, a virtual
volume ``app`` on site-a1:v1 attached as a local block device. ``lab down``
undoes all of it, also after a failed ``lab up``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any, Callable

from . import keys, netlab, process
from .cluster import Cluster, Endpoint, dump, load
from .errors import RcopyError, UsageError
from .terminal import Terminal

NODES = ("site-a1", "site-a2", "site-b")
VOLUMES = {"site-a1": "v1", "site-a2": "v2", "site-b": "v3"}
VVOL = "app"
LAB_MARK = ".rcopy-lab"


PORTS_BELOW_EPHEMERAL = 10000       # the lab's listening ports come from this many below that range


def free_port(taken: set[int] | frozenset[int] = frozenset()) -> int:
    """A port free to listen on now, below the kernel's range for outgoing connections, and not in
    ``taken`` (the ports already given to the lab's other daemons, not listened on yet: a port is
    only tried and let go here, so without this two daemons could get the same one). The lab
    picks its ports before it starts its daemons; a port from that range (what binding port 0
    gives) could be taken meanwhile by an outgoing connection (a ping of a node just started),
    and the daemon that was to listen on it would exit at start-up."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rnd, start = random.SystemRandom(), max(1024, low - PORTS_BELOW_EPHEMERAL)
    for _ in range(200 if start < low else 0):
        port = rnd.randrange(start, low)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue        # a listener has it (or a connection is still closing on it)
            return port
    while True:                 # a crowded (or no) range below: the kernel's pick, as before
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


def make_cluster(lab_dir: Path, tls: bool = False, net: netlab.NetLab | None = None) -> Cluster:
    """The lab's cluster file; with ``net`` every daemon listens on its namespace's address."""
    cluster = Cluster(path=lab_dir / "cluster.toml", dir=lab_dir, keys=keys.generate(lab_dir / "keys"))
    taken: set[int] = set()

    def port() -> int:
        """A port no other daemon of this lab has."""
        p = free_port(taken)
        taken.add(p)
        return p

    def addr(name: str) -> tuple[str, str | None]:
        site = net.sites.get(name) if net else None
        return (site.address, site.netns) if site else ("127.0.0.1", None)
    for name in NODES:
        state = lab_dir / name
        host, ns = addr(name)
        cluster.nodes[name] = Endpoint(name, "node", f"tcp://{host}:{port()}", str(state / "nbd.sock"),
                                       state, netns=ns, metrics=f"{host}:{port()}")
    state = lab_dir / "host"
    psk = str(keys.generate_tls_psk(lab_dir / "keys")) if tls else None
    host, ns = addr("host")
    cluster.vvol_servers["host"] = Endpoint("host", "vvol_server", f"tcp://{host}:{port()}",
                                            str(state / "nbd.sock"), state, netns=ns, tls_psk=psk)
    return cluster


def up(lab_dir: Path, mode: str = "async", size: int = 1 << 30, netns: bool = False, tls: bool = False,
       progress: Callable[[str], None] = lambda s: None, wan_rate: str = netlab.DEFAULT_RATE,
       wan_delay_ms: float | None = None) -> dict[str, Any]:
    """Build the lab; on any failure tear down what was built and re-raise.

    ``netns``: each site in its own network namespace, site-b behind a WAN link
    limited to ``wan_rate`` and, with ``wan_delay_ms``, that much one-way latency (netlab.py).
    """
    lab_dir = lab_dir.resolve()
    if (lab_dir / "cluster.toml").exists():
        raise RcopyError(f"a lab already exists in {lab_dir}; run rcopy lab down --dir {lab_dir} first")
    if netns:
        netlab.parse_rate(wan_rate)  # a bad rate or delay is a usage error before anything is built
        netlab.check_delay(wan_delay_ms)
    elif wan_delay_ms is not None:
        raise UsageError("--wan-delay needs --netns (the WAN link exists only in the namespace lab)")
    lab_dir.mkdir(parents=True, exist_ok=True)
    (lab_dir / LAB_MARK).write_text("made by rcopy lab up\n")
    net = None
    try:
        if netns:
            delay = f", {wan_delay_ms:g} ms one way" if wan_delay_ms is not None else ""
            progress(f"creating network namespaces (WAN {wan_rate}{delay})")
            net = netlab.setup(lab_dir, local=["host", "site-a1", "site-a2"], remote="site-b", rate=wan_rate,
                               delay_ms=wan_delay_ms)
        cluster = make_cluster(lab_dir, tls=tls, net=net)
        cluster.path.write_text(dump(cluster))
        term = Terminal(cluster)
        for name in [*NODES, "host"]:
            progress(f"starting {name}")
            term.node_start(name)
        for node, vol in VOLUMES.items():
            term.volume_create(f"{node}:{vol}", size)
        progress(f"pair site-a1:v1 -> site-b:v3 ({mode}), initial copy")
        term.pair_create("site-a1:v1", "site-b:v3", mode=mode, group="g0")
        term.wait_duplex("site-a1:v1", timeout_s=600)
        term.vvol_create(VVOL, "site-a1:v1")
        progress("attaching the virtual volume")
        device = term.attach(VVOL)
    except BaseException:
        down(lab_dir)
        raise
    return {"cluster": str(cluster.path), "device": device, "nodes": list(NODES), "vvol": VVOL,
            "mode": mode, "size": size, "dir": str(lab_dir),
            "volumes": [f"{n}:{v}" for n, v in VOLUMES.items()], "tls": tls,
            "netns": netlab.wan_status(lab_dir) if net else None}


def down(lab_dir: Path) -> dict[str, Any]:
    """Stop everything a lab in ``lab_dir`` started and delete its files."""
    lab_dir = lab_dir.resolve()
    report: dict[str, Any] = {"dir": str(lab_dir), "detached": [], "stopped": []}
    if not lab_dir.exists():
        return report
    if not (lab_dir / LAB_MARK).exists():
        raise RcopyError(f"{lab_dir} was not made by rcopy lab up; not touching it")
    from . import attach
    for a in attach.attached(lab_dir):
        unmount_device(a.get("device"))
        attach.detach(a["name"], lab_dir)
        report["detached"].append(a["name"])
    try:
        cluster = load(lab_dir / "cluster.toml")
        daemons = [*cluster.vvol_servers.values(), *cluster.nodes.values()]
    except RcopyError:
        daemons = []
    for ep in daemons:
        pid = process.read_pid(str(ep.pidfile))
        if process.alive(pid):  # one paused by rcopy fault pause would not see SIGTERM
            try:
                os.kill(pid, signal.SIGCONT)  # type: ignore[arg-type]
            except ProcessLookupError:
                pass
        if process.stop_pid(pid):
            report["stopped"].append(ep.name)
    report["namespaces"] = netlab.teardown(lab_dir)["namespaces"]
    for mnt in attach.mounts_under(lab_dir):  # e.g. a FUSE mount whose nbdfuse died
        subprocess.run(["umount", "-l", mnt], check=False, timeout=60)
    shutil.rmtree(lab_dir, ignore_errors=True)
    return report


def unmount_device(device: str | None) -> None:
    """Unmount every mount of ``device`` (a user may have mounted the lab's disk)."""
    if not device:
        return
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return
    for line in reversed(mounts):
        fields = line.split()
        if fields and fields[0] == device:
            subprocess.run(["umount", "-l", fields[1]], check=False, timeout=60)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2)
