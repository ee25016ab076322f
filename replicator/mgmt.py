"""Volume management information (SPEC 3, Fig. 4a/23) and its atomic persistence.

One ``VolumeInfo`` per volume of a node; ``GroupInfo`` per consistency group the
node receives for (the secondary's applied pointer, SPEC 2.7 ``latest_seq_no``).
The whole record is one JSON file rewritten atomically (temp, fsync, rename).
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import IntegrityError, UsageError

NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
def check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not name or set(name) - NAME_OK or name[0] == ".":
        raise UsageError(f"invalid {kind} name {name!r} (letters, digits, - _ . only)")
    return name


@dataclass
class PeerVolume:
    """A copy-source / copy-dest / migration entry: which node and volume, and how to reach it."""

    node: str
    control: str
    volume: str

    @property
    def label(self) -> str:
        return f"{self.node}:{self.volume}"


@dataclass
class VolumeInfo:
    """One volume's management information (field names from SPEC 3)."""

    name: str
    size: int
    remote_copy_flag: str = "off"          # off / source / dest
    mode: str = ""                         # sync / async (for a pair)
    group: str = ""                        # consistency group (sequence management instance)
    transfer: str = "push"                 # push / pull (async)
    pair_state: str = ""                   # copying / duplex / suspended (source side)
    suspend_reason: str = ""
    auto_resume: bool = True               # resync by itself once the secondary is back
    copy_dest_info: PeerVolume | None = None
    copy_source_info: list[PeerVolume] = field(default_factory=list)
    copy_source_valid: str = "1"
    consistent: bool = True                # dest: False while a (re)sync is running
    copy_epoch: int = 0                    # raised by each resync; older pair.writes are stale
    rw_mode: str = "normal"
    migration_source_info: PeerVolume | None = None
    migration_dest_info: PeerVolume | None = None
    migration: dict[str, Any] = field(default_factory=dict)  # migration bookkeeping

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VolumeInfo":
        d = dict(d)
        for key in ("copy_dest_info", "migration_source_info", "migration_dest_info"):
            if d.get(key):
                d[key] = PeerVolume(**d[key])
        d["copy_source_info"] = [PeerVolume(**p) for p in d.get("copy_source_info", [])]
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def role(self) -> str:
        if self.remote_copy_flag == "source":
            return "primary"
        if self.remote_copy_flag == "dest":
            return "secondary"
        return "simplex"


@dataclass
class GroupInfo:
    """Per consistency group state at a secondary (and the group's sources)."""

    name: str
    mode: str = "async"
    applied: int = 0          # latest_seq_no: highest sequence number applied
    handover_seq: int = 0     # N0 while transitional: V1 sends < N0, V2 sends >= N0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GroupInfo":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


class ManagementStore:
    """The node's management information file (``node.json``), rewritten atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.volumes: dict[str, VolumeInfo] = {}
        self.groups: dict[str, GroupInfo] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            self.volumes = {n: VolumeInfo.from_dict(v) for n, v in data.get("volumes", {}).items()}
            self.groups = {n: GroupInfo.from_dict(g) for n, g in data.get("groups", {}).items()}
        except (ValueError, TypeError, KeyError) as exc:
            raise IntegrityError(f"management information {self.path} is corrupt: {exc}") from None

    def save(self) -> None:
        with self.lock:
            data = {"version": 1,
                    "volumes": {n: asdict(v) for n, v in self.volumes.items()},
                    "groups": {n: asdict(g) for n, g in self.groups.items()}}
            atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True).encode())


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
