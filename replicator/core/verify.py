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
from .effects import VolHash, VolHoleRun

if TYPE_CHECKING:
    from .node import NodeCore
    from .volume import Volume

SAME, DIFFERENT, BUSY, DIRTY = "=", "x", "?", "-"
ATTEMPTS = 6                       # reads of a busy chunk before it is reported unverified
REGIONS_MAX = 1024                 # regions per verify.regions request
ITEMS_PER_ASK = 64                 # spans per verify.compare message
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
        if not self.last:
            return [False] * count
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
        todo = yield from self._spans(vol, offset, end)
        seen_different: set[int] = set()
        out: dict[str, Any] = {"same": 0, "different": [], "busy": [], "dirty": [], "flapped": 0,
                               "region_bytes": rb, "chunk_bytes": chunk, "end": end}
        for attempt in range(ATTEMPTS):
            if not todo:
                break
            codes = yield from self._compare_round(vol, todo)
            again = []
            for (off, n), span_codes in zip(todo, codes):
                if span_codes == SAME * len(span_codes) and not seen_different:
                    out["same"] += n                            # the common case, at once
                    continue
                for i, code in enumerate(span_codes):           # one code per chunk of the span
                    c_off = off + i * chunk
                    c_len = min(chunk, off + n - c_off)
                    if code == SAME:
                        out["same"] += c_len
                        if c_off in seen_different:
                            out["flapped"] += 1
                            self.core.log("warning", f"verify {vol.name}: chunk at {c_off} differed, then matched")
                    elif code == DIFFERENT and c_off in seen_different:
                        out["different"].append(c_off)
                    elif code == DIRTY:
                        out["dirty"].append(c_off)
                    else:
                        if code == DIFFERENT:
                            seen_different.add(c_off)
                        again.append((c_off, c_len))
            todo = again
            if todo and attempt:
                yield from self._pause(attempt)
        out["busy"] = [off for off, _ in todo]
        out["bytes"] = end - offset
        return wire.ok(**out)

    def _spans(self, vol: "Volume", offset: int, end: int) -> Generator[Any, Any, list[tuple[int, int]]]:
        """The first round's spans: one per region, but a run of regions without data at the
        primary (one SEEK_DATA) is one span, so a sparse volume costs little."""
        rb = self.core.cfg.region_bytes
        spans: list[tuple[int, int]] = []
        off = offset
        while off < end:
            hole = yield VolHoleRun(vol.name, off, end - off)
            n = (end - off) if hole >= end - off else max(rb, hole - hole % rb)
            spans.append((off, n))
            off += n
        return spans

    def _pause(self, attempt: int) -> Generator[Any, Any, None]:
        from .runtime import Sleep
        yield Sleep(min(0.5, 0.01 * (2 ** attempt)))

    def _compare_round(self, vol: "Volume", spans: list[tuple[int, int]]) -> Generator[Any, Any, list[str]]:
        """Read each span under its regions' lock, then let the secondary compare; one string of
        codes (one per chunk) per span."""
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
                    codes.append(DIRTY * -(-n // chunk))     # not compared: the resync copies it
                    continue
                digests = yield VolHash(vol.name, chunk, off, n)
                seq = 0 if sync else self.core.primary.groups[vol.info.group].counter - 1
                item = [off, n, seq, "0" if all(d == "0" for d in digests) else digests]
                if sync:                        # compared while no write to it can be in flight
                    reply = yield from self._ask(vol, [item])
                    codes.append(reply[0])
                    continue
            finally:
                vol.locks.release(regions)
            index.append(len(codes))
            codes.append("")
            items.append(item)
        for start in range(0, len(items), ITEMS_PER_ASK):
            answers = yield from self._ask(vol, items[start:start + ITEMS_PER_ASK])
            for i, code in zip(index[start:start + ITEMS_PER_ASK], answers):
                codes[i] = code
        self._check_verifiable(vol)             # suspended meanwhile: the answers mean nothing
        return codes

    def _ask(self, vol: "Volume", items: list[list[Any]]) -> Generator[Any, Any, list[str]]:
        dest = vol.info.copy_dest_info
        assert dest is not None
        reply = yield from self.core.call(dest.node, dest.control, "verify.compare", {
            "volume": dest.volume, "source": self.core.name, "source_volume": vol.name,
            "epoch": vol.info.copy_epoch, "items": items}, timeout_s=self.core.cfg.copy_wait_s + self.core.cfg.control_timeout_s)
        codes = [str(c) for c in reply["codes"]]
        chunk = self.chunk_bytes()
        if [len(c) for c in codes] != [-(-int(it[1]) // chunk) for it in items]:
            raise StateError("verify.compare answered codes that do not match the chunks asked for")
        return codes

    # ================================================================== at the secondary
    def _h_compare(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """Compare spans with the primary's digests (per chunk, or "0": all zeros), each at the
        primary's point ``seq`` (0: now, a sync pair); one string of codes per span."""
        core = self.core
        vol = core.volume(msg["volume"])
        if vol.info.remote_copy_flag != "dest":
            raise StateError(f"{core.name}:{vol.name} is not a remote-copy secondary")
        source = str(msg["source"])
        core.secondary.accept_source(vol, source, str(msg.get("source_volume", "")))
        core.secondary._check_epoch(vol, int(msg["epoch"]), source)
        chunk = self.chunk_bytes()
        items = [(int(o), int(n), int(s), d) for o, n, s, d in msg["items"]]
        for off, n, _, d in items:
            vol.check(off, n)
            if off % chunk or (d != "0" and (not isinstance(d, list) or len(d) != -(-n // chunk))):
                raise UsageError("verify.compare: an item's digests do not match its chunks")
        if not vol.info.consistent:
            return wire.ok(codes=[BUSY * -(-n // chunk) for _, n, _, _ in items])
        dg = core.secondary.groups.get(vol.info.group) if vol.info.mode == "async" else None
        point = max((s for _, _, s, _ in items), default=0)
        if dg is not None:
            dg.changes.start(core.rt.now, core.cfg.copy_wait_s, max(dg.applier.last_applied, dg.record[1]))
            deadline = core.rt.now + core.cfg.copy_wait_s
            from .runtime import Wait
            while dg.applier.last_applied < point and core.rt.now < deadline:
                yield Wait(("applied", dg.name), timeout_s=deadline - core.rt.now)
        codes = []
        for off, n, seq, theirs in items:
            count = -(-n // chunk)
            if dg is not None and dg.applier.last_applied < seq:
                codes.append(BUSY * count)
                continue
            before = dg.changes.changed_after(vol.name, off, count, seq) if dg is not None else [False] * count
            mine = yield VolHash(vol.name, chunk, off, n)
            after = dg.changes.changed_after(vol.name, off, count, seq) if dg is not None else [False] * count
            if theirs == "0" and not any(before) and not any(after) and vol.info.consistent \
                    and mine.count("0") == count:
                codes.append(SAME * count)              # zeros on both sides: a sparse span
                continue
            theirs = ["0"] * count if theirs == "0" else theirs
            codes.append("".join(
                BUSY if b or a or not vol.info.consistent else SAME if m == t else DIFFERENT
                for b, a, m, t in zip(before, after, mine, theirs)))
        if dg is not None:
            dg.changes.forget_through(point)
        return wire.ok(codes=codes)

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
            yield from primary.suspend(vol, T.VERIFY_SUSPEND)
        if vol.info.pair_state != T.SUSPENDED:
            raise StateError(f"pair {self.core.name}:{vol.name} could not be suspended to mark it")
        for off, n in spans:
            yield from primary.mark_dirty(vol, off, n)
        return wire.ok(state=vol.info.pair_state, dirty_bytes=vol.diff.dirty_bytes())
