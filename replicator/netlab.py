"""The lab's network (``rcopy lab up --netns``) and the faults ``rcopy fault`` injects.

One network namespace per site, named ``rcopy-ID-SITE`` (ID: 4 hex digits, unique
per lab), plus a switch namespace ``rcopy-ID-sw`` that routes between them::

    root ns (rcopy CLI) ---veth--+
    rcopy-ID-host (vvol) --veth--+-- br0 [rcopy-ID-sw] --wan0 (tbf) == wan0 (tbf)-- [rcopy-ID-b]
    rcopy-ID-a1 ---------veth----+          LAN 10.231.2k.0/24         WAN 10.231.2k+1.0/24
    rcopy-ID-a2 ---------veth----+

IP forwarding is switched on only inside the switch namespace; the root namespace
gets one veth with a LAN address and a route to the WAN subnet through the switch.
Everything created is recorded in ``LABDIR/netlab.json`` (before it is created), so
``teardown`` removes exactly that, idempotently, also after a partial ``setup``.
No traffic leaves these namespaces and that one root-namespace veth.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import process
from .cluster import load
from .errors import NotFound, RcopyError, StateError, UsageError
from .files import atomic_write

RECORD = "netlab.json"
LOCK = Path("/run/rcopy-netlab.lock")
NETNS_DIR = Path("/run/netns")
DEFAULT_RATE = "200mbit"
SWITCH = "sw"
WAN_DEV = "wan0"
DELAY_FILE, DELAY_PID, DELAY_LOG = "wan-delay-ms", "delaylink.pid", "delaylink.log"


class NetworkError(RcopyError):
    """An ``ip`` or ``tc`` command of the lab network failed."""


@dataclass
class Site:
    netns: str
    address: str
    remote: bool = False


@dataclass
class NetLab:
    """The lab network as recorded in ``netlab.json``."""

    id: str
    lan: str  # 10.231.N  (a /24 prefix, without the last octet)
    wan: str
    rate: str
    sites: dict[str, Site] = field(default_factory=dict)  # daemon name -> namespace and address
    namespaces: list[str] = field(default_factory=list)    # every namespace, in creation order
    root_link: str = ""                                     # the one veth end in the root namespace
    cut: bool = False
    delay_ms: float | None = None  # None: a plain veth WAN link; else TUN devices + delaylink

    @property
    def switch(self) -> str:
        return f"rcopy-{self.id}-{SWITCH}"

    @property
    def remote(self) -> Site:
        return next(s for s in self.sites.values() if s.remote)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetLab:
        sites = {k: Site(**v) for k, v in data.pop("sites", {}).items()}
        return cls(sites=sites, **data)


# ---------------------------------------------------------------------- helpers
def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run ``ip [-n NS] ARGS``; NetworkError with its stderr on failure."""
    return _run(["ip", *(["-n", netns] if netns else []), *args], check)


def tc(*args: str, netns: str | None = None, check: bool = True) -> str:
    return _run(["tc", *(["-n", netns] if netns else []), *args], check)


def _run(argv: list[str], check: bool) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkError(f"{' '.join(argv)}: {exc}") from None
    if check and r.returncode != 0:
        raise NetworkError(f"{' '.join(argv)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def link_exists(name: str, netns: str | None = None) -> bool:
    return subprocess.run(["ip", *(["-n", netns] if netns else []), "link", "show", "dev", name],
                          capture_output=True, timeout=30).returncode == 0


def load_record(lab_dir: Path) -> NetLab | None:
    path = Path(lab_dir) / RECORD
    try:
        return NetLab.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise NetworkError(f"cannot read {path}: {exc}") from None


def _save(lab_dir: Path, net: NetLab) -> None:
    path = Path(lab_dir) / RECORD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(net.to_json(), indent=2))
    os.replace(tmp, path)


def _need(lab_dir: Path) -> NetLab:
    net = load_record(lab_dir)
    if net is None:
        raise NotFound(f"{Path(lab_dir).resolve()} has no lab network (start the lab with rcopy lab up --netns)")
    return net


class _Lock:
    """A host-wide lock, so two labs set up at once never pick the same ID or subnet."""

    def __enter__(self) -> None:
        self.fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)([kmgt]?)(bit|bps)?$")


