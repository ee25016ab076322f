"""Volume management information (SPEC 3, Fig. 4a/23) and migration records, as typed values.

These are what a node persists in its management information file (one JSON
record, replaced atomically by the driver on ``SaveMgmt``). Field names follow
the SPEC. Nothing here does I/O; ``to_dict``/``from_dict`` are for the driver.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import UsageError
from . import tables as T

NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not name or set(name) - NAME_OK or name[0] == "." or len(name) > 128:
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

    def names(self, node: str, volume: str = "") -> bool:
        """Is this ``node`` (and ``volume``, if given: two sources may share a node)?"""
        return self.node == node and (not volume or self.volume == volume)

    @classmethod
    def of(cls, d: Any) -> "PeerVolume":
        if isinstance(d, PeerVolume):
            return d
        if not isinstance(d, dict):
            raise UsageError(f"a volume entry must be an object, not {d!r}")
        return cls(str(d["node"]), str(d["control"]), str(d["volume"]))


def _load(cls: Any, d: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class VolumeInfo:
    """One volume's management information (field names from SPEC 3)."""

    name: str
    size: int
    remote_copy_flag: str = "off"          # off / source / dest
    mode: str = ""                         # sync / async (for a pair)
    group: str = ""                        # consistency group (sequence management instance)
    transfer: str = "push"                 # push / pull (async)
    pair_state: str = T.OFF                # copying / duplex / suspended (source side)
    suspend_reason: str = ""
    auto_resume: bool = True               # resync by itself once the secondary is back
    copy_dest_info: PeerVolume | None = None
    copy_source_info: list[PeerVolume] = field(default_factory=list)
    copy_source_valid: str = T.SOURCE_1
    consistent: bool = True                # dest: False while a (re)sync is running
    copy_epoch: int = 0                    # raised by each resync; older copy messages are stale
    diff_block_bytes: int = 0              # diff_bitmap: one bit per this many bytes (0: per region)
    rw_mode: str = T.NORMAL
    migration_source_info: PeerVolume | None = None
    migration_dest_info: PeerVolume | None = None
    migration: str = ""                    # id of the migration this volume takes part in

    @property
    def role(self) -> str:
        return {"source": "primary", "dest": "secondary"}.get(self.remote_copy_flag, "simplex")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VolumeInfo":
        d = dict(d)
        for key in ("copy_dest_info", "migration_source_info", "migration_dest_info"):
            d[key] = PeerVolume.of(d[key]) if d.get(key) else None
        d["copy_source_info"] = [PeerVolume.of(p) for p in d.get("copy_source_info", [])]
        if not isinstance(d.get("migration", ""), str):
            d["migration"] = ""  # an older record's dict: dropped, migrations are records of their own
        return _load(cls, d)


@dataclass
class DestGroupInfo:
    """A consistency group at its secondary: the handover number while transitional."""

    name: str
    reorder_bytes: int = 0                 # this group's reorder buffer limit (0: the node's default)
    handover_seq: int = 0                  # N0: V1 sends < N0, V2 sends >= N0
    consistent_at: int | None = None       # consistent again once applied >= this (None: nothing pending)
    resyncing: list[str] = field(default_factory=list)   # members whose (re)sync is not done yet
    done_at: dict[str, int] = field(default_factory=dict)  # member -> consistent_at its last resync_done said

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DestGroupInfo":
        return _load(cls, d)


@dataclass
class SourceGroupInfo:
    """A consistency group at its primary: one journal, one counter (SPEC 2.3, 5.3)."""

    name: str
    journal_bytes: int
    reorder_bytes: int = 0                 # its reorder buffer at the secondary (0: the default there)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SourceGroupInfo":
        return _load(cls, d)


@dataclass
class Member:
    """One volume of a migration: V2 here, V1 (source) and V3 (secondary) elsewhere."""

    target: str
    source: PeerVolume
    secondary: PeerVolume

    @classmethod
    def of(cls, d: dict[str, Any]) -> "Member":
        return cls(str(d["target"]), PeerVolume.of(d["source"]), PeerVolume.of(d["secondary"]))


@dataclass
class TargetMigration:
    """Program 203 at V2's node (Fig. 8): the migration's phase and what it took over."""

    id: str
    members: list[Member]
    group: str = ""
    mode: str = ""                         # sync / async, known after the handover
    phase: str = T.THROUGH                 # see tables.PHASES
    state: str = T.RUNNING                 # running / done / failed / aborted
    error: str = ""
    dual_write: bool = False
    dual_write_lost: str = ""              # why V1 is no longer a complete fallback
    handover_seq: int = 0                  # N0
    source_pair_state: str = ""            # V1's pair_state at the handover (S812)
    valid_pending: str = ""                # copy_source_valid value V3 still has to take
    attempts: int = 0                      # handover requests sent so far
    last_attempt: str = ""                 # the attempt V1 may still be frozen for (after a failure)
    confirmed: bool = False                # V1 was told that V2 took over
    started: float = 0.0
    finished: float = 0.0
    handover_ms: float = 0.0
    held_ms_max: float = 0.0

    @property
    def source_node(self) -> PeerVolume:
        return self.members[0].source

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), kind="target")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TargetMigration":
        d = dict(d, members=[Member.of(m) for m in d.get("members", [])])
        return _load(cls, d)


@dataclass
class SourceMigration:
    """Program 204 at V1's node (Fig. 9): frozen, drained, background copy done."""

    id: str
    volumes: list[str]                     # V1 volumes of this node
    target: dict[str, PeerVolume]          # V1 volume -> V2
    stage: str = T.PREPARED
    attempt: str = ""                      # the handover request V1 is frozen for
    handover_seq: int = 0
    rate_limit_bytes_s: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), kind="source")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SourceMigration":
        d = dict(d, target={k: PeerVolume.of(v) for k, v in d.get("target", {}).items()})
        return _load(cls, d)


def migration_from_dict(d: dict[str, Any]) -> TargetMigration | SourceMigration:
    return TargetMigration.from_dict(d) if d.get("kind") == "target" else SourceMigration.from_dict(d)
