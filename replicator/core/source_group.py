"""A consistency group at its primary (SPEC 2.3, 2.5, 4.8, 5.3, 5.6, 5.8, 5.10, 5.11).

One counter and one journal for every member volume. Host writes are numbered in
the order they reach the group and appended in batches (group commit, one append
in flight); the journal's pointers keep ``discarded <= applied <= stored < counter``.

Durability rules held here:
* a host write is acknowledged only after its entry and every earlier one are stored;
* an entry leaves the primary (push or pull) only once it is durable (fsynced), so
  after a power loss the journal still holds everything the secondary may have;
* space is freed only when the secondary reported the entries applied (durably),
  the primary's own volume writes are done, and the discard is durable;
* a full journal folds every unapplied entry into the diff bitmaps (durably) and
  suspends the pair: host writes never fail because of the journal.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generator

from .. import wire
from ..errors import RangeNotStored, RcopyError
from . import tables as T
from .effects import JEntry, JournalAppend, JournalDiscard, JournalRead, JournalSync, Zeros
from .journal_space import RingSpace, record_bytes
from .payload import entry_frames
from .model import PeerVolume, SourceGroupInfo
from .runtime import Sleep, Wait

if TYPE_CHECKING:
    from .node import JournalState, NodeCore
    from .volume import Volume


@dataclass(slots=True, eq=False)
class Pending:
    """A host write waiting for its journal entry."""

    volume: str
    offset: int
    data: bytes | memoryview
    seq: int = 0
    folded: bool = False


LIVE_CHUNK = 64 * 1024          # the granularity of live_under


class SourceGroup:
    """The journal management information of one group (SPEC 5.3) and its transfer."""

    def __init__(self, core: "NodeCore", info: SourceGroupInfo, state: "JournalState | None" = None) -> None:
        self.core, self.info, self.name = core, info, info.name
        self.space = RingSpace(info.journal_bytes)
        self.counter = 1
        self.stored = self.durable = self.applied = self.discarded = self.transferred = 0
        self.index: dict[int, tuple[str, int, int]] = {}      # live entries: seq -> (volume, offset, length)
        self.live_at: dict[tuple[str, int], int] = {}         # (volume, 64 KiB chunk) -> its last entry
        self.pending: deque[Pending] = deque()
        self.writing: dict[int, int] = {}                      # seq -> volume writes still running
        self.appending = self.syncing = self.discarding = self.folding = False
        self.next_send = 1
        self.handover_below = 0                                 # V1 after the handover: send only < N0
        self.link_up = True
        self.last_error = ""
        self.peer_incarnation = ""
        self.pushing = 0                                        # pushes in flight (push_window at most)
        self.retry_at = 0.0                                     # after a failed push: the next one not before
        self.last_discard = 0.0
        self.lag: deque[tuple[int, float]] = deque()
        self.live_bytes = 0                                     # data bytes of entries (discarded, stored]
        self.throttled = 0                                      # host writes slowed by back-pressure
        self.throttled_s = 0.0
        # Entries appended by this incarnation, kept for the push until discarded (at most
        # push_cache_bytes of data): a push sends them from memory instead of reading the journal.
        self.cache: dict[int, JEntry] = {}
        self.cache_bytes = 0
        if state is not None:
            self._restore(state)

    def _restore(self, st: "JournalState") -> None:
        self.space = RingSpace(st.capacity_bytes or self.info.journal_bytes, st.head)
        for seq, pos, end in st.slots:
            self.space.live.append((seq, pos, end))
        self.counter, self.stored, self.discarded = st.counter, st.stored, st.discarded
        # After a process kill the file may hold entries still only in the page cache: nothing
        # beyond the discarded pointer counts as durable until this incarnation has synced it.
        self.durable = self.discarded
        self.applied = self.transferred = self.discarded
        for seq, vol, off, length in st.entries:
            self.index[seq] = (vol, off, length)
            self._note_live(vol, off, length, seq)
            self.live_bytes += length
        self.next_send = self.discarded + 1

    @property
    def key(self) -> tuple[str, str]:
        return ("group", self.name)

    def members(self) -> list["Volume"]:
        """The group's pairs: its primaries here, without a V1 whose V2 on this node took its place."""
        return [v for v in self.core.members(self.name) if not self.core.mig.superseded(v)]

    def volumes(self) -> list["Volume"]:
        """Every volume whose writes the journal may hold (a superseded V1's too)."""
        return self.core.members(self.name)

    def tracker(self, vname: str) -> "Volume | None":
        """The volume whose diff bitmap takes an entry of ``vname`` that leaves the journal unsent:
        the volume itself, or the V2 that took a superseded V1's place."""
        v = self.core.volumes.get(vname)
        return (self.core.mig.successor(v) or v) if v is not None else None

    # ================================================================== appending (S2401-S2404)
    def batch_bytes(self) -> int:
        """Journal data per push or pull: at most an eighth of the journal, so space comes back
        (applied, then discarded) in steps small enough for back-pressure to hold the fill."""
        return max(1, min(self.core.cfg.push_batch_bytes, self.space.capacity // 8))

    def throttle_s(self) -> float:
        """Back-pressure: how long a host write waits before it is journaled. Nothing below the
        high-water mark or while the link is down (the wait could not drain anything); past it,
        throttle_max_s * x * x for the overshoot x (0..1), so the host settles where the link
        drains it, a little past the mark."""
        cfg = self.core.cfg
        fill = self.space.used() / self.space.capacity if self.space.capacity else 0.0
        if fill <= cfg.journal_high_water or not self.link_up:
            return 0.0
        x = min(1.0, (fill - cfg.journal_high_water) / (1.0 - cfg.journal_high_water))
        return cfg.throttle_max_s * x * x

    def wait_stored(self, p: Pending) -> Generator[Any, Any, bool]:
        """Until ``p`` and every earlier entry are stored; False if it was folded instead."""
        while not p.folded and (p.seq == 0 or p.seq > self.stored):
            yield Wait(("stored", self.name))
        return not p.folded

    def appender(self) -> Generator[Any, Any, None]:
        """Append what host writes queued, one batch at a time, in arrival order."""
        while self.name in self.core.primary.groups:
            if not self.pending or self.folding or self.appending:
                yield Wait(("append", self.name))
                continue
            batch = list(self.pending)[: self.core.cfg.push_batch_entries]
            sizes = [record_bytes(p.data) for p in batch]
            n = self.space.fits(sizes)
            if n == 0:
                if self.discarding:
                    yield Wait(("discarded", self.name))
                    continue
                yield from self.fold("journal full")
                continue
            entries = []
            for p, size in zip(batch[:n], sizes[:n]):
                self.pending.popleft()
                entries.append(self.number(p, size))
            yield from self._append(entries)

    def append(self, vol: "Volume", offset: int, data: bytes | memoryview) -> Generator[Any, Any, tuple[Pending, bool]]:
        """Journal a host write; False if it was folded into the bitmaps instead. With no append
        running and none queued (the usual case when appends complete at once) the writer appends
        its own entry; otherwise it queues for the appender, which appends the queue as one batch
        (group commit). Either way entries are stored in the order they were numbered."""
        p = Pending(vol.name, offset, data)
        size = record_bytes(data)
        if self.appending or self.pending or self.folding or not self.space.fits([size]):
            self.pending.append(p)
            self.core.rt.notify(("append", self.name))
            journaled = yield from self.wait_stored(p)
            return p, journaled
        yield from self._append([self.number(p, size)])
        return p, True

    def number(self, p: Pending, size: int) -> JEntry:
        """Give a queued write its sequence number and its place in the ring."""
        p.seq = self.counter
        self.counter += 1
        where = self.space.place(size)
        assert where is not None
        self.space.add(p.seq, where[0], size)
        self.index[p.seq] = (p.volume, p.offset, len(p.data))
        self._note_live(p.volume, p.offset, len(p.data), p.seq)
        self.live_bytes += len(p.data)
        self.writing[p.seq] = 1
        return JEntry(p.seq, p.volume, p.offset, p.data)

    def _append(self, entries: list[JEntry]) -> Generator[Any, Any, None]:
        """Store numbered entries (one append at a time: ``appending``); a failure folds."""
        self._sample(entries[-1].seq)
        self.appending = True
        try:
            yield JournalAppend(self.name, entries)
        except RcopyError as exc:
            yield from self.append_failed(entries, exc)
            return
        self._appended(entries)

    def append_now(self, entries: list[JEntry], store: Callable[[Any], Any]) -> RcopyError | None:
        """``_append`` for a caller that stores the entries at once (``store`` carries out the
        JournalAppend): None once stored, or the error, to go on with ``append_failed``."""
        self._sample(entries[-1].seq)
        self.appending = True
        result = store(JournalAppend(self.name, entries))
        if isinstance(result, BaseException):
            return result if isinstance(result, RcopyError) else RcopyError(f"journal append failed: {result}")
        self._appended(entries)
        return None

    def _appended(self, entries: list[JEntry]) -> None:
        rt = self.core.rt
        self.appending = False
        self.stored = entries[-1].seq
        self._keep(entries)
        rt.notify(("stored", self.name))
        rt.notify(("appended", self.name))
        if self.pending:                      # the appender takes what queued meanwhile (whoever
            rt.notify(("append", self.name))  # queues later wakes it then)

    def append_failed(self, entries: list[JEntry], exc: RcopyError) -> Generator[Any, Any, None]:
        """The append of ``entries`` failed: fold every unapplied entry (these too) into the bitmaps."""
        rt = self.core.rt
        self.appending = False
        self.core.log("error", f"journal {self.name}: append failed ({exc}); folding")
        self.stored = entries[-1].seq   # the space is allocated; the fold marks and frees it
        rt.notify(("appended", self.name))
        rt.notify(("append", self.name))
        yield from self.fold(f"journal write failed: {exc}")

    def _keep(self, entries: list[JEntry]) -> None:
        room = self.core.cfg.push_cache_bytes - self.cache_bytes
        for e in entries:
            n = 0 if isinstance(e.data, Zeros) else len(e.data)
            if n > room:
                break
            self.cache[e.seq] = e
            self.cache_bytes += n
            room -= n

    def read_entries(self, first: int, last: int) -> Generator[Any, Any, list[JEntry]]:
        """Entries ``first..last`` (stored and durable): from memory where this incarnation kept
        them, else from the journal (RangeNotStored if they were discarded meanwhile)."""
        out = []
        for seq in range(first, last + 1):
            e = self.cache.get(seq)
            if e is None:
                break
            out.append(e)
        if out:         # all of them, or the kept prefix now and the rest with the next push
            return out
        entries = yield JournalRead(self.name, first, last)
        return entries

    def _note_live(self, volume: str, offset: int, length: int, seq: int) -> None:
        for chunk in range(offset // LIVE_CHUNK, (offset + length - 1) // LIVE_CHUNK + 1):
            self.live_at[(volume, chunk)] = seq

    def live_under(self, volume: str, offset: int, length: int) -> bool:
        """Does the journal still hold an entry that may touch this extent? A write that bypasses
        the journal there could be overwritten by that older entry in a roll-forward after a crash."""
        for chunk in range(offset // LIVE_CHUNK, (offset + length - 1) // LIVE_CHUNK + 1):
            seq = self.live_at.get((volume, chunk))
            if seq is not None:
                if seq > self.discarded:
                    return True
                del self.live_at[(volume, chunk)]
        return False

    def volume_written(self, seq: int) -> None:
        """The primary's own write of entry ``seq`` is done (its space may be freed once applied)."""
        self.writing.pop(seq, None)

    def make_durable(self, seq: int) -> Generator[Any, Any, None]:
        """Until every entry up to ``seq`` is fsynced (one sync in flight covers all callers)."""
        while self.durable < seq:
            if self.syncing:
                yield Wait(("jsync", self.name))
                continue
            self.syncing, covered = True, self.stored
            try:
                yield JournalSync(self.name)
                self.durable = max(self.durable, covered)
            finally:
                self.syncing = False
                self.core.rt.notify(("jsync", self.name))

    # ================================================================== fold (journal full, user suspend)
    def fold(self, reason: str) -> Generator[Any, Any, None]:
        """Move every unapplied entry (and every queued write) into the diff bitmaps, durably,
        then discard them and suspend the group's pairs."""
        rt = self.core.rt
        while self.folding:
            yield Wait(("folded", self.name))
        self.folding = True
        try:
            while self.appending or self.discarding:
                yield Wait(("appended", self.name) if self.appending else ("discarded", self.name))
            vols = {v.name: v for v in self.members()}
            extents = [e for s, e in self.index.items() if s > self.applied]
            covered: set[int] = set()
            folded = len(extents)
            while True:
                # Host writes queued while we wait for the bits to be durable are covered too: the
                # loop ends only when a pass found nothing new, with no wait between it and the end.
                fresh = [p for p in self.pending if id(p) not in covered]
                if not extents and not fresh:
                    break
                extents += [(p.volume, p.offset, len(p.data)) for p in fresh]
                folded += len(fresh)
                covered.update(id(p) for p in fresh)
                touched = set()
                for vname, offset, length in extents:
                    v = self.tracker(vname)
                    if v is not None and v.name in vols and v.maps["diff"].note(v.diff.set_range(offset, length)):
                        touched.add(v.name)
                extents = []
                for vname in sorted(touched):
                    yield from vols[vname].maps["diff"].persist(sync=True)  # bits first, durably
            for p in self.pending:
                p.folded = True
            self.pending.clear()
            rt.notify(("stored", self.name))
            for v in vols.values():            # suspended durably before a single entry goes: a crash
                self.core.primary.set_suspended(v, reason)   # in between must not leave a duplex pair
            yield from self.core.save()        # missing entries its secondary still needs
            if self.stored > self.discarded:
                # The resync copies the volumes' images: what the entries wrote there (also by a
                # roll-forward at start) must be durable before the journal forgets it (seed 109020)
                for v in self.volumes():
                    yield from v.syncer.sync()
                yield JournalDiscard(self.name, through=self.stored)        # then drop the entries
                self._freed(self.stored)
            self.applied = max(self.applied, self.stored)
            self.next_send = self.counter
            self.core.log("warning", f"group {self.name}: folded {folded} entries and queued writes into "
                                     f"the bitmaps and suspended ({reason})")
        finally:
            self.folding = False
            rt.notify(("folded", self.name))
            rt.notify(("append", self.name))

    # ================================================================== discard (S2603, S2604, Fig. 30)
    def discardable(self) -> int:
        first_writing = min(self.writing, default=self.stored + 1)
        return min(self.applied, self.stored, first_writing - 1)

    def note_applied(self, applied: int) -> Generator[Any, Any, None]:
        """The secondary reports ``applied`` (durably there): free what may be freed."""
        if applied > self.applied:
            self.applied = min(applied, self.stored)
            self._trim_lag()
        target = self.discardable()
        if target <= self.discarded or self.discarding or self.folding:
            return
        now, cfg = self.core.rt.now, self.core.cfg
        # Each discard syncs the group's volumes and writes the journal's meta durably: under load
        # at most every discard_every_s, at once when everything is applied or the journal is
        # nearly full (halfway from the high-water mark to full, where back-pressure grows steep).
        # A host writing faster than the link keeps the journal at its high-water mark: a discard
        # per push there cost the drain 11-17% (docs/BENCHMARKS.md).
        nearly_full = (1.0 + cfg.journal_high_water) / 2 * self.space.capacity
        if not (self.applied >= self.stored or now - self.last_discard >= cfg.discard_every_s
                or self.space.used() >= nearly_full):
            return
        self.discarding = True
        try:
            # After a power loss the journal rolls its live entries forward into the volumes;
            # an entry may leave the journal only once its volume write is durable too.
            for v in self.volumes():
                yield from v.syncer.sync()
            yield JournalDiscard(self.name, through=target)
            self._freed(target)
            self.last_discard = now
        finally:
            self.discarding = False
            self.core.rt.notify(("discarded", self.name))
            self.core.rt.notify(("append", self.name))

    def _freed(self, through: int) -> None:
        for s in range(self.discarded + 1, through + 1):
            kept = self.cache.pop(s, None)
            if kept is not None and not isinstance(kept.data, Zeros):
                self.cache_bytes -= len(kept.data)
            e = self.index.pop(s, None)
            if e is not None:
                self.live_bytes -= e[2]
                for chunk in range(e[1] // LIVE_CHUNK, (e[1] + e[2] - 1) // LIVE_CHUNK + 1):
                    if self.live_at.get((e[0], chunk)) == s:     # no later entry touches it: forget it,
                        del self.live_at[(e[0], chunk)]         # so the map holds live entries only
        self.space.free_through(through)
        self.discarded = max(self.discarded, through)
        self.applied = max(self.applied, self.discarded)
        self.transferred = max(self.transferred, self.discarded)

    # ================================================================== transfer
    def _batch_end(self, start: int, last: int, bytes_max: int) -> int:
        total, end = 0, start
        for s in range(start, last + 1):
            n = self.index[s][2] if s in self.index else 0
            if s > start and (total + n > bytes_max or s - start >= self.core.cfg.push_batch_entries):
                break
            total += n
            end = s
        return end

    def dest(self) -> tuple[PeerVolume | None, str, str]:
        for v in self.members():
            return v.info.copy_dest_info, v.info.transfer, v.info.pair_state
        return None, "push", ""

    def push_loop(self) -> Generator[Any, Any, None]:
        """Async-transfer (W) 212 with deferred discard (Fig. 26, 28, 30). While whole batches
        wait, up to push_window pushes travel at once, each the batch after the one before (the
        secondary's reorder buffer puts them in order), so a link with a long round trip is not
        idle while a reply comes back; the next batch is made durable and read meanwhile."""
        cfg, rt = self.core.cfg, self.core.rt
        next_heartbeat = 0.0                # an empty push then, if nothing else went
        while self.name in self.core.primary.groups:
            dest, transfer, pair_state = self.dest()
            if dest is None or pair_state == T.SUSPENDED or transfer == "pull" or self.folding:
                yield Wait(("stored", self.name), timeout_s=cfg.heartbeat_s)
                continue
            if rt.now < self.retry_at:
                yield Sleep(self.retry_at - rt.now)
                continue
            start, limit = self._send_range()
            if start > limit and (self.pushing or rt.now < next_heartbeat):
                yield Wait(("stored", self.name), timeout_s=max(next_heartbeat - rt.now, cfg.link_retry_s))
                continue
            last = self._batch_end(start, limit, self.batch_bytes()) if start <= limit else limit
            if self.pushing >= cfg.push_window or (self.pushing and last == limit):
                # the window is full, or less than a whole batch waits: it goes with the next
                # reply, so small writes still gather into one push while another travels
                yield Wait(("pushed", self.name), timeout_s=cfg.heartbeat_s)
                continue
            entries: list[JEntry] = []
            if start <= limit:
                try:
                    entries = yield from self.outgoing(start, last)
                except RangeNotStored:    # folded or discarded meanwhile
                    yield Wait(("discarded", self.name), timeout_s=cfg.link_retry_s)
                    continue
                now_start, now_limit = self._send_range()
                if now_start != start or entries[-1].seq > now_limit:
                    continue              # a failed push, a fold or a handover meanwhile: from there
                self.next_send = entries[-1].seq + 1
            next_heartbeat = rt.now + cfg.heartbeat_s
            self.pushing += 1
            rt.spawn(self._push(dest, entries), f"push-{self.name}")

    def _send_range(self) -> tuple[int, int]:
        """The first entry the next push sends and the last it may send."""
        return max(self.next_send, self.discarded + 1), self._last_sendable()

    def _last_sendable(self) -> int:
        """The last entry that may leave (V1 after a handover: only those below N0)."""
        return self.stored if not self.handover_below else min(self.stored, self.handover_below - 1)

    def outgoing(self, start: int, last: int) -> Generator[Any, Any, list[JEntry]]:
        """Entries ``start..last`` for a push or a pull: an entry leaves the primary only once it
        is durable (fsynced), else a power loss of the primary could leave the secondary holding
        entries its journal lost."""
        yield from self.make_durable(last)
        return (yield from self.read_entries(start, last))

    def _push(self, dest: PeerVolume, entries: list[JEntry]) -> Generator[Any, Any, None]:
        """One push (no entries: a heartbeat) and what its reply says: the secondary's applied
        number and incarnation. A failure or a new incarnation sends again from its applied
        number on (what it holds already it ignores)."""
        cfg, rt = self.core.cfg, self.core.rt
        try:
            metas, frames, packed = entry_frames(entries)
            try:
                reply = yield from self.core.call(dest.node, dest.control, "journal.push", {
                    "group": self.name, "source": self.core.name, "entries": metas, "packed": packed},
                    frames, timeout_s=cfg.sync_timeout_s)
            except RcopyError as exc:
                self.link_up, self.last_error = False, str(exc)
                self.retry_at = rt.now + cfg.link_retry_s
                self._resend_from(self.applied + 1)
                return
            self.link_up, self.last_error = True, ""
            if reply.get("incarnation") != self.peer_incarnation:
                self.peer_incarnation = str(reply.get("incarnation", ""))
                self._resend_from(int(reply.get("applied", 0)) + 1)   # its reorder buffer is gone
            elif entries:
                self.transferred = max(self.transferred, entries[-1].seq)
            yield from self.note_applied(int(reply.get("applied", 0)))
        finally:
            self.pushing -= 1
            rt.notify(("pushed", self.name))

    def _resend_from(self, seq: int) -> None:
        self.next_send = seq
        self.core.rt.notify(("stored", self.name))       # the push loop goes back there

    def serve_pull(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """Fig. 32: entries from ``from_seq``; a range not stored is an error with no side effect."""
        cfg = self.core.cfg
        start = int(msg["from_seq"])
        _, _, pair_state = self.dest()
        if pair_state == T.SUSPENDED:
            return wire.ok(entries=[], applied=self.applied)
        if self.handover_below and start >= self.handover_below:
            yield from self.note_applied(int(msg.get("applied", 0)))
            return wire.ok(entries=[], drained=True)
        last_avail = self._last_sendable()
        if start == last_avail + 1:               # caught up: nothing new, not an error
            yield from self.note_applied(int(msg.get("applied", 0)))
            return wire.ok(entries=[], applied=self.applied)
        if not self.discarded < start <= last_avail:
            raise RangeNotStored(f"requested range not stored: seq {start} of group {self.name} "
                                 f"(it holds {self.discarded + 1}..{self.stored})")
        yield from self.note_applied(int(msg.get("applied", 0)))
        last = self._batch_end(start, last_avail, min(int(msg.get("max_bytes", cfg.push_batch_bytes)),
                                                      self.batch_bytes()))
        entries = yield from self.outgoing(start, last)
        if entries:
            self.transferred = max(self.transferred, entries[-1].seq)
        metas, frames, packed = entry_frames(entries)
        return wire.ok(frames, entries=metas, packed=packed)

    # ================================================================== lag
    def _sample(self, seq: int) -> None:
        now = self.core.rt.now
        if self.lag and now - self.lag[-1][1] < self.core.cfg.lag_sample_every_s:
            return
        if len(self.lag) >= self.core.cfg.lag_samples_max:   # keep the bound: thin out every other sample
            self.lag = deque(list(self.lag)[::2])
        self.lag.append((seq, now))

    def _trim_lag(self) -> None:
        while self.lag and self.lag[0][0] <= self.applied:
            self.lag.popleft()

    def lag_seconds(self) -> float:
        self._trim_lag()
        if self.applied >= self.stored:
            return 0.0
        return self.core.rt.now - self.lag[0][1] if self.lag else 0.0

    def pending_bytes(self) -> int:
        return sum(e[2] for s, e in self.index.items() if s > self.applied)

    def status(self) -> dict[str, Any]:
        return {"group": self.name, "role": "source", "counter": self.counter, "stored": self.stored,
                "durable": self.durable, "transferred": self.transferred, "applied": self.applied,
                "discarded": self.discarded, "journal_used_bytes": self.space.used(),
                "journal_capacity_bytes": self.space.capacity, "link_up": self.link_up,
                "last_error": self.last_error, "queued": len(self.pending),
                "throttled_writes": self.throttled, "throttled_seconds": round(self.throttled_s, 3),
                "throttle_ms": round(self.throttle_s() * 1000, 1)}