def parse_rate(text: str) -> int:
    """tc-style rate (``200mbit``, ``10mbit``, ``5mbps``, ``800kbit``) -> bits per second."""
    m = RATE_RE.match(text.strip().lower())
    if not m:
        raise UsageError(f"invalid rate {text!r} (examples: 200mbit, 10mbit, 500kbit, 5mbps)")
    bits = float(m[1]) * 1000 ** "_kmgt".index(m[2] or "_") * (8 if m[3] == "bps" else 1)
    if bits < 8000:
        raise UsageError(f"rate {text!r} is too low (at least 8kbit)")
    return int(bits)


def _shape(netns: str, dev: str, rate_bits: int) -> None:
    """tbf on ``dev``: bursts of 10 ms of traffic (at least 16 KiB), a queue of 100 ms."""
    burst = max(rate_bits // 8 // 100, 16384)
    tc("qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_bits}bit", "burst", str(burst),
       "latency", "100ms", netns=netns)


def _pick() -> tuple[str, int]:
    """A fresh lab ID and subnet index k (LAN 10.231.2k, WAN 10.231.2k+1), unused on this machine."""
    used = ip("-4", "-o", "addr", "show") + ip("-4", "route", "show")
    for _ in range(100):
        lab_id = secrets.token_hex(2)
        if not any(p.name.startswith(f"rcopy-{lab_id}-") for p in _netns_list()) \
                and not link_exists(f"rc{lab_id}"):
            break
    else:  # pragma: no cover - 65536 IDs
        raise NetworkError("no free lab network ID")
    for k in range(128):
        if f"10.231.{2 * k}." not in used and f"10.231.{2 * k + 1}." not in used:
            return lab_id, k
    raise NetworkError("no free 10.231.x.0/24 subnet pair for another lab network")


def _netns_list() -> list[Path]:
    return list(NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []


# ---------------------------------------------------------------------- setup and teardown
def setup(lab_dir: Path, local: Sequence[str] = ("host", "site-a1", "site-a2"), remote: str = "site-b",
          rate: str = DEFAULT_RATE, delay_ms: float | None = None) -> NetLab:
    """Create the namespaces, the local-site switch and the WAN link for daemons ``local`` + ``remote``.

    ``delay_ms`` (0 or more): the WAN link gets that one-way latency (delaylink.py), which
    ``delay`` can change later.
    """
    lab_dir = Path(lab_dir)
    rate_bits = parse_rate(rate)
    check_delay(delay_ms)
    if (lab_dir / RECORD).exists():
        raise StateError(f"{lab_dir} already has a lab network; run rcopy lab down --dir {lab_dir} first")
    lab_dir.mkdir(parents=True, exist_ok=True)
    with _Lock():
        lab_id, k = _pick()
        lan, wan = f"10.231.{2 * k}", f"10.231.{2 * k + 1}"
        net = NetLab(id=lab_id, lan=lan, wan=wan, rate=f"{rate_bits}bit", root_link=f"rc{lab_id}",
                     delay_ms=delay_ms)
        for i, name in enumerate(local):
            net.sites[name] = Site(f"rcopy-{lab_id}-{_short(name)}", f"{lan}.{10 + i}")
        net.sites[remote] = Site(f"rcopy-{lab_id}-{_short(remote)}", f"{wan}.2", remote=True)
        net.namespaces = [net.switch, *(s.netns for s in net.sites.values())]
        if len(set(net.namespaces)) != len(net.namespaces):
            raise UsageError(f"site names {[*local, remote]} give clashing namespace names")
        _save(lab_dir, net)  # record first: teardown undoes a partial setup
        try:
            _build(net, rate_bits, lab_dir)
        except BaseException:
            teardown(lab_dir)
            raise
    return net


def check_delay(delay_ms: float | None) -> None:
    if delay_ms is not None and not 0 <= delay_ms <= 10_000:
        raise UsageError(f"WAN delay {delay_ms:g} ms: give 0 to 10000 ms (one way)")


def _build(net: NetLab, rate_bits: int, lab_dir: Path) -> None:
    lan, wan = net.lan, net.wan
    for ns in net.namespaces:
        ip("netns", "add", ns)
        ip("link", "set", "lo", "up", netns=ns)
    sw = net.switch
    _run(["ip", "netns", "exec", sw, "sysctl", "-qw", "net.ipv4.ip_forward=1"], True)
    ip("link", "add", "br0", "type", "bridge", netns=sw)
    ip("addr", "add", f"{lan}.1/24", "dev", "br0", netns=sw)
    ip("link", "set", "br0", "up", netns=sw)
    # the root namespace (where rcopy runs) joins the bridge and routes the WAN subnet via it
    ip("link", "add", net.root_link, "type", "veth", "peer", "name", "root0", "netns", sw)
    ip("link", "set", "root0", "master", "br0", "up", netns=sw)
    ip("addr", "add", f"{lan}.254/24", "dev", net.root_link)
    ip("link", "set", net.root_link, "up")
    ip("route", "add", f"{wan}.0/24", "via", f"{lan}.1", "dev", net.root_link)
    for name, site in net.sites.items():
        if site.remote:
            continue
        port = f"p-{_short(name)}"[:15]
        ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", site.netns, netns=sw)
        ip("link", "set", port, "master", "br0", "up", netns=sw)
        ip("addr", "add", f"{site.address}/24", "dev", "eth0", netns=site.netns)
        ip("link", "set", "eth0", "up", netns=site.netns)
        ip("route", "add", "default", "via", f"{lan}.1", netns=site.netns)
    b = net.remote.netns
    if net.delay_ms is None:
        ip("link", "add", WAN_DEV, "type", "veth", "peer", "name", WAN_DEV, "netns", b, netns=sw)
    else:
        _start_delay_line(net, lab_dir)
    ip("addr", "add", f"{wan}.1/24", "dev", WAN_DEV, netns=sw)
    ip("addr", "add", f"{wan}.2/24", "dev", WAN_DEV, netns=b)
    for ns in (sw, b):
        _shape(ns, WAN_DEV, rate_bits)
        ip("link", "set", WAN_DEV, "up", netns=ns)
    ip("route", "add", "default", "via", f"{wan}.1", netns=b)


def _start_delay_line(net: NetLab, lab_dir: Path) -> None:
    """The WAN link as a TUN device at each end and a delaylink process between them."""
    for ns in (net.switch, net.remote.netns):
        ip("tuntap", "add", "dev", WAN_DEV, "mode", "tun", netns=ns)
    (lab_dir / DELAY_FILE).write_text(f"{net.delay_ms:g}\n")
    pidfile = lab_dir / DELAY_PID
    pidfile.unlink(missing_ok=True)
    with open(lab_dir / DELAY_LOG, "ab") as log:
        proc = subprocess.Popen(
            [process.python_executable(), "-m", "replicator.delaylink", net.switch, net.remote.netns,
             WAN_DEV, str(lab_dir / DELAY_FILE), str(pidfile)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            env=dict(os.environ, PYTHONPATH=process.python_path()))
    try:
        process.wait_until(lambda: pidfile.exists() or proc.poll() is not None, 30, "the WAN delay line")
    except RcopyError:
        proc.kill()
        raise
    if proc.poll() is not None:
        raise NetworkError(f"the WAN delay line failed (exit {proc.returncode}): "
                           + process.tail(str(lab_dir / DELAY_LOG)))


def delay(lab_dir: Path, delay_ms: float) -> dict[str, Any]:
    """Change the WAN link's one-way latency (a lab started with ``--wan-delay``)."""
    net = _need(lab_dir)
    check_delay(delay_ms)
    if net.delay_ms is None:
        raise StateError(f"the WAN link of lab {net.id} has no delay line; start the lab with "
                         f"--netns --wan-delay MS (0 is fine) to change its latency later")
    if not process.alive(process.read_pid(str(Path(lab_dir) / DELAY_PID))):
        raise StateError(f"the WAN delay line of lab {net.id} is not running "
                         f"(see {Path(lab_dir) / DELAY_LOG}); run rcopy lab down")
    atomic_write(Path(lab_dir) / DELAY_FILE, f"{delay_ms:g}\n".encode())
    net.delay_ms = delay_ms
    _save(lab_dir, net)
    return wan_status(lab_dir)


def _short(name: str) -> str:
    return name.removeprefix("site-")


def teardown(lab_dir: Path) -> dict[str, Any]:
    """Remove what ``netlab.json`` records (processes left in its namespaces, namespaces, veths)."""
    net = load_record(lab_dir)
    report: dict[str, Any] = {"namespaces": [], "killed": []}
    if net is None:
        return report
    if net.delay_ms is not None:
        process.stop_pid(process.read_pid(str(Path(lab_dir) / DELAY_PID)), timeout_s=2)
    for ns in net.namespaces:
        report["killed"] += _kill_namespace(ns)
    for ns in net.namespaces:
        if netns_exists(ns):
            ip("netns", "del", ns)
            report["namespaces"].append(ns)
    if net.root_link and link_exists(net.root_link):
        ip("link", "del", net.root_link, check=False)  # usually already gone with its peer
    (Path(lab_dir) / RECORD).unlink(missing_ok=True)
    return report


def _kill_namespace(ns: str) -> list[int]:
    """SIGKILL processes still inside one of the lab's own namespaces (normally none)."""
    if not netns_exists(ns):
        return []
    pids = [int(p) for p in ip("netns", "pids", ns, check=False).split() if p.isdigit()]
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    while any(process.alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


# ---------------------------------------------------------------------- faults
def cut(lab_dir: Path) -> dict[str, Any]:
    """Take the WAN link down (both ends): the local site and site-b lose each other."""
    net = _need(lab_dir)
    for ns in _wan_ends(net):
        ip("link", "set", WAN_DEV, "down", netns=ns)
    net.cut = True
    _save(lab_dir, net)
    return wan_status(lab_dir)


def heal(lab_dir: Path) -> dict[str, Any]:
    """Bring the WAN link back up and restore its routes."""
    net = _need(lab_dir)
    for ns in _wan_ends(net):
        ip("link", "set", WAN_DEV, "up", netns=ns)
    ip("route", "replace", "default", "via", f"{net.wan}.1", netns=net.remote.netns)
    net.cut = False
    _save(lab_dir, net)
    return wan_status(lab_dir)


def throttle(lab_dir: Path, rate: str) -> dict[str, Any]:
    """Change the WAN rate limit (tbf on both ends)."""
    net = _need(lab_dir)
    bits = parse_rate(rate)
    for ns in _wan_ends(net):
        _shape(ns, WAN_DEV, bits)
    net.rate = f"{bits}bit"
    _save(lab_dir, net)
    return wan_status(lab_dir)


def wan_status(lab_dir: Path) -> dict[str, Any]:
    """The WAN link as the kernel sees it: up or down, and its qdisc."""
    net = _need(lab_dir)
    link = json.loads(ip("-j", "link", "show", "dev", WAN_DEV, netns=net.switch))[0]
    qdisc = tc("qdisc", "show", "dev", WAN_DEV, netns=net.switch).strip()
    return {"id": net.id, "wan": "down" if "UP" not in link.get("flags", []) else "up",
            "rate": net.rate, "delay_ms": net.delay_ms or 0, "qdisc": qdisc, "namespaces": net.namespaces,
            "addresses": {n: s.address for n, s in net.sites.items()}}


def _wan_ends(net: NetLab) -> Iterator[str]:
    for ns in (net.switch, net.remote.netns):
        if not netns_exists(ns):
            raise NetworkError(f"namespace {ns} of lab network {net.id} is gone; run rcopy lab down")
        yield ns


SIGNALS = {"kill": signal.SIGKILL, "pause": signal.SIGSTOP, "resume": signal.SIGCONT}


def signal_node(cluster_file: Path, node: str, action: str) -> dict[str, Any]:
    """``kill`` (SIGKILL), ``pause`` (SIGSTOP) or ``resume`` (SIGCONT) a daemon by its PID file."""
    if action not in SIGNALS:
        raise UsageError(f"unknown fault {action!r} (kill, pause, resume)")
    ep = load(Path(cluster_file)).daemon(node)
    pid = process.read_pid(str(ep.pidfile))
    if not process.alive(pid):
        raise StateError(f"{node} is not running (no live process in {ep.pidfile})")
    assert pid is not None
    os.kill(pid, SIGNALS[action])
    if action == "kill":
        process.wait_until(lambda: not process.alive(pid), 10, f"{node} (pid {pid}) to die")
    return {"node": node, "pid": pid, "fault": action, "signal": SIGNALS[action].name}
