"""Online verify (DRBD's ``verify`` for rcopy): compare a pair chunk by chunk while the host writes.

The two sides must be compared at the same point of the replication stream, or a
busy volume shows false differences. The primary reads a region under its region
lock (no write to it is in flight), so its bytes are exactly the numbered writes up
to ``S`` = the last sequence number given out; the secondary compares once it has
applied up to ``S``, and only chunks that no entry after ``S`` has changed (its
``ChangeLog``); a chunk changed meanwhile is "busy" and the primary reads it again.
A sync pair is simpler: the primary holds the region lock over both reads, and a
sync write holds it over both copies.

Codes per chunk: ``=`` the same, ``x`` different, ``?`` busy (compare again), ``-`` marked.
Regions the diff bitmap marks are not compared: a resync copies them anyway.
A difference is read and compared a second time before it is reported. The
terminal marks what differs in the pair's diff bitmap (``verify.mark``, which
suspends the pair first), so ``rcopy pair resume`` resyncs exactly those regions.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generator

from .. import wire
from ..errors import StateError, UsageError
from . import tables as T
from .effects import VolHash

if TYPE_CHECKING:
    from .node import NodeCore
    from .volume import Volume

SAME, DIFFERENT, BUSY, DIRTY = "=", "x", "?", "-"
ATTEMPTS = 6                       # reads of a busy chunk before it is reported unverified
REGIONS_MAX = 64                   # regions per verify.regions request
INF = 1 << 62


class ChangeLog:
    """At the secondary, while a verify runs: the newest entry that changed each chunk.

    Bounded: it exists only for ``keep_s`` after the last compare request, and a
    request forgets what is older than its own point (later requests are later
    in the stream); ``floor`` is what it no longer knows.
    """

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.last: dict[tuple[str, int], int] = {}
        self.floor = 0
        self.until = 0.0

    def start(self, now: float, keep_s: float, floor: int) -> None:
        if now >= self.until:
            self.last.clear()
            self.floor = floor
        self.until = now + keep_s

    def note(self, now: float, volume: str, offset: int, length: int, seq: int) -> None:
        """Entry ``seq`` (a region copy: the number after the one it follows) is about to change these bytes."""
        if now >= self.until:
            if self.last:
                self.last.clear()
            return
        for c in range(offset // self.chunk, (offset + max(length, 1) - 1) // self.chunk + 1):
            if self.last.get((volume, c), -1) < seq:
                self.last[(volume, c)] = seq

    def changed_after(self, volume: str, offset: int, count: int, seq: int) -> list[bool]:
        """For ``count`` chunks from ``offset``: may an entry after ``seq`` have changed it?"""
        first = offset // self.chunk
        if seq < self.floor:
            return [True] * count
        return [self.last.get((volume, c), -1) > seq for c in range(first, first + count)]

    def forget_through(self, seq: int) -> None:
        if seq > self.floor:
            self.last = {k: s for k, s in self.last.items() if s > seq}
            self.floor = seq


class OnlineVerify:
    """The verify handlers of a node: ``verify.regions`` at the primary, ``verify.compare`` at
    the secondary, ``verify.mark`` to mark what differs for the resync."""

    def __init__(self, core: "NodeCore") -> None:
        self.core = core

    def handlers(self) -> dict[str, Any]:
        return {"verify.regions": self._h_regions, "verify.compare": self._h_compare,
                "verify.mark": self._h_mark}

    def chunk_bytes(self) -> int:
        return min(self.core.cfg.verify_chunk_bytes, self.core.cfg.region_bytes)

    # ================================================================== at the primary
    def _check_verifiable(self, vol: "Volume") -> None:
        info = vol.info
        if info.rw_mode != T.NORMAL or info.migration:
            raise StateError(f"{self.core.name}:{vol.name} is being migrated; verify it once the "
                             f"migration is done")
        if info.pair_state != T.DUPLEX:
            raise StateError(f"pair {self.core.name}:{vol.name} is {info.pair_state}, not duplex "
                             f"({info.suspend_reason or 'copying'}); online verify needs a duplex pair")

    def _h_regions(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """Compare ``regions`` regions from ``offset`` with the secondary; read again what is busy."""
        vol = self.core.primary._source_volume(msg)
        self._check_verifiable(vol)
        rb, chunk = self.core.cfg.region_bytes, self.chunk_bytes()
        offset, count = int(msg["offset"]), int(msg.get("regions", 8))
        if offset < 0 or offset % rb or offset >= vol.info.size or not 1 <= count <= REGIONS_MAX:
            raise UsageError(f"verify.regions: offset must be a multiple of {rb} inside the volume, "
                             f"regions in 1..{REGIONS_MAX}")
        end = min(vol.info.size, offset + count * rb)
        todo = [(off, min(chunk, end - off)) for off in range(offset, end, chunk)]
        seen_different: set[int] = set()
        out: dict[str, Any] = {"same": 0, "different": [], "busy": [], "dirty": [], "flapped": 0,
                               "region_bytes": rb, "chunk_bytes": chunk, "end": end}
        for attempt in range(ATTEMPTS):
            if not todo:
                break
            codes = yield from self._compare_round(vol, todo, out)
            again = []
            for (off, n), code in zip(todo, codes):
                if code == SAME:
                    out["same"] += n
                    if off in seen_different:
                        out["flapped"] += 1
                        self.core.log("warning", f"verify {vol.name}: chunk at {off} differed, then matched")
                elif code == DIFFERENT and off in seen_different:
                    out["different"].append(off)
                elif code == DIRTY:
                    out["dirty"].append(off)
                else:
                    if code == DIFFERENT:
                        seen_different.add(off)
                    again.append((off, n))
            todo = again
            if todo and attempt:
                yield from self._pause(attempt)
        out["busy"] = [off for off, _ in todo]
        out["bytes"] = end - offset
        return wire.ok(**out)

    def _pause(self, attempt: int) -> Generator[Any, Any, None]:
        from .runtime import Sleep
        yield Sleep(min(0.5, 0.01 * (2 ** attempt)))

    def _compare_round(self, vol: "Volume", spans: list[tuple[int, int]],
                       out: dict[str, Any]) -> Generator[Any, Any, list[str]]:
        """Read each span under its region lock, then let the secondary compare; one code per span."""
        chunk = self.chunk_bytes()
        sync = vol.info.mode == "sync"
        codes: list[str] = []
        items: list[list[Any]] = []
        index: list[int] = []
        for off, n in spans:
            regions = vol.regions(off, n)
            yield from vol.locks.acquire(regions)
            try:
                self._check_verifiable(vol)
                if vol.diff.any_set(off, n):
                    codes.append(DIRTY)         # not compared: the resync copies it
                    continue
                digest = (yield VolHash(vol.name, chunk, off, n))[0]
                seq = 0 if sync else self.core.primary.groups[vol.info.group].counter - 1
                item = [off, n, seq, digest]
                if sync:                        # compared while no write to it can be in flight
                    reply = yield from self._ask(vol, [item])
                    codes.append(reply[0])
                    continue
            finally:
                vol.locks.release(regions)
            index.append(len(codes))
            codes.append(BUSY)
            items.append(item)
        if items:
            answers = yield from self._ask(vol, items)
            for i, code in zip(index, answers):
                codes[i] = code
        self._check_verifiable(vol)             # suspended meanwhile: the answers mean nothing
        return codes

    def _ask(self, vol: "Volume", items: list[list[Any]]) -> Generator[Any, Any, str]:
        dest = vol.info.copy_dest_info
        assert dest is not None
        reply = yield from self.core.call(dest.node, dest.control, "verify.compare", {
            "volume": dest.volume, "source": self.core.name, "epoch": vol.info.copy_epoch,
            "items": items}, timeout_s=self.core.cfg.copy_wait_s + self.core.cfg.control_timeout_s)
        codes = str(reply["codes"])
        if len(codes) != len(items):
            raise StateError(f"verify.compare answered {len(codes)} codes for {len(items)} chunks")
        return codes

    # ================================================================== at the secondary
    def _h_compare(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """Compare chunks with the primary's digests, each at the primary's point ``seq``
        (0: now, a sync pair)."""
        core = self.core
        vol = core.volume(msg["volume"])
        if vol.info.remote_copy_flag != "dest":
            raise StateError(f"{core.name}:{vol.name} is not a remote-copy secondary")
        source = str(msg["source"])
        core.secondary.accept_source(vol, source)
        core.secondary._check_epoch(vol, int(msg["epoch"]), source)
        items = [(int(o), int(n), int(s), str(d)) for o, n, s, d in msg["items"]]
        for off, n, _, _ in items:
            vol.check(off, n)
        if not vol.info.consistent:
            return wire.ok(codes=BUSY * len(items))
        dg = core.secondary.groups.get(vol.info.group) if vol.info.mode == "async" else None
        point = max((s for _, _, s, _ in items), default=0)
        if dg is not None:
            log = dg.changes
            log.start(core.rt.now, core.cfg.copy_wait_s, max(dg.applier.last_applied, dg.record[1]))
            deadline = core.rt.now + core.cfg.copy_wait_s
            from .runtime import Wait
            while dg.applier.last_applied < point and core.rt.now < deadline:
                yield Wait(("applied", dg.name), timeout_s=deadline - core.rt.now)
        codes = []
        for off, n, seq, digest in items:
            if dg is not None and (dg.applier.last_applied < seq
                                   or dg.changes.changed_after(vol.name, off, 1, seq)[0]):
                codes.append(BUSY)
                continue
            mine = (yield VolHash(vol.name, self.chunk_bytes(), off, n))[0]
            if dg is not None and dg.changes.changed_after(vol.name, off, 1, seq)[0]:
                codes.append(BUSY)              # an entry after seq landed while it was read
            elif not vol.info.consistent:
                codes.append(BUSY)
            else:
                codes.append(SAME if mine == digest else DIFFERENT)
        if dg is not None:
            dg.changes.forget_through(point)
        return wire.ok(codes="".join(codes))

    # ================================================================== marking
    def _h_mark(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """Mark differing ranges in diff_bitmap for the resync; the pair is suspended first (a
        marked region of a duplex pair would take writes by the bitmap alone)."""
        primary = self.core.primary
        vol = primary._source_volume(msg)
        spans = [(int(o), int(n)) for o, n in msg["ranges"]]
        for off, n in spans:
            vol.check(off, n)
        if vol.info.pair_state != T.SUSPENDED:
            yield from primary.suspend(vol, str(msg.get("reason") or "verify found out-of-sync data"))
        if vol.info.pair_state != T.SUSPENDED:
            raise StateError(f"pair {self.core.name}:{vol.name} could not be suspended to mark it")
        for off, n in spans:
            yield from primary.mark_dirty(vol, off, n)
        return wire.ok(state=vol.info.pair_state, dirty_bytes=vol.diff.dirty_bytes())
