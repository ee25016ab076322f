"""A volume at run time inside the core: its management info, bitmaps, region locks, counters.

Region locks serialise work on the same areas (host writes, copies, migration
fetches; SPEC 4.15). They are logical: a task that cannot have its regions waits
in a queue, first come first served, and takes all of its regions at once, so
there is no lock order to get wrong.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Generator

from ..errors import IOErrorRange
from .bitmap import Bitmap, DiffMap
from .durable import BitmapFile, Syncer
from .effects import BitmapCreate, VolSync
from .model import VolumeInfo
from .plain_gate import PlainGate
from .runtime import Runtime, Wait

KINDS = ("diff", "migrated", "activity")


class RegionLocks:
    """Fair locks over region numbers of one volume."""

    def __init__(self, rt: Runtime, name: str) -> None:
        self.rt, self.name = rt, name
        self.held: set[int] = set()
        self.queue: deque[tuple[int, range]] = deque()   # (ticket, regions) waiting, in order
        self.granted: set[int] = set()
        self._ticket = 0

    def try_acquire(self, regions: range) -> bool:
        """Take ``regions`` now if they are free and nobody queues (so nobody is overtaken)."""
        if self.queue or not self.held.isdisjoint(regions):
            return False
        self.held.update(regions)
        return True

    def acquire(self, regions: range) -> Generator[Any, Any, None]:
        if self.try_acquire(regions):
            return
        self._ticket += 1
        ticket = self._ticket
        self.queue.append((ticket, regions))
        key = ("locks", self.name, ticket)
        while True:
            yield Wait(key)
            if ticket not in self.granted:
                continue
            self.granted.discard(ticket)
            return

    def release(self, regions: range) -> None:
        self.held.difference_update(regions)
        if self.queue:
            self._grant()

    def _grant(self) -> None:
        """Grant waiters in order; a waiter blocks later ones that overlap it (no overtaking)."""
        blocked: set[int] = set()
        keep: deque[tuple[int, range]] = deque()
        woken = []
        for ticket, regions in self.queue:
            if any(r in self.held or r in blocked for r in regions):
                blocked.update(regions)
                keep.append((ticket, regions))
                continue
            self.held.update(regions)
            self.granted.add(ticket)
            woken.append(ticket)
        self.queue = keep
        for ticket in woken:        # after the queue is right: a woken task may release at once
            self.rt.notify(("locks", self.name, ticket))


def bitmap_bytes(info: VolumeInfo, kind: str, region_bytes: int) -> int:
    """How many bytes of bits a bitmap of this kind has for this volume."""
    unit = (info.diff_block_bytes or region_bytes) if kind == "diff" else region_bytes
    return (max(1, -(-info.size // unit)) + 7) // 8


@dataclass(eq=False)
class Volume:
    """Everything the core knows about one volume."""

    info: VolumeInfo
    maps: dict[str, BitmapFile]
    locks: RegionLocks
    syncer: Syncer
    inflight: int = 0                       # host requests being processed (S903 waits for 0)
    active: Counter[int] = field(default_factory=Counter)   # regions with a write in flight (activity log)
    active_seq: dict[int, int] = field(default_factory=dict)  # async: last journal seq per active region
    active_write: dict[int, int] = field(default_factory=dict)  # sync: syncer count after its last write
    active_at: dict[int, float] = field(default_factory=dict)   # when a write last entered the region
    writes: int = 0
    direct_writes: int = 0           # ... of which admitted without a task (core/direct.py)
    bytes_written: int = 0
    copied_bytes: int = 0            # initial copy and resync: data sent as payloads
    zeroed_bytes: int = 0            # ... and sent as zero commands (holes, all-zero data)
    copier: Any = None                      # the copy task while the pair is copying
    gate: PlainGate = field(default_factory=PlainGate)   # plain writes without the core (plain_gate.py)

    @classmethod
    def make(cls, rt: Runtime, info: VolumeInfo, region_bytes: int,
             raw: dict[str, bytes | None] | None = None) -> "Volume":
        """``info.diff_block_bytes`` says the diff_bitmap's block (0, a record from before fine
        tracking: one bit per region, as its file still is)."""
        raw = raw or {}
        block = info.diff_block_bytes or region_bytes
        maps = {k: BitmapFile(rt, info.name, k, Bitmap(info.size, region_bytes, raw.get(k)))
                for k in KINDS if k != "diff"}
        maps["diff"] = BitmapFile(rt, info.name, "diff", DiffMap(info.size, region_bytes, block, raw.get("diff")))
        return cls(info, maps, RegionLocks(rt, info.name),
                   Syncer(rt, ("vol-sync", info.name), lambda: VolSync(info.name)))

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def diff(self) -> DiffMap:
        return self.maps["diff"].bits

    @property
    def migrated(self) -> Bitmap:
        return self.maps["migrated"].bits

    @property
    def activity(self) -> Bitmap:
        return self.maps["activity"].bits

    def reshape_diff(self, block_bytes: int) -> Generator[Any, Any, None]:
        """Give diff_bitmap blocks of ``block_bytes`` (pair create; V2 taking over V1's pair): a
        new file of that geometry, marking every range the old bits marked. The caller saves
        the management information; a restart before that finds a file that does not match
        the block size it names: damaged, so every block is marked."""
        old = self.maps["diff"]
        if block_bytes == old.bits.block_bytes:
            return
        bits = DiffMap(self.info.size, old.bits.region_bytes, block_bytes)
        change = bits.cover(old.bits)
        yield BitmapCreate(self.name, "diff", self.info.size, block_bytes)
        self.maps["diff"] = BitmapFile(old.rt, self.name, "diff", bits)
        self.info.diff_block_bytes = block_bytes
        yield from self.maps["diff"].update(change, sync=True)

    def check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.info.size:
            raise IOErrorRange(f"I/O at offset {offset} length {length} is outside the "
                               f"volume {self.info.name} ({self.info.size} bytes)")

    def regions(self, offset: int, length: int) -> range:
        return self.diff.regions(offset, length)
