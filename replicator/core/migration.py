"""Live migration of a primary V1 (node 2_1) to V2 (node 2_2) while V3 keeps receiving (SPEC 4).

Read the phase table first: ``tables.PHASES`` says, per phase, what V2 does with
host I/O, what V1 does and what V3 accepts. This module carries it out:

* **target** (V2, program 203, Fig. 8): ``target_procedure`` walks THROUGH ->
  PENDING -> (TRANSITIONAL) -> MIGRATING -> DONE. **What V2 does while PENDING**:
  ``admit`` holds every host request in arrival order (they are woken, in order,
  when the phase changes); the procedure waits for relays already sent, then asks
  V1 for the handover, retrying until ``handover_timeout_s``. If V1 never answers,
  V2 goes back to THROUGH (nothing was taken over), asks V1 to thaw, and the
  migration is ``failed``: ``rcopy migrate --resume`` tries again, ``--abort`` gives up.
* **source** (V1, program 204, Fig. 9): ``_h_handover`` freezes V1 (no new host
  update), waits for in-flight I/O and for the journal, and hands over pair state,
  diff bitmap, the counter N0 and the journal's byte position; ``source_procedure``
  drains the backlog below N0 to V3, then copies every unmigrated region to V2.
* **secondary** (V3): copy_source_valid 1 -> transitional -> 2 (async) or 1 -> 2 (sync).

Every phase is in the management information (``TargetMigration``,
``SourceMigration``), so a restarted node continues where it stopped.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generator, Iterable

from .. import wire
from ..errors import NodeUnreachable, ProtocolError, RcopyError, StateError, UsageError
from . import plain_gate, tables as T
from .effects import VolHoleRun, VolRead, VolWrite, VolZero, put
from .payload import write_data, write_fields
from .model import Member, PeerVolume, SourceMigration, TargetMigration
from .runtime import Sleep, Wait

if TYPE_CHECKING:
    from .node import BootState, NodeCore
    from .volume import Volume


def _run_bytes(v: "Volume", run: range) -> int:
    """Bytes of a run of regions (the volume's last region may be short)."""
    return sum(v.migrated.extent(run.stop - 1)) - v.migrated.extent(run.start)[0] if run else 0


def _runs(regions: Iterable[int]) -> list[range]:
    """Ascending region numbers as runs of consecutive ones."""
    out: list[range] = []
    for r in regions:
        if out and out[-1].stop == r:
            out[-1] = range(out[-1].start, r + 1)
        else:
            out.append(range(r, r + 1))
    return out


def _free_run(v: "Volume", region: int, limit: int, taken: set[int]) -> int:
    """How many regions the background copy may take as one run: ``region`` (taken already) and
    the unmigrated regions right after it that no other stream has taken, at most ``limit``."""
    n = max(1, v.migrated.run(region, limit, False))
    return next((i for i in range(1, n) if region + i in taken), n)


def source_key(mid: str) -> str:
    """Where V1's record of migration ``mid`` is kept: apart from V2's, which may be on the same
    node (a migration inside one node, SPEC 1.7)."""
    return f"{mid} (source)"


class Migrations:
    """Programs 203 (target) and 204 (source) of one node, and V3's part."""

    def __init__(self, core: "NodeCore") -> None:
        self.core = core
        self.relays: dict[str, int] = {}         # V2 volume -> relays in flight (THROUGH)
        self.rate_bytes_s = 0.0
        self.waiting_for: dict[str, str] = {}    # migration id -> what it waits for
        self.saved_stage: dict[str, str] = {}    # source migration id -> its stage as last made durable
        self.moved: dict[str, list[int]] = {}    # at V1, migration id -> [bytes sent with data, bytes zeroed]
        self.moved_seen: dict[str, tuple[int, int]] = {}   # at V2: what V1 last reported of it
        self.fetched: dict[str, set[int]] = {}   # at V1, volume -> regions V2 fetched (memory only)

    def handlers(self) -> dict[str, Any]:
        return {
            "mig.prepare_target": self._h_prepare_target, "mig.prepare_source": self._h_prepare_source,
            "mig.add_source": self._h_add_source, "mig.start": self._h_start,
            "mig.handover": self._h_handover, "mig.thaw": self._h_thaw, "mig.confirm": self._h_confirm,
            "mig.set_valid": self._h_set_valid, "mig.source_status": self._h_source_status,
            "mig.fetch": self._h_fetch, "mig.region": self._h_region, "mig.dual_write": self._h_dual_write,
            "mig.remove_source": self._h_remove_source, "mig.clear_target": self._h_clear_target,
            "mig.unregister_source": self._h_unregister_source, "mig.abort_target": self._h_abort_target,
            "mig.abort_source": self._h_abort_source, "mig.drop_source": self._h_drop_source,
        }

    # ================================================================== queries
    def target_of(self, vol: "Volume") -> TargetMigration | None:
        m = self.core.migrations.get(vol.info.migration)
        return m if isinstance(m, TargetMigration) else None

    def source_of(self, vol: "Volume") -> SourceMigration | None:
        m = self.core.migrations.get(vol.info.migration)
        return m if isinstance(m, SourceMigration) else None

    def frozen(self, vol: "Volume") -> bool:
        """V1 past its handover snapshot: no new host update (invariant 8)."""
        sm = self.source_of(vol)
        return sm is not None and sm.stage != T.PREPARED

    def handed_over(self, vol: "Volume") -> bool:
        """V2 took over from this V1 (so it may have dual-written to it since)."""
        sm = self.source_of(vol)
        return sm is not None and sm.stage in (T.HANDED_OVER, T.DRAINED, T.COMPLETE)

    def superseded(self, vol: "Volume") -> bool:
        """V1 whose V2 on this same node has taken its place in the consistency group: its
        journal entries are the group's, its regions to resynchronise are V2's."""
        return self.successor(vol) is not None

    def successor(self, vol: "Volume") -> "Volume | None":
        sm = self.source_of(vol)
        if sm is None or sm.stage == T.PREPARED:
            return None
        dest = sm.target.get(vol.name)
        v2 = self.core.volumes.get(dest.volume) if dest is not None and dest.node == self.core.name else None
        return v2 if v2 is not None and v2.info.remote_copy_flag == "source" else None

    def local(self, sm: SourceMigration) -> bool:
        """Is V2 on this node (the group and its journal are shared with it)?"""
        return all(t.node == self.core.name for t in sm.target.values())

    def valid_of(self, vol: "Volume") -> str:
        return T.SOURCE_1

    def _vols(self, tm: TargetMigration) -> list["Volume"]:
        return [self.core.volume(m.target) for m in tm.members]

    def check_bitmaps(self, st: "BootState") -> bool:
        """A damaged migrated bitmap on V2 cannot be rebuilt safely (all-clear would let V1's copy
        overwrite host data, all-set would skip V1's data): the migration stops, failed."""
        changed = False
        for v in self.core.volumes.values():
            if st.bitmaps.get((v.name, "migrated"), b"") is not None:
                continue
            tm = self.target_of(v)
            if tm is not None and tm.phase in (T.TRANSITIONAL, T.MIGRATING) and tm.state == T.RUNNING:
                T.go(T.RUN_STATE, tm, T.FAILED)
                tm.error = (f"migrated bitmap of {v.name} is damaged; V2 cannot tell which regions it holds. "
                            f"Host I/O to it fails; restore the bitmap file or copy the volume back")
                changed = True
            elif self.source_of(v) is not None:   # V1's bits only say what V2 confirmed: re-pushing is safe
                v.maps["migrated"].note(v.migrated.clear_all())
                changed = True
        return changed

    # ================================================================== host I/O on V2 (Fig. 10)
    def admit(self, vol: "Volume", write: bool) -> Generator[Any, Any, str]:
        """Dispatch on rw_mode (S1101-S1110): the check and the count are one step, so a PENDING
        drain or a handover never misses a request."""
        rt, cfg = self.core.rt, self.core.cfg
        held_since = rt.now
        while True:
            if write and self.frozen(vol):     # V1 after the handover: read-only (invariant 8)
                dest = vol.info.migration_dest_info
                raise StateError(f"{self.core.name}:{vol.name} has handed over to "
                                 f"{dest.label if dest else 'its new primary'}; use that volume")
            tm = self.target_of(vol)
            if tm is not None and tm.state == T.FAILED and tm.phase in (T.TRANSITIONAL, T.MIGRATING):
                raise StateError(f"migration to {self.core.name}:{vol.name} failed: {tm.error}")
            mode = vol.info.rw_mode
            if mode != T.PENDING:
                break
            waited = rt.now - held_since
            if waited >= cfg.pending_hold_max_s:
                raise StateError(f"{vol.name}: request held {waited * 1000:.0f} ms in pending mode; giving up")
            yield Wait(("mode", vol.name), timeout_s=cfg.pending_hold_max_s - waited)
        if rt.now > held_since and tm is not None:
            tm.held_ms_max = max(tm.held_ms_max, (rt.now - held_since) * 1000)
        if mode == T.THROUGH:
            self.relays[vol.name] = self.relays.get(vol.name, 0) + 1
        else:
            vol.inflight += 1
        return mode

    def done(self, vol: "Volume") -> None:
        vol.inflight -= 1
        if vol.inflight == 0:
            self.core.rt.notify(("idle", vol.name))

    def relay(self, vol: "Volume", kind: str, payloads: list[Any] | None = None,
              **fields: Any) -> Generator[Any, Any, wire.Message]:
        """S1104-S1108: THROUGH mode sends the request to V1, which does all the work."""
        src = vol.info.migration_source_info
        try:
            assert src is not None
            reply = yield from self.core.call(src.node, src.control, kind, dict(fields, volume=src.volume),
                                              payloads, timeout_s=self.core.cfg.peer_timeout_s)
            return reply
        finally:
            self.relays[vol.name] -= 1
            self.core.rt.notify(("relays", vol.name))

    def ensure_migrated(self, vol: "Volume", offset: int, length: int) -> Generator[Any, Any, None]:
        """S1111-S1114 (and S1504-S1507): fetch the unmigrated regions a request touches from V1
        first. The caller holds the regions' locks."""
        for region in vol.migrated.regions(offset, length):
            if not vol.migrated.is_set(region):
                yield from self._fetch(vol, region)

    def _fetch(self, vol: "Volume", region: int) -> Generator[Any, Any, None]:
        src = vol.info.migration_source_info
        assert src is not None
        reply = yield from self.core.call(src.node, src.control, "mig.fetch",
                                          {"volume": src.volume, "region": region},
                                          timeout_s=self.core.cfg.peer_timeout_s)
        offset, length = vol.migrated.extent(region)
        if reply.get("zero"):
            yield VolZero(vol.name, offset, length)
        elif reply.payloads and len(reply.payloads[0]) == length:
            yield VolWrite(vol.name, offset, reply.payloads[0])
        else:
            raise ProtocolError("mig.fetch: data does not match the region")
        vol.syncer.wrote()
        yield from vol.syncer.sync()                                          # the data durable first,
        yield from vol.maps["migrated"].update(vol.migrated.set(region), sync=True)   # then its bit (S1114)

    def dual_write(self, vol: "Volume", offset: int, data: Any) -> Generator[Any, Any, None]:
        """[OPTION] dual write: V1 gets every write too, in the same order (under the region lock),
        never remote-copied from V1. If V1 fails one, the loss of the fallback is recorded."""
        tm = self.target_of(vol)
        if tm is None or not tm.dual_write or tm.dual_write_lost or vol.info.rw_mode != T.MIGRATING:
            return
        src = vol.info.migration_source_info
        assert src is not None
        fields, frames = write_fields(data)
        try:
            yield from self.core.call(src.node, src.control, "mig.dual_write",
                                      {"volume": src.volume, "offset": offset, **fields}, frames,
                                      timeout_s=self.core.cfg.sync_timeout_s)
        except RcopyError as exc:
            tm.dual_write_lost = f"V1 missed a write at {vol.name} offset {offset}: {exc}"
            self.core.log("warning", f"dual write: {tm.dual_write_lost}; V1 is no longer a complete fallback")
            yield from self.core.save()

    # ================================================================== terminal-facing (S603, S604, S701, S705)
    def _h_prepare_target(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """S603 (1),(3) + S701 on 2_2: register V1 and V3 for V2 and enter THROUGH mode."""
        core = self.core
        members = [Member.of(m) for m in msg["members"]]
        mid = str(msg.get("id") or f"{members[0].source.label}->{core.name}:{members[0].target}")
        if not members:
            raise UsageError("a migration needs at least one volume")
        vols = []
        for m, raw in zip(members, msg["members"]):
            vol = core.volume(m.target)
            info = vol.info
            if info.remote_copy_flag != "off" or info.rw_mode != T.NORMAL or info.migration:
                raise StateError(f"target {core.name}:{vol.name} is in use ({info.role}, {info.rw_mode})")
            if info.size != raw["size"]:
                raise UsageError(f"target {core.name}:{vol.name} has {info.size} bytes, "
                                 f"the source has {raw['size']}; sizes must match")
            plain_gate.shut(vol, f"target {core.name}:{vol.name} has I/O in flight; is a host using it?")
            vols.append(vol)
        tm = TargetMigration(mid, members, group=str(msg.get("group", "")),
                             dual_write=bool(msg.get("dual_write")), started=core.rt.now)
        core.migrations[mid] = tm
        for vol, m in zip(vols, members):
            vol.info.migration = mid
            vol.info.migration_source_info = m.source
            vol.info.copy_dest_info = m.secondary
            T.go(T.RW_MODE, vol.info, T.THROUGH)                     # S701
            self.relays[vol.name] = 0
        yield from core.save()
        return wire.ok(id=mid)

    def _h_prepare_source(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """S603 (2): V1.migration_dest_info = V2."""
        core = self.core
        vol = core.volume(msg["volume"])
        if vol.info.remote_copy_flag != "source":
            raise StateError(f"{core.name}:{vol.name} is not a remote-copy primary")
        if vol.info.rw_mode != T.NORMAL:
            raise StateError(f"{core.name}:{vol.name} is itself the target of a migration")
        mid = str(msg.get("id") or f"{core.name}:{vol.name}")
        key = source_key(mid)
        target = PeerVolume.of(msg["target"])
        if target.node == core.name and target.volume == vol.name:
            raise UsageError(f"{core.name}:{vol.name} cannot migrate onto itself")
        sm = core.migrations.get(key)
        if vol.info.migration and vol.info.migration != key:
            raise StateError(f"{core.name}:{vol.name} is already in migration {vol.info.migration}")
        if sm is None:
            sm = SourceMigration(mid, [], {}, rate_limit_bytes_s=int(msg.get("rate_limit_bytes_s") or 0))
            core.migrations[key] = sm
        elif not isinstance(sm, SourceMigration) or sm.stage != T.PREPARED:
            raise StateError(f"migration {mid} has already started")
        if vol.name not in sm.volumes:
            sm.volumes.append(vol.name)
        sm.target[vol.name] = target
        vol.info.migration = key
        vol.info.migration_dest_info = target
        yield from core.save()
        return wire.ok()

    def _h_add_source(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """S604 on 2_3: add V2 as copy-source entry 2 of V3."""
        vol = self.core.volume(msg["volume"])
        src = PeerVolume.of(msg["source"])
        if vol.info.remote_copy_flag != "dest":
            raise StateError(f"{self.core.name}:{vol.name} is not a secondary")
        if all(p.node != src.node or p.volume != src.volume for p in vol.info.copy_source_info):
            if len(vol.info.copy_source_info) >= 2:
                raise StateError(f"{self.core.name}:{vol.name} already has two copy sources; finish the "
                                 f"earlier migration with rcopy remove first")
            vol.info.copy_source_info.append(src)
        yield from self.core.save()
        return wire.ok(index=len(vol.info.copy_source_info))

    def _h_start(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """S705: start (or, after a failure, restart) program 203 on 2_2; the terminal polls status."""
        tms = [m for m in self.core.migrations.values() if isinstance(m, TargetMigration)
               and (not msg.get("id") or m.id == msg.get("id"))]
        tm = next((m for m in tms if m.state in (T.RUNNING, T.FAILED)), None)
        if tm is None:
            raise StateError(f"{self.core.name} has no volume prepared for migration")
        if tm.state == T.FAILED:
            if tm.phase not in (T.THROUGH,):
                raise StateError(f"migration {tm.id} failed past its handover: {tm.error}")
            T.go(T.RUN_STATE, tm, T.RUNNING)
            tm.error = ""
            yield from self.core.save()
        elif tm.phase != T.THROUGH:
            raise StateError("migration already started")
        self._spawn_target(tm, start=True)
        return wire.ok(id=tm.id)

    def start(self) -> None:
        """After a restart: continue whatever this node was doing in a migration."""
        for m in list(self.core.migrations.values()):
            if isinstance(m, TargetMigration) and m.state == T.RUNNING and m.phase != T.THROUGH:
                self._spawn_target(m, start=False)
            elif isinstance(m, TargetMigration) and m.state == T.FAILED and m.phase == T.THROUGH:
                self.core.service(f"thaw-{m.id}", lambda m=m: self._thaw_source(m))
            elif isinstance(m, SourceMigration):
                self.saved_stage[m.id] = m.stage             # as loaded: durable
                for name in m.volumes:
                    v = self.core.volumes.get(name)
                    if v is not None and v.info.mode == "async" and m.stage != T.PREPARED and not self.local(m):
                        g = self.core.primary.groups.get(v.info.group)
                        if g is not None:
                            g.handover_below = m.handover_seq
                if m.stage in (T.HANDED_OVER, T.DRAINED):
                    self._spawn_source(m)

    def _spawn_target(self, tm: TargetMigration, start: bool) -> None:
        self.core.service(f"migrate-{tm.id}", lambda: self.target_procedure(tm, start))

    # ================================================================== program 203 on 2_2 (Fig. 8)
    def _set_phase(self, tm: TargetMigration, phase: str) -> Generator[Any, Any, None]:
        """Move the migration and its volumes' rw_mode along their tables, durably, then wake
        the host requests waiting for the mode to change."""
        row = T.PHASE_ROWS.get(phase)
        T.go(T.PHASE, tm, phase)
        for v in self._vols(tm):
            if row is not None:
                T.go(T.RW_MODE, v.info, row.rw_mode)
        yield from self.core.save()
        for v in self._vols(tm):
            self.core.rt.notify(("mode", v.name))
        self.core.log("info", f"migration {tm.id}: {phase}")

    def target_procedure(self, tm: TargetMigration, start: bool) -> Generator[Any, Any, None]:
        core, cfg = self.core, self.core.cfg
        vols = self._vols(tm)
        if tm.phase == T.THROUGH and start:
            for v in vols:                                            # S801
                yield from v.maps["migrated"].update(v.migrated.clear_all(), sync=True)
            yield from self._set_phase(tm, T.PENDING)                 # S802
        if tm.phase == T.PENDING:
            ok = yield from self._handover(tm, vols)                  # S803-S811
            if not ok:
                return
        if not tm.confirmed:                                          # V1 may start draining and copying
            yield from self._confirm(tm)
        if tm.valid_pending:
            yield from self._set_valid_until_done(tm, vols, tm.valid_pending, tm.handover_seq)
            tm.valid_pending = ""
            yield from core.save()
        if tm.phase == T.TRANSITIONAL:
            yield from self._poll_source(tm, "drained")               # S815/S816
            yield from self._set_valid_until_done(tm, vols, T.SOURCE_2, 0)   # S817-S819
            yield from self._set_phase(tm, T.MIGRATING)
        if tm.phase == T.MIGRATING:
            yield from self._poll_source(tm, "complete")              # S820/S821
            missing = [v.name for v in vols if not v.migrated.all_set()]
            if missing:
                raise StateError(f"source reported complete but {missing} have unmigrated regions")
            tm.finished = core.rt.now
            T.go(T.RUN_STATE, tm, T.DONE)
            yield from self._set_phase(tm, T.DONE)                    # S822/S823
        self.waiting_for.pop(tm.id, None)

    def _handover(self, tm: TargetMigration, vols: list["Volume"]) -> Generator[Any, Any, bool]:
        core, cfg = self.core, self.core.cfg
        deadline = core.rt.now + cfg.handover_timeout_s
        for v in vols:                                                # relays already sent must finish
            while self.relays.get(v.name, 0):
                yield Wait(("relays", v.name), timeout_s=cfg.peer_timeout_s)
        src = tm.source_node
        t0 = core.rt.now
        reply = None
        while reply is None:
            tm.attempts += 1
            attempt = f"{core.incarnation}/{tm.attempts}"
            try:
                reply = yield from core.call(src.node, src.control, "mig.handover", {
                    "volumes": [m.source.volume for m in tm.members], "target": core.name, "id": tm.id,
                    "attempt": attempt}, timeout_s=max(1.0, min(cfg.peer_timeout_s, deadline - core.rt.now)))
            except RcopyError as exc:
                self.waiting_for[tm.id] = f"{src.node}: {exc}"
                if core.rt.now + cfg.poll_s >= deadline or isinstance(exc, StateError):
                    # V1 did not hand over: nothing was taken over. Back to THROUGH (V1 is still
                    # the primary), have V1 thawed, and leave the migration failed, resumable.
                    tm.error = f"handover from {src.node} failed: {exc}"
                    tm.last_attempt = attempt
                    T.go(T.RUN_STATE, tm, T.FAILED)
                    yield from self._set_phase(tm, T.THROUGH)
                    core.log("error", f"migration {tm.id}: {tm.error}; back to through mode")
                    core.service(f"thaw-{tm.id}", lambda: self._thaw_source(tm))
                    return False
                yield Sleep(cfg.poll_s)
        by_source = {m["volume"]: m for m in reply["members"]}
        for v, member in zip(vols, tm.members):                       # the pair's block size moves with it
            yield from v.reshape_diff(int(by_source[member.source.volume]["diff_block_bytes"]))
        self._take_over(tm, vols, reply)                              # S806
        if tm.mode == "async":
            g0 = reply["journal"]
            yield from core.primary._ensure_group(tm.group, int(g0["capacity_bytes"]), int(g0["counter"]),
                                                  g0.get("head"))
        for v in vols:
            yield from v.maps["diff"].persist(sync=True)
        value = T.TRANSITIONAL if tm.mode == "async" else T.SOURCE_2
        # S807-S809. If V3 does not answer quickly, host I/O is not held hostage: V2 goes on
        # (async: its entries wait in its journal; sync: its pair suspends and tracks dirty
        # regions) and the update is retried until V3 takes it.
        done = yield from self._set_valid(tm, vols, value, tm.handover_seq, cfg.valid_quick_s)
        tm.valid_pending = "" if done else value
        tm.handover_ms = (core.rt.now - t0) * 1000
        tm.last_attempt = attempt
        yield from self._set_phase(tm, T.TRANSITIONAL if tm.mode == "async" else T.MIGRATING)  # S810/S811
        for v in vols:                                                # S812/S813: the diff copy resumes here
            if v.info.pair_state == T.COPYING:
                core.primary.wake_copier(v)
        return True

    def _take_over(self, tm: TargetMigration, vols: list["Volume"], reply: wire.Message) -> None:
        """S806: V2 continues V1's pair state, diff bitmap, counter and journal position."""
        info = reply.fields
        by_source = {m["volume"]: m for m in info["members"]}
        tm.handover_seq = int(info["handover_seq"])
        for v, member in zip(vols, tm.members):
            m = by_source[member.source.volume]
            v.info.remote_copy_flag = "source"
            v.info.mode, v.info.group, v.info.transfer = m["mode"], m["group"], m["transfer"]
            # The pair is created here with V1's state (a retried handover replaces what an
            # interrupted one left: nothing of it was committed before the phase changed).
            T.start_over(T.PAIR_STATE, v.info, m["pair_state"])
            v.info.suspend_reason = str(m.get("suspend_reason", ""))
            v.maps["diff"].note(v.diff.merge_packed(reply.payloads[int(m["diff_frame"])],
                                                    int(m["diff_block_bytes"])))
            if v.info.pair_state == T.DUPLEX and v.diff.count():
                # V1 marked regions after a crash while frozen: they are resynchronised from here
                T.go(T.PAIR_STATE, v.info, T.SUSPENDED)
                v.info.suspend_reason = "handed over with regions to resynchronise"
            v.info.auto_resume = bool(m.get("auto_resume", True))
            v.info.copy_epoch = int(m.get("copy_epoch", 0))
            tm.mode, tm.group = m["mode"], m["group"]
            tm.source_pair_state = m["pair_state"]

    def _set_valid(self, tm: TargetMigration, vols: list["Volume"], value: str, handover_seq: int,
                   timeout_s: float) -> Generator[Any, Any, bool]:
        """Ask V3's node to set copy_source_valid; False if it did not answer in time."""
        sec = tm.members[0].secondary
        try:
            yield from self.core.call(sec.node, sec.control, "mig.set_valid", {
                "volumes": [m.secondary.volume for m in tm.members], "source": self.core.name,
                "value": value, "handover_seq": handover_seq}, timeout_s=timeout_s)
            return True
        except RcopyError as exc:
            self.waiting_for[tm.id] = f"{sec.node}: {exc}"
            return False

    def _set_valid_until_done(self, tm: TargetMigration, vols: list["Volume"], value: str,
                              handover_seq: int) -> Generator[Any, Any, None]:
        while not (yield from self._set_valid(tm, vols, value, handover_seq, self.core.cfg.valid_quick_s)):
            yield Sleep(self.core.cfg.poll_s * 5)

    def _poll_source(self, tm: TargetMigration, flag: str) -> Generator[Any, Any, None]:
        """S815/S820: poll 2_1 with a fixed delay until it reports ``flag`` for every member."""
        src = tm.source_node
        names = [m.source.volume for m in tm.members]
        while True:
            try:
                reply = yield from self.core.call(src.node, src.control, "mig.source_status",
                                                  {"volumes": names}, timeout_s=5.0)
                # V1's copy rate, also from the poll that finds it complete: a copy that ends
                # between two polls showed 0 MiB/s (the bench's migration without keys)
                self.rate_bytes_s = float(reply.get("rate_bytes_s", 0.0)) or self.rate_bytes_s
                self.moved_seen[tm.id] = (int(reply.get("copied_bytes", 0)), int(reply.get("zeroed_bytes", 0)))
                if all(s.get(flag) for s in reply["volumes"]):
                    return
                self.waiting_for[tm.id] = f"{src.node}: not yet {flag}"
            except NodeUnreachable as exc:
                self.waiting_for[tm.id] = f"{src.node}: {exc}"
            yield Sleep(self.core.cfg.poll_s)

    def backlog_pending(self, vol: "Volume") -> Generator[Any, Any, bool]:
        """V2 before S816: may V1 still send V3 entries below N0 (so V2 may not resync yet)?"""
        tm = self.target_of(vol)
        if tm is None or tm.phase != T.TRANSITIONAL:
            return False
        src = tm.source_node
        if src.node == self.core.name:
            return False        # one journal: the resync's fold moves V1's backlog into V2's bits too
        try:
            reply = yield from self.core.call(src.node, src.control, "mig.source_status",
                                              {"volumes": [m.source.volume for m in tm.members]}, timeout_s=5.0)
        except NodeUnreachable:
            return True
        return not all(s.get("drained") for s in reply["volumes"])

    def _confirm(self, tm: TargetMigration) -> Generator[Any, Any, None]:
        """Tell V1 that V2 took over with the snapshot of ``last_attempt`` (it can never be thawed now)."""
        src = tm.source_node
        while True:
            try:
                yield from self.core.call(src.node, src.control, "mig.confirm", {
                    "volumes": [m.source.volume for m in tm.members], "id": tm.id, "attempt": tm.last_attempt})
                break
            except RcopyError as exc:
                self.waiting_for[tm.id] = f"{src.node} (to confirm the handover): {exc}"
                yield Sleep(self.core.cfg.poll_s * 5)
        tm.confirmed = True
        yield from self.core.save()

    def _thaw_source(self, tm: TargetMigration) -> Generator[Any, Any, None]:
        """After a failed handover: tell V1 to take host updates again (V2 never took over)."""
        src = tm.source_node
        while tm.state == T.FAILED and tm.phase == T.THROUGH and tm.id in self.core.migrations:
            try:
                yield from self.core.call(src.node, src.control, "mig.thaw", {
                    "volumes": [m.source.volume for m in tm.members], "id": tm.id,
                    "attempt": tm.last_attempt})
                return
            except RcopyError as exc:
                self.waiting_for[tm.id] = f"{src.node} (to thaw it): {exc}"
                yield Sleep(self.core.cfg.poll_s * 5)

    # ================================================================== program 204 on 2_1 (Fig. 9)
    def _source_record(self, names: list[str]) -> tuple[SourceMigration, list["Volume"]]:
        vols = [self.core.volume(n) for n in names]
        sms = {id(self.source_of(v)): self.source_of(v) for v in vols}
        sm = next(iter(sms.values()))
        if len(sms) != 1 or sm is None or set(sm.volumes) != set(names):
            raise StateError(f"{names} are not prepared as the sources of one migration")
        return sm, vols

    def _h_handover(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """S901-S906 (+S911 first, SPEC 4.15): quiesce V1 and hand its management info to V2."""
        core = self.core
        sm, vols = self._source_record(list(msg["volumes"]))
        for v in vols:
            if v.info.remote_copy_flag != "source":
                raise StateError(f"{core.name}:{v.name} is not a remote-copy primary")
        if sm.stage not in (T.PREPARED, T.FROZEN):
            raise StateError(f"{core.name} has already handed over to {msg.get('target')}")
        if sm.stage == T.PREPARED:
            T.go(T.SOURCE_STAGE, sm, T.FROZEN)                       # S901/S902 + no new host update
        sm.attempt = str(msg.get("attempt", ""))
        yield from core.save()                                       # a restart stays frozen
        for v in vols:                                               # S903/S904
            deadline = core.rt.now + 60.0
            while v.inflight:
                if core.rt.now >= deadline:
                    raise StateError(f"{core.name}:{v.name}: I/O still in flight after 60 s")
                yield Wait(("idle", v.name), timeout_s=deadline - core.rt.now)
            everything = range(0, v.diff.nregions)                   # a copy step in progress finishes
            yield from v.locks.acquire(everything)
            v.locks.release(everything)
            yield from v.syncer.sync()     # V2 copies and fetches from this image: durable first
        members, journal, frames = [], {}, []
        sm.handover_seq = 0
        for v in vols:
            yield from v.maps["migrated"].update(v.migrated.clear_all(), sync=True)   # S911, before S906
            members.append({"volume": v.name, "mode": v.info.mode, "group": v.info.group,
                            "transfer": v.info.transfer, "pair_state": v.info.pair_state,
                            "suspend_reason": v.info.suspend_reason, "auto_resume": v.info.auto_resume,
                            "copy_epoch": v.info.copy_epoch, "diff_block_bytes": v.diff.block_bytes,
                            "diff_frame": len(frames)})
            frames.append(v.diff.packed())          # 32 MiB of bits for 1 TiB: a frame, compressed
        if vols[0].info.mode == "async":
            g = core.primary.groups[vols[0].info.group]
            while g.pending or g.appending or g.folding:              # every admitted write is numbered
                yield Wait(("stored", g.name), timeout_s=1.0)
            yield from g.make_durable(g.stored)     # the backlog below N0 must survive a power loss here
            sm.handover_seq = g.counter                               # N0: V2's first number
            if not self.local(sm):            # on this node V2 numbers on in the same journal
                g.handover_below = sm.handover_seq
            journal = {"counter": g.counter, "capacity_bytes": g.space.capacity, "head": g.space.head}
        yield from core.save()
        return wire.ok(frames, members=members, handover_seq=sm.handover_seq, journal=journal)

    def _h_thaw(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """V2 gave up the handover (it never took over): V1 is the primary again, unfrozen."""
        core = self.core
        vols = [core.volume(n) for n in msg["volumes"]]
        if all(self.source_of(v) is None or self.source_of(v).id != msg.get("id") for v in vols):
            return wire.ok(stage=T.PREPARED)      # not in that migration: nothing is frozen for it
        sm, vols = self._source_record(list(msg["volumes"]))
        if sm.stage == T.FROZEN and sm.attempt == str(msg.get("attempt", "")):
            T.go(T.SOURCE_STAGE, sm, T.PREPARED)
            for v in vols:
                g = core.primary.groups.get(v.info.group)
                if g is not None:
                    g.handover_below = 0
            yield from core.save()
            core.log("warning", f"migration {sm.id}: thawed, {core.name} is the primary again")
        return wire.ok(stage=sm.stage)

    def _h_confirm(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """V2 took over with our snapshot: drain the backlog and copy the regions (S907-S916)."""
        sm, vols = self._source_record(list(msg["volumes"]))
        if sm.stage == T.FROZEN:
            if sm.attempt != str(msg.get("attempt", "")):
                raise StateError(f"migration {sm.id}: confirmation for handover {msg.get('attempt')!r}, "
                                 f"but the snapshot was taken for {sm.attempt!r}")
            T.go(T.SOURCE_STAGE, sm, T.HANDED_OVER)
            yield from self.core.save()
            self._spawn_source(sm)
        elif sm.stage == T.PREPARED:
            raise StateError(f"migration {sm.id}: {self.core.name} was thawed; it did not hand over")
        return wire.ok(stage=sm.stage)

    def _spawn_source(self, sm: SourceMigration) -> None:
        self.core.service(f"migrate-source-{sm.id}", lambda: self.source_procedure(sm))

    def source_procedure(self, sm: SourceMigration) -> Generator[Any, Any, None]:
        core = self.core
        vols = [core.volume(n) for n in sm.volumes]
        if sm.stage == T.HANDED_OVER:
            # S907-S910: drain the backlog; we wait until V3 reports it applied, which is stronger
            # than "sent" and lets V3 stop accepting from V1 without any risk (SPEC 5.10).
            for v in vols:
                if v.info.mode != "async":
                    continue
                g = core.primary.groups[v.info.group]
                while g.applied < sm.handover_seq - 1 and v.info.pair_state != T.SUSPENDED:
                    yield Wait(("stored", g.name), timeout_s=core.cfg.poll_s)
            T.go(T.SOURCE_STAGE, sm, T.DRAINED)                      # S910
            yield from core.save()
            self.saved_stage[sm.id] = sm.stage
        if sm.stage == T.DRAINED:
            for v in vols:                                            # S912-S915
                yield from self._background_copy(sm, v)
            T.go(T.SOURCE_STAGE, sm, T.COMPLETE)                      # S916
            yield from core.save()
            self.saved_stage[sm.id] = sm.stage

    def _background_copy(self, sm: SourceMigration, v: "Volume") -> Generator[Any, Any, None]:
        """S912-S915: push every unmigrated region to V2, copy_streams regions in flight."""
        core = self.core
        target = sm.target[v.name]
        state = {"next": 0, "running": 0, "copied": 0, "start": core.rt.now, "error": None}
        taken: set[int] = set()
        key = ("bgcopy", sm.id, v.name)
        free = ("bgcopy-free", sm.id, v.name)      # a stream gave regions back

        def take() -> int | None:
            for start in (state["next"], 0):
                r = v.migrated.first_clear(start)
                while r is not None and r in taken:
                    r = v.migrated.first_clear(r + 1)
                if r is not None:
                    taken.add(r)
                    state["next"] = r + 1
                    return r
            return None

        def stream() -> Generator[Any, Any, None]:
            try:
                while True:
                    region = take()
                    if region is None:
                        if not taken:
                            return
                        # another stream holds what is left (a hole check reserves up to
                        # copy_hole_regions): it may give some back, so wait for it, do not end
                        yield Wait(free)
                        continue
                    run = range(region, region + 1)
                    try:
                        n = yield from self._push_holes(v, target, region, taken)
                        core.rt.notify(free)                # what it reserved and did not send
                        moved = self.moved.setdefault(sm.id, [0, 0])
                        if n:
                            run = range(region, region + n)
                            moved[1] += _run_bytes(v, run)
                        elif region in self.fetched.get(v.name, ()) and (yield from self._holds(target, region)):
                            pass                # V2 fetched it on access (counted then): not sent twice
                        else:
                            fetched = self.fetched.get(v.name, ())
                            n = _free_run(v, region, core.cfg.copy_batch_regions, taken)
                            n = next((i for i in range(1, n) if region + i in fetched), n)   # asked one by one
                            run = range(region, region + n)
                            taken.update(run)               # taken while _data_run looks at them
                            n = yield from self._data_run(v, region, n)
                            taken.difference_update(range(region + n, run.stop))
                            core.rt.notify(free)
                            run = range(region, region + n)
                            sent = yield from self._push_regions(v, target, run)
                            moved[0 if sent else 1] += sent or _run_bytes(v, run)
                        yield from v.maps["migrated"].update(v.migrated.set_regions(run))   # S915
                        state["copied"] += _run_bytes(v, run)
                        elapsed = max(core.rt.now - state["start"], 1e-6)
                        self.rate_bytes_s = state["copied"] / elapsed
                        if sm.rate_limit_bytes_s:
                            ahead = state["copied"] / sm.rate_limit_bytes_s - elapsed
                            if ahead > 0:
                                yield Sleep(min(ahead, 5.0))
                    finally:
                        taken.difference_update(run)
                        core.rt.notify(free)
            finally:
                state["running"] -= 1
                core.rt.notify(key)

        while not v.migrated.all_set():
            state["running"] = core.cfg.copy_streams
            for i in range(core.cfg.copy_streams):
                core.rt.spawn(stream(), f"copy-stream-{v.name}-{i}", on_exit=lambda t, e, r: None)
            while state["running"] > 0:
                yield Wait(key)
        self.fetched.pop(v.name, None)

    def _push_holes(self, v: "Volume", target: PeerVolume, region: int,
                    taken: set[int]) -> Generator[Any, Any, int]:
        """Unmigrated regions from ``region`` on that hold no data go to V2 as one zero command (up
        to copy_hole_regions, one SEEK_DATA); how many, or 0 (fewer than two: one by one)."""
        cfg = self.core.cfg
        run = _free_run(v, region, cfg.copy_hole_regions, taken)
        if run < 2:
            return 0
        offset = v.migrated.extent(region)[0]
        end = min(v.info.size, offset + run * cfg.region_bytes)
        taken.update(range(region, region + run))
        n = 0
        try:
            hole = yield VolHoleRun(v.name, offset, end - offset)
            n = run if hole == end - offset else hole // cfg.region_bytes
            if n < 2:
                return 0
            length = min(v.info.size, offset + n * cfg.region_bytes) - offset
            yield from self.core.call(target.node, target.control, "mig.region", {
                "volume": target.volume, "region": region, "count": n, "zero": length},
                timeout_s=self.core.cfg.peer_timeout_s)
            return n
        except RcopyError as exc:
            self.core.log("warning", f"background copy to {target.node}: {exc}; going on region by region")
            n = 0
            return 0
        finally:                                 # the caller releases what it returns
            taken.difference_update(range(region + max(n, 1), region + run))

    @staticmethod
    def _data_run(v: "Volume", region: int, limit: int) -> Generator[Any, Any, int]:
        """How many of the ``limit`` regions from ``region`` on go in one data message: up to the
        first one after it that holds no data (one SEEK_DATA each), which then goes as zeros."""
        n = 1
        while n < limit:
            offset, length = v.migrated.extent(region + n)
            hole = yield VolHoleRun(v.name, offset, length)
            if hole >= length:
                break
            n += 1
        return n

    def _push_regions(self, v: "Volume", target: PeerVolume, run: range) -> Generator[Any, Any, int]:
        """Send a run of regions to V2 in one message, retrying while it does not answer; the data
        bytes sent (0: the run holds no data and went as zeros)."""
        offset, length = v.migrated.extent(run.start)[0], _run_bytes(v, run)
        while True:
            data = yield VolRead(v.name, offset, length, sparse=True)
            try:
                yield from self.core.call(target.node, target.control, "mig.region", {
                    "volume": target.volume, "region": run.start, "count": len(run),
                    "zero": length if data is None else 0},
                    [data] if data is not None else [], timeout_s=self.core.cfg.peer_timeout_s)
                return len(data) if data is not None else 0
            except RcopyError as exc:
                self.core.log("warning", f"background copy to {target.node} paused: {exc}")
                yield Sleep(1.0)

    def _holds(self, target: PeerVolume, region: int) -> Generator[Any, Any, bool]:
        """Does V2 hold ``region`` already (its migrated bit is set)? False if it cannot say."""
        try:
            reply = yield from self.core.call(target.node, target.control, "mig.region", {
                "volume": target.volume, "region": region, "held": True}, timeout_s=self.core.cfg.peer_timeout_s)
        except RcopyError:
            return False
        return bool(reply.get("skipped"))

    def _h_fetch(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """Serve an on-demand fetch (S1113/S1506). V1's bit is set by the background copy once V2
        confirms it holds the region (it answers "skipped" for fetched ones)."""
        v = self.core.volume(msg["volume"])
        region = int(msg["region"])
        if not 0 <= region < v.migrated.nregions:
            raise UsageError(f"region {region} out of range")
        if not self.frozen(v):
            raise StateError(f"{self.core.name}:{v.name} has not handed over; nothing to fetch yet")
        offset, length = v.migrated.extent(region)
        data = yield VolRead(v.name, offset, length, sparse=True)
        sm = self.source_of(v)
        if sm is not None:
            self.moved.setdefault(sm.id, [0, 0])[0 if data is not None else 1] += length
        self.fetched.setdefault(v.name, set()).add(region)
        return wire.ok([data] if data is not None else [], zero=length if data is None else 0)

    def _h_region(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """S914 on 2_2: store a pushed region unless V2 already has it (invariant 7)."""
        v = self.core.volume(msg["volume"])
        region, count = int(msg["region"]), int(msg.get("count", 1))
        if not 0 <= region < v.migrated.nregions or not 1 <= count <= v.migrated.nregions - region:
            raise UsageError(f"regions {region}+{count} out of range")
        tm = self.target_of(v)
        if tm is None or tm.phase not in (T.TRANSITIONAL, T.MIGRATING):
            raise StateError(f"{self.core.name}:{v.name} is not migrating")
        if msg.get("held"):         # V1 asks whether a region it served on access is here already
            return wire.ok(skipped=v.migrated.is_set(region))
        regions = range(region, region + count)
        data = None
        if not msg.get("zero"):
            if len(msg.payloads) != 1 or len(msg.payloads[0]) != _run_bytes(v, regions):
                raise ProtocolError("mig.region: data does not match the regions")
            data = memoryview(msg.payloads[0])
        return (yield from self._store_regions(v, regions, data))

    def _store_regions(self, v: "Volume", regions: range, data: memoryview | None) -> Generator[Any, Any, wire.Message]:
        """S914 for a run of V1's regions (``data``: their bytes; None: they hold no data): store
        those V2 does not hold yet, then one sync for the data and one for their bits.

        A region's lock is held only while it is checked and written (for zeros: the whole run,
        one punched hole), not through the syncs, so a host request waits at most one region's
        write. Once released, a host request finds the region unmigrated still and fetches it
        again from V1 (the same bytes: V1 is frozen) before its own write; the copy never writes
        after it. The bits are set only once the data is durable, as before."""
        base = v.migrated.extent(regions.start)[0]
        written: list[range] = []
        for piece in [regions] if data is None else [range(r, r + 1) for r in regions]:
            yield from v.locks.acquire(piece)
            try:
                for run in _runs(r for r in piece if not v.migrated.is_set(r)):
                    offset, length = v.migrated.extent(run.start)[0], _run_bytes(v, run)
                    if data is None:
                        yield VolZero(v.name, offset, length)
                    else:
                        yield VolWrite(v.name, offset, data[offset - base:offset - base + length])
                    written.append(run)
            finally:
                v.locks.release(piece)
        runs = _runs(r for run in written for r in run)
        if runs:
            v.syncer.wrote()
            yield from v.syncer.sync()          # the data durable before their bits
            for i, run in enumerate(runs):
                yield from v.maps["migrated"].update(v.migrated.set_regions(run), sync=i == len(runs) - 1)
        return wire.ok(skipped=not runs)

    def _h_dual_write(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        v = self.core.volume(msg["volume"])
        if not self.frozen(v):
            raise StateError(f"{self.core.name}:{v.name} is not a migration source past its handover")
        data = write_data(msg.fields, msg.payloads, "mig.dual_write")
        offset = int(msg["offset"])
        v.check(offset, len(data))
        yield put(v.name, offset, data)
        v.syncer.wrote()
        return wire.ok()

    def _h_source_status(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        out, ids = [], set()
        for name in msg["volumes"]:
            v = self.core.volume(name)
            sm = self.source_of(v)
            ids.add(sm.id if sm else "")
            stage = sm.stage if sm else ""
            # drained and complete only once durable: V2 acts on them (V3 stops taking V1), and a
            # V1 that restarted in handed_over could never learn again that V3 has its backlog
            # (seed 133260 of the long run)
            saved = self.saved_stage.get(sm.id, "") if sm else ""
            out.append({"volume": name, "stage": stage, "drained": saved in (T.DRAINED, T.COMPLETE),
                        "complete": saved == T.COMPLETE, "migrated_fraction": v.migrated.fraction_set()})
        moved = [self.moved.get(i, [0, 0]) for i in ids]
        return wire.ok(volumes=out, rate_bytes_s=self.rate_bytes_s, copied_bytes=sum(m[0] for m in moved),
                       zeroed_bytes=sum(m[1] for m in moved))
        yield

    # ================================================================== 2_3 side (S807, S817, S1601)
    def _h_set_valid(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        core = self.core
        value = str(msg["value"])
        vols = [core.volume(n) for n in msg["volumes"]]
        for v in vols:
            if v.info.remote_copy_flag != "dest":
                raise StateError(f"{core.name}:{v.name} is not a secondary")
            if len(v.info.copy_source_info) < 2:
                raise StateError(f"{core.name}:{v.name} has no second copy source registered")
            dg = core.secondary.groups.get(v.info.group)
            if value == T.SOURCE_2 and v.info.copy_source_valid == T.TRANSITIONAL and dg is not None:
                n0 = dg.info.handover_seq
                if dg.durable_applied < n0 - 1:                      # invariant 16
                    raise StateError(f"{v.name}: V1's backlog below {n0} is not applied yet "
                                     f"(applied {dg.durable_applied})")
            if v.info.copy_source_valid != value:
                T.COPY_SOURCE_VALID.check(v.info.copy_source_valid, value)
        for v in vols:
            T.go(T.COPY_SOURCE_VALID, v.info, value)
            dg = core.secondary.groups.get(v.info.group)
            if dg is not None and msg.get("handover_seq"):
                dg.info.handover_seq = int(msg["handover_seq"])
        yield from core.save()
        return wire.ok()

    def _h_remove_source(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """S1601: forget V1 as a copy source; V2 remains, as the only (valid) source."""
        core = self.core
        v = core.volume(msg["volume"])
        if v.info.copy_source_valid == T.TRANSITIONAL:
            raise StateError(f"{core.name}:{v.name} still receives from both sources")
        gone = str(msg["source_node"]), str(msg.get("source_volume", ""))
        keep = [p for i, p in enumerate(v.info.copy_source_info, 1)
                if not p.names(*gone) and T.source_accepted(v.info.copy_source_valid, i)]
        if not keep:
            raise StateError(f"removing {':'.join(x for x in gone if x)} would leave {v.name} without a source")
        v.info.copy_source_info = keep
        if v.info.copy_source_valid == T.SOURCE_2:
            T.go(T.COPY_SOURCE_VALID, v.info, T.SOURCE_1)
        dg = core.secondary.groups.get(v.info.group)
        if dg is not None:
            dg.info.handover_seq = 0
        yield from core.save()
        return wire.ok()

    def _h_clear_target(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """S1602 (1): V2 forgets its migration source."""
        core = self.core
        v = core.volume(msg["volume"])
        tm = self.target_of(v)
        if tm is not None and tm.state != T.DONE:
            raise StateError(f"the migration to {core.name}:{v.name} is {tm.state}")
        v.info.migration_source_info = None
        v.info.migration = ""
        if tm is not None and not any(x.info.migration == tm.id for x in core.volumes.values()):
            core.migrations.pop(tm.id, None)
        yield from core.save()
        return wire.ok()

    def _h_unregister_source(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """S1602 (2),(3): V1 forgets V2 and V3; it is an ordinary volume again."""
        core = self.core
        v = core.volume(msg["volume"])
        sm = self.source_of(v)
        if v.info.remote_copy_flag == "source" and (sm is None or sm.stage != T.COMPLETE):
            raise StateError(f"{core.name}:{v.name} is still a primary or has undrained data")
        group = v.info.group
        T.go(T.PAIR_STATE, v.info, T.OFF)
        v.info.remote_copy_flag, v.info.mode, v.info.group = "off", "", ""
        v.info.copy_dest_info = None
        v.info.migration_dest_info = None
        key, v.info.migration = v.info.migration, ""
        v.maps["diff"].note(v.diff.clear_all())
        if sm is not None:
            sm.volumes = [n for n in sm.volumes if n != v.name]
            if not sm.volumes:
                core.migrations.pop(key, None)
        yield from v.maps["diff"].persist()
        yield from core.save()
        yield from core.primary.drop_group_if_unused(group)
        return wire.ok()

    def _h_abort_target(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """Abort before the handover: V2 back to normal, nothing of it used."""
        core = self.core
        vols = [core.volume(n) for n in msg.get("volumes", [])]
        tms = {v.info.migration: self.target_of(v) for v in vols if self.target_of(v)}
        for tm in tms.values():
            assert tm is not None
            if tm.phase != T.THROUGH or tm.state not in (T.RUNNING, T.FAILED):
                raise StateError(f"the migration to {core.name} is past the handover ({tm.phase}); resume "
                                 f"it instead (rcopy migrate ... --resume)")
        for tm in tms.values():
            assert tm is not None
            T.go(T.RUN_STATE, tm, T.ABORTED)
            T.go(T.PHASE, tm, T.ABORTED)
            for v in self._vols(tm):
                T.go(T.RW_MODE, v.info, T.NORMAL)
                v.info.migration_source_info = None
                v.info.copy_dest_info = None
                v.info.migration = ""
                self.core.rt.notify(("mode", v.name))
            core.migrations.pop(tm.id, None)
        yield from core.save()
        return wire.ok()

    def _h_abort_source(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """Abort before the handover: V1 forgets V2 (it never stopped being the primary)."""
        core = self.core
        v = core.volume(msg["volume"])
        sm = self.source_of(v)
        if sm is not None and sm.stage != T.PREPARED:
            raise StateError(f"{core.name}:{v.name} has already handed over")
        v.info.migration_dest_info = None
        key, v.info.migration = v.info.migration, ""
        if sm is not None:
            sm.volumes = [n for n in sm.volumes if n != v.name]
            sm.target.pop(v.name, None)
            if not sm.volumes:
                core.migrations.pop(key, None)
        yield from core.save()
        return wire.ok()

    def _h_drop_source(self, msg: wire.Message) -> Generator[Any, Any, wire.Message]:
        """Abort before the handover: V3 forgets a copy source it never accepted data from."""
        v = self.core.volume(msg["volume"])
        gone = str(msg["source_node"]), str(msg.get("source_volume", ""))
        v.info.copy_source_info = [p for i, p in enumerate(v.info.copy_source_info, 1)
                                   if not p.names(*gone) or T.source_accepted(v.info.copy_source_valid, i)]
        yield from self.core.save()
        return wire.ok()

    # ================================================================== status
    def status(self) -> list[dict[str, Any]]:
        out = []
        for tm in self.core.migrations.values():
            if not isinstance(tm, TargetMigration):
                continue
            vols = [self.core.volumes[m.target] for m in tm.members if m.target in self.core.volumes]
            if not vols:
                continue
            frac = sum(v.migrated.fraction_set() for v in vols) / len(vols) if tm.phase != T.THROUGH else 0.0
            out.append({"id": tm.id, "source": tm.members[0].source.label,
                        "target": f"{self.core.name}:{tm.members[0].target}",
                        "members": {m.source.label: f"{self.core.name}:{m.target}" for m in tm.members},
                        "mode": vols[0].info.rw_mode, "phase": tm.phase, "state": tm.state,
                        "migrated_fraction": 1.0 if tm.phase == T.DONE else round(frac, 4),
                        "held_ms_max": round(tm.held_ms_max, 1), "handover_ms": round(tm.handover_ms, 1),
                        "rate_bytes_s": self.rate_bytes_s, "error": tm.error or None,
                        # what V1 sent: data (copied and fetched) and ranges it sent as zeros, not kept
                        # across restarts
                        "copied_bytes": self.moved_seen.get(tm.id, (0, 0))[0],
                        "zeroed_bytes": self.moved_seen.get(tm.id, (0, 0))[1],
                        "waiting_for": self.waiting_for.get(tm.id), "group": tm.group,
                        "dual_write_lost": tm.dual_write_lost or None})
        return out
