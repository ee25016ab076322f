"""The cluster file (TOML): every storage node and virtual-volume server by name.

    dir = "/abs/lab"                      # attachments live here
    keys = "/abs/lab/keys"                # optional: CURVE keys (rcopy keys), see keys.py
    [nodes.site-a1]
    control = "tcp://127.0.0.1:7101"      # ZeroMQ control endpoint
    nbd = "/abs/lab/site-a1/nbd.sock"     # NBD endpoint: Unix socket or host:port
    state = "/abs/lab/site-a1"            # state directory
    [vvol_servers.host]
    control = "tcp://127.0.0.1:7201"
    nbd = "/abs/lab/host/nbd.sock"
    state = "/abs/lab/host"
    tls_psk = "/abs/lab/keys/nbd-tls.psk"  # optional: hosts must use NBD over TLS

Found by ``--cluster FILE``, else ``$RCOPY_CLUSTER``, else ``./cluster.toml``.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import NotFound, UsageError

TLS_USERNAME = "rcopy"


@dataclass(frozen=True)
class Endpoint:
    """One daemon of the cluster: a storage node or a virtual-volume server."""

    name: str
    kind: str  # "node" or "vvol_server"
    control: str
    nbd: str
    state: Path
    netns: str | None = None
    metrics: str | None = None  # host:port of the Prometheus endpoint (nodes only)
    tls_psk: str | None = None  # PSK file: this daemon serves NBD only over TLS (vvol servers)

    def nbd_uri(self, export: str) -> str:
        """libnbd URI of one export of this daemon."""
        if self.tls_psk:  # the PSK identity is the URI's user name
            if self.nbd.startswith("/"):
                return f"nbds+unix://{TLS_USERNAME}@/{export}?socket={self.nbd}&tls-psk-file={self.tls_psk}"
            return f"nbds://{TLS_USERNAME}@{self.nbd}/{export}?tls-psk-file={self.tls_psk}"
        if self.nbd.startswith("/"):
            return f"nbd+unix:///{export}?socket={self.nbd}"
        return f"nbd://{self.nbd}/{export}"

    @property
    def pidfile(self) -> Path:
        return self.state / "nbdkit.pid"

    @property
    def logfile(self) -> Path:
        return self.state / "nbdkit.log"


@dataclass
class Cluster:
    path: Path
    dir: Path
    keys: Path | None = None  # CURVE keys directory (keys.py); None = no authentication
    nodes: dict[str, Endpoint] = field(default_factory=dict)
    vvol_servers: dict[str, Endpoint] = field(default_factory=dict)

    def node(self, name: str) -> Endpoint:
        try:
            return self.nodes[name]
        except KeyError:
            known = ", ".join(sorted(self.nodes)) or "none"
            raise NotFound(f"no storage node {name!r} in {self.path} (known: {known})") from None

    def daemon(self, name: str) -> Endpoint:
        """A node or a virtual-volume server by name."""
        if name in self.nodes:
            return self.nodes[name]
        if name in self.vvol_servers:
            return self.vvol_servers[name]
        known = ", ".join(sorted([*self.nodes, *self.vvol_servers])) or "none"
        raise NotFound(f"no node or vvol server {name!r} in {self.path} (known: {known})")

    def vvol_server(self) -> Endpoint:
        if not self.vvol_servers:
            raise NotFound(f"{self.path} defines no [vvol_servers.NAME] section")
        return next(iter(self.vvol_servers.values()))

    def by_control(self, control: str) -> Endpoint | None:
        for ep in [*self.nodes.values(), *self.vvol_servers.values()]:
            if ep.control == control:
                return ep
        return None


def find_cluster_file(explicit: str | None) -> Path:
    path = Path(explicit or os.environ.get("RCOPY_CLUSTER") or "cluster.toml")
    if not path.is_file():
        raise UsageError(f"cluster file {path} not found (use --cluster FILE or set RCOPY_CLUSTER)")
    return path.resolve()


def load(path: Path) -> Cluster:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read cluster file {path}: {exc}") from None
    base = path.parent
    cluster = Cluster(path=path, dir=Path(data.get("dir", base)),
                      keys=Path(data["keys"]) if data.get("keys") else None)
    for section, kind, target in (("nodes", "node", cluster.nodes),
                                  ("vvol_servers", "vvol_server", cluster.vvol_servers)):
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise UsageError(f"{path}: [{section}] must be a table")
        for name, entry in table.items():
            if not isinstance(entry, dict):
                raise UsageError(f"{path}: [{section}.{name}] must be a table")
            missing = [k for k in ("control", "nbd", "state") if k not in entry]
            if missing:
                raise UsageError(f"{path}: [{section}.{name}] lacks {', '.join(missing)}")
            target[name] = Endpoint(name=name, kind=kind, control=str(entry["control"]),
                                    nbd=str(entry["nbd"]), state=Path(entry["state"]),
                                    netns=entry.get("netns"), metrics=entry.get("metrics"),
                                    tls_psk=entry.get("tls_psk"))
    if not cluster.nodes:
        raise UsageError(f"{path} defines no storage nodes ([nodes.NAME])")
    return cluster


def dump(cluster: Cluster) -> str:
    """Cluster -> TOML text (the subset this file format uses)."""
    def q(s: object) -> str:
        return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'
    lines = ["# rcopy cluster file", f"dir = {q(cluster.dir)}"]
    if cluster.keys:
        lines.append(f"keys = {q(cluster.keys)}")
    lines.append("")
    for section, table in (("nodes", cluster.nodes), ("vvol_servers", cluster.vvol_servers)):
        for name, ep in table.items():
            lines.append(f"[{section}.{q(name)}]")
            lines += [f"control = {q(ep.control)}", f"nbd = {q(ep.nbd)}", f"state = {q(ep.state)}"]
            if ep.netns:
                lines.append(f"netns = {q(ep.netns)}")
            if ep.metrics:
                lines.append(f"metrics = {q(ep.metrics)}")
            if ep.tls_psk:
                lines.append(f"tls_psk = {q(ep.tls_psk)}")
            lines.append("")
    return "\n".join(lines)


def parse_volume(spec: str) -> tuple[str, str]:
    """``NODE:VOLUME`` -> (node, volume)."""
    node, sep, vol = spec.partition(":")
    if not sep or not node or not vol or "/" in vol or ":" in vol:
        raise UsageError(f"volume must be NODE:VOLUME, got {spec!r}")
    return node, vol


SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``512M`` / ``4G`` / ``1048576`` -> bytes (multiple of 512)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in SIZE_UNITS and not t[-1:].isdigit() else ""
    number = t[: len(t) - len(unit)]
    try:
        value = int(float(number) * SIZE_UNITS[unit])
    except ValueError:
        raise UsageError(f"invalid size {text!r} (examples: 512M, 4G)") from None
    if value <= 0 or value % 512:
        raise UsageError(f"size must be a positive multiple of 512 bytes, got {text!r}")
    return value
