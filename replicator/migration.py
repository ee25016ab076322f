"""Live migration of a primary V1 (node 2_1) to V2 (node 2_2) while V3 keeps receiving (SPEC 4).

Roles, all in one MigrationManager per node:

* **target** (V2, program 203, Fig. 8): THROUGH -> PENDING -> MIGRATING -> NORMAL;
  relays in THROUGH, holds in PENDING, fetches unmigrated regions on access in
  MIGRATING, takes over pair state, diff bitmap and the sequence counter/journal.
* **source** (V1, program 204, Fig. 9): on handover stops taking host writes,
  waits for in-flight I/O, hands over its management information, drains its
  journal backlog to V3, then pushes every unmigrated region to V2.
* **secondary** (V3): gains V2 as copy source 2 and moves copy_source_valid
  1 -> transitional -> 2 (async) or 1 -> 2 (sync).

Every phase is persisted in the volumes' management information, so a restarted
node resumes where it stopped (``resume_after_restart``).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from . import states, wire
from .errors import NodeUnreachable, ProtocolError, RcopyError, StateError, UsageError
from .mgmt import PeerVolume
from .regionmap import RegionCursor

if TYPE_CHECKING:
    from .node import Node, Volume

log = logging.getLogger("rcopy.migration")

PENDING_HOLD_MAX_S = 120.0
POLL_S = 0.05
PEER_TIMEOUT_S = 30.0
COPY_STREAMS = 3         # regions of the background copy in flight at once
VALID_QUICK_S = 3.0       # S807 waits this long for V3 before V2 goes on without holding host I/O


class MigrationManager:
    """The migration programs of one node (203 as target, 204 as source, 202's part as secondary)."""

    def __init__(self, node: "Node") -> None:
        self.node = node
        self.mode_changed = threading.Condition()
        self.relays = 0
        self.held_ms_max = 0.0
        self.rate_bytes_s = 0.0
        self.handlers = {
            "mig.prepare_target": self._h_prepare_target,
            "mig.prepare_source": self._h_prepare_source,
            "mig.add_source": self._h_add_source,
            "mig.start": self._h_start,
            "mig.handover": self._h_handover,
            "mig.set_valid": self._h_set_valid,
            "mig.source_status": self._h_source_status,
            "mig.fetch": self._h_fetch,
            "mig.region": self._h_region,
            "mig.dual_write": self._h_dual_write,
            "mig.remove_source": self._h_remove_source,
            "mig.clear_target": self._h_clear_target,
            "mig.unregister_source": self._h_unregister_source,
            "mig.abort_target": self._h_abort_target,
            "mig.abort_source": self._h_abort_source,
            "mig.drop_source": self._h_drop_source,
        }

    # ================================================================ host I/O on V2 (Fig. 10)
    def read(self, vol: "Volume", offset: int, length: int) -> bytes:
        mode = self._wait_not_pending(vol)
        if mode == states.THROUGH:
            return self._relay(vol, "volume.read", offset=offset, length=length).payloads[0]
        with vol.inflight.track():
            if mode == states.MIGRATING:
                self._ensure_migrated(vol, offset, length)
            return vol.store.read(offset, length)

    def write(self, vol: "Volume", data: bytes, offset: int, fua: bool) -> None:
        if vol.info.migration.get("frozen") and vol.info.rw_mode == states.NORMAL:
            dest = vol.info.migration_dest_info
            raise StateError(f"{self.node.name}:{vol.info.name} has handed over to "
                             f"{dest.label if dest else 'its new primary'}; write there")
        mode = self._wait_not_pending(vol)
        if mode == states.THROUGH:
            self._relay(vol, "volume.write", [bytes(data)], offset=offset, fua=fua)
            return
        with vol.inflight.track():
            if mode == states.MIGRATING:
                self._ensure_migrated(vol, offset, len(data))
            self.node.write_local_and_replicate(vol, data, offset)
            if fua:
                self.node.flush(vol)
            if vol.info.migration.get("dual_write") and vol.info.rw_mode == states.MIGRATING:
                src = vol.info.migration_source_info
                try:
                    self.node.peer(src, wire.Message("mig.dual_write", {
                        "volume": src.volume, "offset": offset}, [bytes(data)]), timeout_s=PEER_TIMEOUT_S)
                except RcopyError as exc:  # the fallback copy is best effort; V2 is the primary
                    log.warning("dual write to %s failed: %s", src.label, exc)

    def _wait_not_pending(self, vol: "Volume") -> str:
        """S1109/S1110: hold requests while PENDING; they run, in order, when the mode changes."""
        if vol.info.rw_mode != states.PENDING:
            return vol.info.rw_mode
        start = time.monotonic()
        with self.mode_changed:
            ok = self.mode_changed.wait_for(lambda: vol.info.rw_mode != states.PENDING, PENDING_HOLD_MAX_S)
        held_ms = (time.monotonic() - start) * 1000
        self.held_ms_max = max(self.held_ms_max, held_ms)
        vol.info.migration["held_ms_max"] = max(vol.info.migration.get("held_ms_max", 0.0), held_ms)
        if not ok:
            raise StateError(f"{vol.info.name}: request held {held_ms:.0f} ms in pending mode; giving up")
        return vol.info.rw_mode

    def relay_flush(self, vol: "Volume") -> None:
        self._relay(vol, "volume.flush")

    def _relay(self, vol: "Volume", kind: str, payloads: list[bytes] | None = None, **fields: Any) -> wire.Message:
        """S1104-S1108: THROUGH mode sends the request to V1, which does all the work."""
        src = vol.info.migration_source_info
        with self.mode_changed:
            self.relays += 1
        try:
            return self.node.peer(src, wire.Message(kind, dict(fields, volume=src.volume), payloads or []),
                                  timeout_s=PEER_TIMEOUT_S)
        finally:
            with self.mode_changed:
                self.relays -= 1
                self.mode_changed.notify_all()

    def _ensure_migrated(self, vol: "Volume", offset: int, length: int) -> None:
        """S1111-S1114: migrate the regions a request touches before processing it locally."""
        for region in vol.migrated.regions(offset, length):
            if not vol.migrated.is_set(region):
                ro, rl = vol.migrated.extent(region)
                with vol.locks.hold(ro, rl):
                    self.fetch_region(vol, region)

    def fetch_region(self, vol: "Volume", region: int) -> None:
        """Copy one region V1 -> V2 on demand (caller holds the region lock); idempotent."""
        if vol.migrated.is_set(region):
            return
        src = vol.info.migration_source_info
        reply = self.node.peer(src, wire.Message("mig.fetch", {"volume": src.volume, "region": region}),
                               timeout_s=PEER_TIMEOUT_S)
        offset, _ = vol.migrated.extent(region)
        if reply.get("zero"):
            vol.store.zero(offset, int(reply["zero"]))
        else:
            vol.store.write(offset, reply.payloads[0])
        vol.migrated.set(region)  # S1114: only after the data is on V2

    # ================================================================ terminal-facing (S603, S604, S701, S705)
    def _h_prepare_target(self, msg: wire.Message) -> wire.Message:
        """S603 (1),(3) + S701 on 2_2: register V1 and V3 for V2 and enter THROUGH mode."""
        node = self.node
        members = msg["members"]
        with node.mgmt.lock:
            vols = []
            for m in members:
                vol = node.volume(m["target"])
                info = vol.info
                if info.remote_copy_flag != "off" or info.rw_mode != states.NORMAL:
                    raise StateError(f"target {node.name}:{info.name} is in use ({info.role}, {info.rw_mode})")
                if info.size != m["size"]:
                    raise UsageError(f"target {node.name}:{info.name} has {info.size} bytes, "
                                     f"the source has {m['size']}; sizes must match")
                if vol.inflight.count:
                    raise StateError(f"target {node.name}:{info.name} has I/O in flight; is a host using it?")
                vols.append((vol, m))
            for vol, m in vols:
                info = vol.info
                info.migration_source_info = PeerVolume(**m["source"])
                info.copy_dest_info = PeerVolume(**m["secondary"])
                info.rw_mode = states.rw_transition(info.rw_mode, states.THROUGH)
                info.migration = {"phase": "through", "state": "running", "role": "target",
                                  "group": msg.get("group", ""), "dual_write": bool(msg.get("dual_write")),
                                  "members": [x["target"] for x in members], "started": time.time()}
            node.save()
        return wire.ok()

    def _h_prepare_source(self, msg: wire.Message) -> wire.Message:
        """S603 (2): V1.migration_dest_info = V2."""
        vol = self.node.volume(msg["volume"])
        if vol.info.remote_copy_flag != "source":
            raise StateError(f"{self.node.name}:{vol.info.name} is not a remote-copy primary")
        with self.node.mgmt.lock:
            vol.info.migration_dest_info = PeerVolume(**msg["target"])
            vol.info.migration.update(role="source", state="running",
                                      rate_limit_bytes_s=int(msg.get("rate_limit_bytes_s") or 0))
            self.node.save()
        return wire.ok()

    def _h_add_source(self, msg: wire.Message) -> wire.Message:
        """S604 on 2_3: add V2 as copy-source entry 2 of V3."""
        vol = self.node.volume(msg["volume"])
        src = PeerVolume(**msg["source"])
        with self.node.mgmt.lock:
            if vol.info.remote_copy_flag != "dest":
                raise StateError(f"{self.node.name}:{vol.info.name} is not a secondary")
            if all(p.node != src.node or p.volume != src.volume for p in vol.info.copy_source_info):
                vol.info.copy_source_info.append(src)
            self.node.save()
        return wire.ok(index=len(vol.info.copy_source_info))

    def _h_start(self, msg: wire.Message) -> wire.Message:
        """S705: start program 203 on 2_2 (returns at once; the terminal polls status)."""
        vols = self._target_members()
        if not vols:
            raise StateError(f"{self.node.name} has no volume prepared for migration")
        if any(v.info.rw_mode != states.THROUGH for v in vols):
            raise StateError("migration already started")
        self.node._spawn(lambda: self._run_target(vols), "rcopy-migrate")
        return wire.ok()

    def _target_members(self) -> list["Volume"]:
        return [v for v in self.node.volumes.values()
                if v.info.migration.get("role") == "target" and v.info.migration.get("state") == "running"]

    # ================================================================ program 203 on 2_2 (Fig. 8)
    def _set_phase(self, vols: list["Volume"], rw_mode: str | None, phase: str, **extra: Any) -> None:
        with self.node.mgmt.lock:
            for v in vols:
                if rw_mode is not None:
                    v.info.rw_mode = states.rw_transition(v.info.rw_mode, rw_mode)
                v.info.migration["phase"] = phase
                v.info.migration.update(extra)
            self.node.save()
        with self.mode_changed:
            self.mode_changed.notify_all()
        log.info("migration: %s", phase)

    def _run_target(self, vols: list["Volume"]) -> None:
        try:
            self._target_procedure(vols)
        except Exception as exc:
            log.exception("migration failed")
            with self.node.mgmt.lock:
                for v in vols:
                    v.info.migration.update(state="failed", error=str(exc))
                self.node.save()

    def _target_procedure(self, vols: list["Volume"]) -> None:
        node = self.node
        src_node = vols[0].info.migration_source_info
        phase = vols[0].info.migration.get("phase")
        if vols[0].info.rw_mode in (states.THROUGH, states.PENDING):
            if vols[0].info.rw_mode == states.THROUGH:
                for v in vols:
                    v.migrated.clear_all()                          # S801
                self._set_phase(vols, states.PENDING, "pending")    # S802
            with self.mode_changed:                                 # relays already sent must finish
                self.mode_changed.wait_for(lambda: self.relays == 0, PEER_TIMEOUT_S)
            t0 = time.monotonic()
            reply = node.peer(src_node, wire.Message("mig.handover", {   # S803-S805
                "volumes": [v.info.migration_source_info.volume for v in vols],
                "target": node.name}), timeout_s=120)
            self._take_over(vols, reply.fields)                      # S806
            async_ = vols[0].info.mode == "async"
            value = states.TRANSITIONAL if async_ else states.SOURCE_2
            # S807-S809. If V3 does not answer quickly, host I/O is not held hostage: V2 goes
            # on (async: its entries wait in its journal; sync: its pair suspends and tracks
            # dirty regions) and the update is retried below until V3 takes it.
            done = self._set_valid(vols, value, reply["handover_seq"], VALID_QUICK_S)
            self._set_phase(vols, states.MIGRATING,                   # S810, S811
                            "transitional" if async_ else "migrating",
                            handover_ms=(time.monotonic() - t0) * 1000,
                            valid_pending="" if done else value)
            if vols[0].info.mode == "async":
                node._start_source_group(node.source_groups[vols[0].info.group])
            node._copier_wake.set()                                  # S812/S813: diff copy resumes here
            phase = vols[0].info.migration["phase"]
        pending_value = vols[0].info.migration.get("valid_pending")
        if pending_value:
            while not self._set_valid(vols, pending_value, vols[0].info.migration.get("handover_seq", 0),
                                      VALID_QUICK_S):
                time.sleep(POLL_S * 10)
            self._set_phase(vols, None, phase, valid_pending="")
        if phase == "transitional":
            self._poll_source(vols, "drained")                       # S815/S816
            while not self._set_valid(vols, states.SOURCE_2, 0, VALID_QUICK_S):  # S817-S819
                time.sleep(POLL_S * 10)
            self._set_phase(vols, None, "migrating")
        self._poll_source(vols, "complete")                          # S820/S821
        missing = [v.info.name for v in vols if not v.migrated.all_set()]
        if missing:
            raise StateError(f"source reported complete but {missing} have unmigrated regions")
        self._set_phase(vols, states.NORMAL, "done", state="done", finished=time.time())  # S822/S823

    def _set_valid(self, vols: list["Volume"], value: str, handover_seq: int, timeout_s: float) -> bool:
        """Ask V3's node to set copy_source_valid; False if it did not answer in time."""
        try:
            self.node.peer(vols[0].info.copy_dest_info, wire.Message("mig.set_valid", {
                "volumes": [v.info.copy_dest_info.volume for v in vols], "source": self.node.name,
                "value": value, "handover_seq": handover_seq}), timeout_s=timeout_s)
            return True
        except NodeUnreachable as exc:
            for v in vols:
                v.info.migration["waiting_for"] = f"{v.info.copy_dest_info.node}: {exc}"
            return False

    def _take_over(self, vols: list["Volume"], info: dict[str, Any]) -> None:
        """S806: V2 continues V1's pair state, diff bitmap, counter and journal pointers."""
        node = self.node
        by_source = {m["volume"]: m for m in info["members"]}
        with node.mgmt.lock:
            for v in vols:
                m = by_source[v.info.migration_source_info.volume]
                v.info.remote_copy_flag = "source"
                v.info.mode, v.info.group, v.info.transfer = m["mode"], m["group"], m["transfer"]
                v.info.pair_state = m["pair_state"]
                v.info.suspend_reason = m.get("suspend_reason", "")
                v.info.auto_resume = bool(m.get("auto_resume", True))
                v.info.copy_epoch = int(m.get("copy_epoch", 0))
                v.diff.merge(bytes.fromhex(m["diff_bitmap"]))
                v.info.migration["handover_seq"] = info["handover_seq"]
                v.info.migration["source_pair_state"] = m["pair_state"]
            if vols[0].info.mode == "async":
                group = node._source_group(vols[0].info.group, int(info["journal"]["capacity_bytes"]))
                if group.journal.counter < int(info["journal"]["counter"]):
                    group.journal.adopt(info["journal"])
                group.next_send = group.journal.counter
            node.save()

    def _poll_source(self, vols: list["Volume"], flag: str) -> None:
        """S815/S820: poll 2_1 with a fixed delay until it reports ``flag`` for every member."""
        src = vols[0].info.migration_source_info
        names = [v.info.migration_source_info.volume for v in vols]
        while not self.node._stop.is_set():
            try:
                reply = self.node.peer(src, wire.Message("mig.source_status", {"volumes": names}),
                                       timeout_s=5.0)
                if all(s.get(flag) for s in reply["volumes"]):
                    return
                for v in vols:
                    v.info.migration["source_progress"] = reply["volumes"]
                self.rate_bytes_s = float(reply.get("rate_bytes_s", 0.0))
            except NodeUnreachable as exc:
                for v in vols:
                    v.info.migration["waiting_for"] = f"{src.node}: {exc}"
            time.sleep(POLL_S * 4)

    # ================================================================ program 204 on 2_1 (Fig. 9)
    def _h_handover(self, msg: wire.Message) -> wire.Message:
        """S901-S906 (+S911 first, SPEC 4.15): quiesce V1 and hand its management info to V2."""
        node = self.node
        vols = [node.volume(n) for n in msg["volumes"]]
        for v in vols:
            if v.info.remote_copy_flag != "source":
                raise StateError(f"{node.name}:{v.info.name} is not a remote-copy primary")
        already = all(v.info.migration.get("frozen") for v in vols)
        with node.mgmt.lock:
            for v in vols:
                v.info.migration["frozen"] = True                 # S901/S902 + no new host updates
            node.save()
        for v in vols:                                             # S903/S904
            if not v.inflight.wait_idle(60):
                raise StateError(f"{node.name}:{v.info.name}: I/O still in flight after 60 s")
            with v.locks.hold(0, v.info.size):                     # an in-progress copy step finishes
                pass
        members = []
        group = None
        handover_seq = 0
        for v in vols:
            if not already:
                v.migrated.clear_all()                             # S911, moved before S906
            members.append({"volume": v.info.name, "mode": v.info.mode, "group": v.info.group,
                            "transfer": v.info.transfer, "pair_state": v.info.pair_state,
                            "suspend_reason": v.info.suspend_reason, "auto_resume": v.info.auto_resume,
                            "copy_epoch": v.info.copy_epoch,
                            "diff_bitmap": v.diff.to_bytes().hex()})
            if v.info.mode == "async":
                group = node.source_groups[v.info.group]
        journal_meta: dict[str, Any] = {}
        if group is not None:
            with group.lock:
                handover_seq = group.journal.counter               # N0: V2's first number
                group.handover_below = handover_seq
                journal_meta = group.journal.meta()
        with node.mgmt.lock:
            for v in vols:
                v.info.migration.update(handover_seq=handover_seq, drained=False, complete=False,
                                        role="source", state="running")
            node.save()
        node._spawn(lambda: self._run_source(vols), "rcopy-migrate-source")
        return wire.ok(members=members, handover_seq=handover_seq, journal=journal_meta)

    def _run_source(self, vols: list["Volume"]) -> None:
        try:
            self._source_procedure(vols)
        except Exception:
            log.exception("source side of the migration failed")

    def _source_procedure(self, vols: list["Volume"]) -> None:
        node = self.node
        # S907-S910: drain the backlog; we wait until V3 reports it applied, which is stronger
        # than "sent" and lets V3 stop accepting from V1 without any risk (SPEC 5.10).
        for v in vols:
            if v.info.mode == "async" and not v.info.migration.get("drained"):
                group = node.source_groups[v.info.group]
                n0 = v.info.migration["handover_seq"]
                while group.journal.applied < n0 - 1 and not node._stop.is_set():
                    if v.info.pair_state == states.SUSPENDED:
                        break  # the backlog was folded into diff_bitmap, which V2 took over
                    time.sleep(POLL_S)
        if node._stop.is_set():
            return                                                 # resumed after the restart
        with node.mgmt.lock:
            for v in vols:
                v.info.migration["drained"] = True                 # S910
            node.save()
        for v in vols:                                             # S912-S915
            self._background_copy(v, v.info.migration_dest_info)
        if not all(v.migrated.all_set() for v in vols):
            return                                                 # stopped: resumed after the restart
        with node.mgmt.lock:
            for v in vols:
                v.info.migration["complete"] = True                # S916
            node.save()

    def _background_copy(self, v: "Volume", target: PeerVolume) -> None:
        """S912-S915: push every unmigrated region to V2, COPY_STREAMS regions in flight."""
        cursor, progress = RegionCursor(v.migrated), _CopyProgress(v.info.migration.get("rate_limit_bytes_s"))
        streams = [self.node._spawn(lambda: self._copy_stream(v, target, cursor, progress), "rcopy-migrate-copy")
                   for _ in range(COPY_STREAMS)]
        for t in streams:
            t.join()

    def _copy_stream(self, v: "Volume", target: PeerVolume, cursor: RegionCursor, progress: "_CopyProgress") -> None:
        try:
            while (region := cursor.take()) is not None and not self.node._stop.is_set():
                try:
                    if self._push_region(v, target, region):
                        v.migrated.set(region)                     # S915
                        self.rate_bytes_s = progress.add(v.migrated.extent(region)[1])
                finally:
                    cursor.release(region)
        finally:
            self.node.clients.forget_thread()

    def _push_region(self, v: "Volume", target: PeerVolume, region: int) -> bool:
        """Send one region to V2, retrying while it is unreachable; False if the node stops first."""
        while not self.node._stop.is_set():
            data, zero = self._region_data(v, region)
            try:
                self.node.peer(target, wire.Message("mig.region", {
                    "volume": target.volume, "region": region, "zero": zero},
                    [data] if data is not None else []), timeout_s=PEER_TIMEOUT_S)
                return True
            except NodeUnreachable as exc:
                log.warning("background copy to %s paused: %s", target.node, exc)
                time.sleep(1.0)
        return False

    def _region_data(self, v: "Volume", region: int) -> tuple[bytes | None, int]:
        offset, length = v.migrated.extent(region)
        if v.store.is_hole(offset, length):
            return None, length
        return v.store.read(offset, length), 0

    def _h_fetch(self, msg: wire.Message) -> wire.Message:
        """Serve an on-demand fetch (S1113/S1506)."""
        v = self.node.volume(msg["volume"])
        region = int(msg["region"])
        if not 0 <= region < v.migrated.nregions:
            raise UsageError(f"region {region} out of range")
        data, zero = self._region_data(v, region)
        # V1's bit is set by the background copy once V2 confirms it holds the region
        # (it answers "skipped" for fetched ones): setting it here would lose the region
        # if 2_2 died before storing it.
        return wire.ok([data] if data is not None else [], zero=zero)

    def _h_region(self, msg: wire.Message) -> wire.Message:
        """S914 on 2_2: store a pushed region unless V2 already has it (invariant 7)."""
        v = self.node.volume(msg["volume"])
        region = int(msg["region"])
        if not 0 <= region < v.migrated.nregions:
            raise UsageError(f"region {region} out of range")
        offset, length = v.migrated.extent(region)
        with v.locks.hold(offset, length):
            if v.migrated.is_set(region):
                return wire.ok(skipped=True)
            if msg.get("zero"):
                v.store.zero(offset, length)
            elif msg.payloads and len(msg.payloads[0]) == length:
                v.store.write(offset, msg.payloads[0])
            else:
                raise ProtocolError("mig.region: data does not match the region")
            v.migrated.set(region)
        return wire.ok(skipped=False)

    def _h_dual_write(self, msg: wire.Message) -> wire.Message:
        """[OPTION] dual write: keep V1 current for fallback, never remote-copied from V1."""
        v = self.node.volume(msg["volume"])
        v.store.write(int(msg["offset"]), msg.payloads[0])
        return wire.ok()

    def _h_source_status(self, msg: wire.Message) -> wire.Message:
        out = []
        for name in msg["volumes"]:
            v = self.node.volume(name)
            m = v.info.migration
            out.append({"volume": name, "drained": bool(m.get("drained")), "complete": bool(m.get("complete")),
                        "migrated_fraction": v.migrated.fraction_set()})
        return wire.ok(volumes=out, rate_bytes_s=self.rate_bytes_s)

    # ================================================================ 2_3 side (S807, S817, S1601)
    def _h_set_valid(self, msg: wire.Message) -> wire.Message:
        node = self.node
        with node.mgmt.lock:
            for name in msg["volumes"]:
                v = node.volume(name)
                v.info.copy_source_valid = states.valid_transition(v.info.copy_source_valid, msg["value"])
                if v.info.group in node.dest_groups and msg.get("handover_seq"):
                    node.dest_groups[v.info.group].info.handover_seq = int(msg["handover_seq"])
            node.save()
        return wire.ok()

    def _h_remove_source(self, msg: wire.Message) -> wire.Message:
        """S1601: forget V1 as a copy source; V2 remains, as the only (valid) source."""
        node = self.node
        v = node.volume(msg["volume"])
        with node.mgmt.lock:
            if v.info.copy_source_valid == states.TRANSITIONAL:
                raise StateError(f"{node.name}:{v.info.name} still receives from both sources")
            keep = [p for i, p in enumerate(v.info.copy_source_info, 1)
                    if p.node != msg["source_node"] and states.source_accepted(v.info.copy_source_valid, i)]
            if not keep:
                raise StateError(f"removing {msg['source_node']} would leave {v.info.name} without a source")
            v.info.copy_source_info = keep
            v.info.copy_source_valid = states.SOURCE_1
            if v.info.group in node.dest_groups:
                node.dest_groups[v.info.group].info.handover_seq = 0
            node.save()
        return wire.ok()

    def _h_clear_target(self, msg: wire.Message) -> wire.Message:
        """S1602 (1): V2 forgets its migration source."""
        v = self.node.volume(msg["volume"])
        with self.node.mgmt.lock:
            v.info.migration_source_info = None
            v.info.migration = {k: v.info.migration[k] for k in ("held_ms_max", "handover_ms") if k in v.info.migration}
            self.node.save()
        return wire.ok()

    def _h_unregister_source(self, msg: wire.Message) -> wire.Message:
        """S1602 (2),(3): V1 forgets V2 and V3; it is an ordinary volume again."""
        node = self.node
        v = node.volume(msg["volume"])
        m = v.info.migration
        if v.info.remote_copy_flag == "source" and not (m.get("complete") and m.get("drained")):
            raise StateError(f"{node.name}:{v.info.name} is still a primary or has undrained data")
        with node.mgmt.lock:
            group = v.info.group
            v.info.remote_copy_flag, v.info.mode, v.info.pair_state, v.info.group = "off", "", "", ""
            v.info.copy_dest_info = None
            v.info.migration_dest_info = None
            v.info.migration = {}
            v.diff.clear_all()
            node.save()
        node._drop_source_group_if_unused(group)
        return wire.ok()

    def _h_abort_target(self, msg: wire.Message) -> wire.Message:
        """Abort before the handover: V2 back to normal, nothing of it used."""
        vols = self._target_members() or [self.node.volume(n) for n in msg.get("volumes", [])]
        with self.node.mgmt.lock:
            for v in vols:
                if v.info.rw_mode not in (states.THROUGH, states.NORMAL) or v.info.remote_copy_flag != "off":
                    raise StateError(f"{v.info.name} is past the handover ({v.info.rw_mode}); "
                                     f"resume the migration instead")
            for v in vols:
                v.info.rw_mode = states.NORMAL
                v.info.migration_source_info = None
                v.info.copy_dest_info = None
                v.info.migration = {}
            self.node.save()
        return wire.ok()

    def _h_abort_source(self, msg: wire.Message) -> wire.Message:
        """Abort before the handover: V1 forgets V2 (it never stopped being the primary)."""
        v = self.node.volume(msg["volume"])
        with self.node.mgmt.lock:
            if v.info.migration.get("frozen"):
                raise StateError(f"{self.node.name}:{v.info.name} has already handed over")
            v.info.migration_dest_info = None
            v.info.migration = {}
            self.node.save()
        return wire.ok()

    def _h_drop_source(self, msg: wire.Message) -> wire.Message:
        """Abort before the handover: V3 forgets a copy source it never accepted data from."""
        node = self.node
        v = node.volume(msg["volume"])
        with node.mgmt.lock:
            keep = [p for i, p in enumerate(v.info.copy_source_info, 1)
                    if p.node != msg["source_node"] or states.source_accepted(v.info.copy_source_valid, i)]
            v.info.copy_source_info = keep
            node.save()
        return wire.ok()

    # ================================================================ status and restart
    def status(self) -> list[dict[str, Any]]:
        out = []
        for v in self.node.volumes.values():
            m = v.info.migration
            if m.get("role") != "target" or not v.info.migration_source_info:
                continue
            out.append({"source": v.info.migration_source_info.label, "target": f"{self.node.name}:{v.info.name}",
                        "mode": v.info.rw_mode, "phase": m.get("phase"), "state": m.get("state"),
                        "migrated_fraction": v.migrated.fraction_set() if m.get("phase") != "through" else 0.0,
                        "held_ms_max": round(m.get("held_ms_max", 0.0), 1),
                        "handover_ms": round(m.get("handover_ms", 0.0), 1),
                        "rate_bytes_s": self.rate_bytes_s, "error": m.get("error"),
                        "waiting_for": m.get("waiting_for"), "group": m.get("group")})
        return out

    def resume_after_restart(self) -> None:
        """Continue whatever migration role this node had when it stopped."""
        targets = [v for v in self._target_members() if v.info.rw_mode in (states.PENDING, states.MIGRATING)]
        if targets:
            log.info("resuming migration of %s", [v.info.name for v in targets])
            self.node._spawn(lambda: self._run_target(targets), "rcopy-migrate")
        sources = [v for v in self.node.volumes.values()
                   if v.info.migration.get("frozen") and v.info.migration.get("role") == "source"
                   and not v.info.migration.get("complete")]
        for v in sources:
            if v.info.mode == "async" and v.info.group in self.node.source_groups:
                self.node.source_groups[v.info.group].handover_below = v.info.migration["handover_seq"]
        if sources:
            self.node._spawn(lambda: self._run_source(sources), "rcopy-migrate-source")


class _CopyProgress:
    """Bytes copied by all streams of one background copy, its rate, and the --rate throttle."""

    def __init__(self, limit_bytes_s: float | None) -> None:
        self.limit = float(limit_bytes_s or 0)
        self.start = time.monotonic()
        self.copied = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> float:
        """Count a copied region, sleep if ahead of the limit; return the rate so far."""
        with self._lock:
            self.copied += nbytes
            ahead = self.copied / self.limit - (time.monotonic() - self.start) if self.limit else 0.0
        if ahead > 0:
            time.sleep(min(ahead, 5.0))
        return self.copied / max(time.monotonic() - self.start, 1e-6)
