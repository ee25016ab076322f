"""The SPEC's section 7 invariants, checked after every step of every daemon.

* states move only along their tables (9, 16 and the pair, copy-source and phase tables);
* the secondary is always a write-order-consistent prefix of the primary's
  numbered writes while it says it is consistent (12, 17, 18), and never lost an
  entry it reported applied, even across a power loss (13, 26);
* a sync secondary holds every acknowledged write, except in regions the current
  primary's diff bitmap marks (19, 20);
* V1 sends only numbers below N0 and V2 only from N0 (17); V3 takes V2 alone only
  after V1's backlog is applied (16);
* journal pointers keep their order (24); memory stays within its limits;
* at the end (``final``): the secondary equals the primary, every host request
  completed once (5), and no task of any node failed with a bug.

Host-visible checks (read-your-writes, no acknowledged write lost: 2, 3) are in
host.py; they judge every read the host does and the final read of every block.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core import effects as E
from ..core import tables as T
from ..core.model import SourceMigration, TargetMigration
from .host import BLOCK, decode

if TYPE_CHECKING:
    from .scenario import Run
    from .world import Daemon

INF = 1 << 62
_TABLES = {"pair_state": T.PAIR_STATE, "rw_mode": T.RW_MODE, "copy_source_valid": T.COPY_SOURCE_VALID}


class Checker:
    def __init__(self, run: "Run") -> None:
        self.run, self.w = run, run.w
        self.seqs: dict[tuple[str, int], list[int]] = {}     # (group, host write id) -> its seqs (a retried
                                                              # write is journaled again)
        self.appended: dict[tuple[str, str], set[int]] = {}   # (node, group) -> seqs appended there
        self.untracked: set[int] = set()                      # writes that reached a volume unnumbered
        self._decoded: dict[int, tuple[int, list[int | None]]] = {}  # id(file) -> (version, write ids)
        self.seq_version = 0                                  # bumped when ``seqs`` changes
        self.seq_resets = 0                                   # bumped when seqs are taken away
        self._bounds_of: dict[str, tuple[list[float], list[float]]] = {}   # V3 volume -> per-block low, high
        self._dirty_files: dict[int, set[int]] = {}           # id(SimFile) -> blocks changed since
        self._dirty_touch: dict[int, set[int]] = {}           # id(host) -> blocks whose writes' seqs changed
        self._resets_seen: dict[str, int] = {}
        self._last: dict[str, Any] = {}                       # inputs of the last check of each kind
        self.states: dict[tuple[str, str, str], str] = {}
        self.applied_max: dict[str, int] = {}
        self.reported: dict[str, int] = {}                    # group -> highest applied site-b reported
        self.checks = 0
        self.host_of: dict[str, Any] = {}

    def ids(self, f: Any) -> list[int | None]:
        """The write ids of a SimFile's blocks, decoded again only where it changed."""
        cached = self._decoded.get(id(f))
        if cached is None or f.changes is None:
            f.changes = []
            cached = (f.version, decode(bytes(f.current), 0))
            self._decoded[id(f)] = cached
        elif cached[0] != f.version:
            ids = cached[1]
            dirty = self._dirty_files.setdefault(id(f), set())
            for start, end in f.changes:
                first, last = start // BLOCK, -(-end // BLOCK)
                ids[first:last] = decode(bytes(f.current[first * BLOCK:last * BLOCK]), first)
                dirty.update(range(first, last))
            f.changes.clear()
            cached = (f.version, ids)
            self._decoded[id(f)] = cached
        return cached[1]

    def install(self) -> None:
        for (v1, v2, v3, app), h in zip(self.run.pairs, self.run.hosts):
            for name in (v1, v2, v3):
                self.host_of[name] = h
        self.w.taps.append(self.tap)
        self.w.landed.append(self.land)
        self.w.checkers.append(self.step)

    # ------------------------------------------------------------------ taps on effects
    def land(self, d: "Daemon", eff: Any) -> None:
        if isinstance(eff, E.VolWrite) and d.name != "site-b":
            # A write that reaches a primary's volume before it has a number (the tracked path, or an
            # attempt before the one that got journaled) may reach V3 by a copy: no bound from its seq.
            for wid in set(decode(bytes(eff.data), eff.offset // BLOCK)):
                if wid and not self.seqs.get((self.run.group, wid)) and wid not in self.untracked:
                    self.untracked.add(wid)
                    self._touch(wid)
        if isinstance(eff, E.JournalAppend):
            seen = self.appended.setdefault((d.name, eff.group), set())
            for e in eff.entries:
                if isinstance(e.data, E.Zeros):   # a zeroing names no write: no bound from its number
                    seen.add(e.seq)
                    continue
                ids = decode(bytes(e.data), e.offset // BLOCK)
                if not ids or ids[0] is None or any(i != ids[0] for i in ids):
                    self.w.violation(f"{d.name}: journal entry {e.seq} does not hold one host write")
                    return
                self.seqs.setdefault((eff.group, ids[0]), []).append(e.seq)
                seen.add(e.seq)
                self.seq_version += 1
                self._touch(ids[0])

    def _unnumbered(self, wid: int) -> None:
        """Write ``wid`` lost its number in a power loss, but its data may have stayed on the volume
        (and reach V3 by a resync): a retry that numbers it again gives no bound either (seed 77725)."""
        self.untracked.add(wid)
        self._touch(wid)

    def _touch(self, wid: int) -> None:
        """What the prefix check knows of the blocks of write ``wid`` is out of date."""
        for h in self.run.hosts:
            w = h.writes.get(wid)
            if w is not None:
                self._dirty_touch.setdefault(id(h), set()).update(range(w.block, w.block + w.count))

    def tap(self, d: "Daemon", eff: Any) -> None:
        if isinstance(eff, E.Log) and eff.level == "bug":
            self.w.violation(f"{d.name}: {eff.text}")
        elif isinstance(eff, E.Call) and eff.msg.kind == "journal.push":
            self._check_sender(eff.msg.fields.get("entries", []))
        elif isinstance(eff, E.Reply) and eff.msg.fields.get("entries") and d.kind == "node":
            self._check_sender(eff.msg.fields["entries"])
        elif isinstance(eff, E.Reply) and d.name == "site-b" and "applied" in eff.msg.fields \
                and "incarnation" in eff.msg.fields:
            for g, dg in d.core.secondary.groups.items():   # a journal.push reply: what it reports
                if dg.durable_applied == eff.msg.fields["applied"]:
                    self.reported[g] = max(self.reported.get(g, 0), dg.durable_applied)
        elif isinstance(eff, E.Call) and d.name == "site-b" and eff.msg.kind == "journal.pull":
            g = eff.msg.fields["group"]
            self.reported[g] = max(self.reported.get(g, 0), eff.msg.fields.get("applied", 0))

    def _check_sender(self, entries: list[Any]) -> None:
        """Invariant 17: V1's writes go with numbers below N0 only, V2's from N0 on (told apart by
        volume: in a migration inside one node both go through one journal)."""
        a2 = self.run.core(self.run.tnode)
        if a2 is None or not entries:
            return
        v1s, v2s = {p[0] for p in self.run.pairs}, {p[1] for p in self.run.pairs}
        for m in a2.migrations.values():
            if isinstance(m, TargetMigration) and m.handover_seq and m.phase in (T.TRANSITIONAL, T.MIGRATING, T.DONE):
                n0 = m.handover_seq
                for seq, vname, *_ in entries:
                    if vname in v1s and seq >= n0:
                        self.w.violation(f"V1 {vname}'s write went with seq {seq}, at or above the handover number {n0}")
                    if vname in v2s and seq < n0:
                        self.w.violation(f"V2 {vname}'s write went with seq {seq}, below the handover number {n0}")

    def node_down(self, node: str, power: bool) -> None:
        """After a power loss, entries the journal lost are no longer numbered writes."""
        self.states = {k: v for k, v in self.states.items() if k[0] != node}   # it restarts from disk
        self._last.pop("tables-" + node, None)
        if not power:
            return
        d = self.w.daemons[node]
        for group, j in d.disk.journals.items():
            kept = {r.seq for r in j.records}
            mine = self.appended.get((node, group), set())
            lost = {s for s in mine if s > j.discarded and s not in kept}
            for key, seqs in self.seqs.items():
                if key[0] == group and lost.intersection(seqs):
                    seqs[:] = [s for s in seqs if s not in lost]
                    if not seqs:
                        self._unnumbered(key[1])
            mine -= lost
            self.seq_version += 1
            self.seq_resets += 1
        # Acknowledged writes never flushed may be gone from the primary's volume, and so from the
        # resync that follows, even where the secondary had applied them (a resync copies the
        # primary's image as it is now): they are no longer due.
        if node == "site-a1" or (node == self.run.tnode and self._past_handover(d)):
            volatile = {w.id for h in self.run.hosts for w in h.writes.values() if not w.durable}
            for (g, wid), seqs in self.seqs.items():
                if wid in volatile and seqs:
                    seqs.clear()
                    self._unnumbered(wid)
            self.seq_version += 1
            self.seq_resets += 1
        self.states = {k: v for k, v in self.states.items() if k[0] != node}

    @staticmethod
    def _past_handover(d: "Daemon") -> bool:
        migs = (d.disk.mgmt or {}).get("migrations", {}).values()
        return any(m.get("kind") == "target" and m.get("phase") in (T.TRANSITIONAL, T.MIGRATING, T.DONE)
                   for m in migs)

    def node_up(self, node: str) -> None:
        self.states = {k: v for k, v in self.states.items() if k[0] != node}
        self._last.pop("tables-" + node, None)

    # ------------------------------------------------------------------ after every step
    def step(self, d: "Daemon") -> None:
        if d.kind != "node" or not d.up or d.core is None:
            return
        self.checks += 1
        core = d.core
        self._tables(d.name, core)
        self._bounds(d.name, core)
        if d.name == "site-b":
            self._secondary(core)
            self._applied_monotone(d)
        elif self.run.p.mode == "sync":
            self._sync_secondary()

    def _tables(self, node: str, core: Any) -> None:
        fp = (tuple((v.name, v.info.pair_state, v.info.rw_mode, v.info.copy_source_valid)
                    for v in core.volumes.values()),
              tuple((m.id, getattr(m, "phase", ""), getattr(m, "state", ""), getattr(m, "stage", ""))
                    for m in core.migrations.values()))
        if self._last.get("tables-" + node) == fp:
            return
        self._last["tables-" + node] = fp
        for v in core.volumes.values():
            for attr, table in _TABLES.items():
                tm = core.mig.target_of(v)
                key = (node, v.name, "uncommitted")
                if attr == "pair_state" and tm is not None and (tm.phase in (T.THROUGH, T.PENDING)
                                                                or self.states.get(key)):
                    # V2 takes V1's pair over (S806); a retried handover replaces what an interrupted
                    # one left. Checked again from the step the phase commits it.
                    self.states[(node, v.name, attr)] = v.info.pair_state
                    self.states[key] = "1" if tm.phase in (T.THROUGH, T.PENDING) else ""
                    continue
                self._moved(node, v.name, attr, getattr(v.info, attr), table)
        for m in core.migrations.values():
            if isinstance(m, TargetMigration):
                self._moved(node, m.id, "phase", m.phase, T.PHASE)
                self._moved(node, m.id, "state", m.state, T.RUN_STATE)
            elif isinstance(m, SourceMigration):
                self._moved(node, m.id, "stage", m.stage, T.SOURCE_STAGE)

    def _moved(self, node: str, what: str, attr: str, value: str, table: T.Table) -> None:
        key = (node, what, attr)
        old = self.states.get(key)
        self.states[key] = value
        if old is not None and old != value and value not in table.transitions.get(old, ()):
            self.w.violation(f"{node}:{what} {attr} moved {old!r} -> {value!r}, not in its table")

    def _bounds(self, node: str, core: Any) -> None:
        cfg = core.cfg
        if len(core.rt.tasks) > 400:
            self.w.violation(f"{node} runs {len(core.rt.tasks)} tasks")
        for g in core.primary.groups.values():
            if len(g.lag) > cfg.lag_samples_max:
                self.w.violation(f"{node}: {len(g.lag)} lag samples kept (limit {cfg.lag_samples_max})")
            if not g.discarded <= g.applied <= g.stored < g.counter or g.durable > g.stored:
                self.w.violation(f"{node} group {g.name}: pointers out of order: discarded {g.discarded} "
                                 f"applied {g.applied} durable {g.durable} stored {g.stored} counter {g.counter}")
        for dg in core.secondary.groups.values():
            if dg.applier.buffered_bytes > dg.applier.buffer_bytes_max + 64 * 1024:
                self.w.violation(f"{node} group {dg.name} buffers {dg.applier.buffered_bytes} bytes")

    def _applied_monotone(self, d: "Daemon") -> None:
        """Invariants 13 and 26: the durable applied pointer never goes back, not even after a crash."""
        for g, (applied, _) in d.disk.applied.items():
            if applied < self.applied_max.get(g, 0):
                self.w.violation(f"site-b group {g}: durable applied moved back from {self.applied_max[g]} to {applied}")
            self.applied_max[g] = max(self.applied_max.get(g, 0), applied)
        for g, reported in self.reported.items():
            if g in d.disk.applied and d.disk.applied[g][0] < reported:
                self.w.violation(f"site-b group {g}: reported {reported} applied, but its durable record "
                                 f"says {d.disk.applied[g][0]}")

    # ------------------------------------------------------------------ the secondary's image
    def _secondary(self, core: Any) -> None:
        if self.run.p.mode == "async":
            for dg in core.secondary.groups.values():
                self._prefix(core, dg)
        else:
            self._sync_secondary()
        for v in core.volumes.values():
            if v.info.remote_copy_flag == "dest" and v.info.copy_source_valid == T.SOURCE_2 and v.info.mode == "async":
                key = ("site-b", v.name, "valid2-checked")
                if key not in self.states:
                    self.states[key] = "1"
                    dg = core.secondary.groups.get(v.info.group)
                    if dg is not None and dg.info.handover_seq and dg.durable_applied < dg.info.handover_seq - 1:
                        self.w.violation(f"site-b:{v.name} took V2 as its only source before V1's backlog below "
                                         f"{dg.info.handover_seq} was applied (applied {dg.durable_applied})")

    def _prefix(self, core: Any, dg: Any) -> None:
        """Invariant 12: the group's volumes hold exactly the numbered writes up to some A."""
        vols = core.members(dg.name, "dest")
        if not vols or not all(v.info.consistent for v in vols):
            return
        lo, hi = dg.applier.last_applied, dg.applier.last_applied
        if dg.applying:
            hi = max(hi, dg.record[1])
        disk = self.w.daemons["site-b"].disk
        inputs = (lo, hi, self.seq_version, len(self.untracked),
                  tuple(disk.volumes[v.name].version for v in vols))
        if self._last.get("prefix-" + dg.name) == inputs:
            return
        self._last["prefix-" + dg.name] = inputs
        low, high = -INF, INF     # the A every block allows: low <= A < high
        for v in vols:
            h = self.host_of.get(v.name)
            if h is None:
                continue
            f = disk.volumes[v.name]
            ids = self.ids(f)
            bounds = self._bounds_of.get(v.name)
            if bounds is None or self._resets_seen.get(v.name) != self.seq_resets or len(bounds[0]) != len(ids):
                bounds = ([-INF] * len(ids), [INF] * len(ids))
                self._bounds_of[v.name] = bounds
                self._resets_seen[v.name] = self.seq_resets
                todo: set[int] = set(range(len(ids)))
                self._dirty_files.pop(id(f), None)
            else:
                todo = self._dirty_files.pop(id(f), set())
            todo |= self._dirty_touch.get(id(h), set())
            lows, highs = bounds
            for b in todo:
                wid = ids[b]
                hb = h.hist[b]
                if wid is None:
                    self.w.violation(f"site-b:{v.name} block {b} is torn or foreign while consistent")
                    return
                b_low, pos = -INF, -1
                if wid == 0:    # the initial zeros or any zeroing: bound only by what came after the last
                    pos = max([i for i, x in enumerate(hb.writes) if x.zero], default=-1)
                if wid:
                    pos = hb.pos.get(wid)
                    if pos is None:
                        self.w.violation(f"site-b:{v.name} block {b} holds write {wid}, never written there")
                        return
                    if wid not in self.untracked:
                        b_low = min(self.seqs.get((dg.name, wid)) or [-INF])
                lows[b] = b_low
                highs[b] = min([min(self.seqs.get((dg.name, x.id)) or [INF]) for x in hb.writes[pos + 1:]] or [INF])
            low, high = max(low, max(lows)), min(high, min(highs))
        self._dirty_touch.clear()
        if max(low, lo) >= min(high, hi + 1):
            self.w.violation(f"site-b group {dg.name} is not a prefix: its blocks need {low} <= A < {high}, "
                             f"applied is {lo}..{hi}")

    def _sync_secondary(self) -> None:
        """Invariant 19: V3 holds every acknowledged write outside the regions the primary tracks."""
        run = self.run
        b = run.core("site-b")
        if b is None:
            return
        vv = run.vv.core.vvols.get("app") if run.vv.up and run.vv.core else None
        if vv is None:
            return
        pnode, pvol = vv.target.split(":")
        p = run.core(pnode)
        if p is None or pvol not in p.volumes:
            return
        pv = p.volumes[pvol]
        if pv.info.remote_copy_flag != "source" or pv.info.pair_state == T.SUSPENDED:
            return
        v3 = b.volumes.get("v3")
        if v3 is None or v3.info.remote_copy_flag != "dest":
            return
        h = self.host_of["v3"]
        f = self.w.daemons["site-b"].disk.volumes["v3"]
        inputs = (f.version, pnode, pv.maps["diff"].version, h.completed)
        if self._last.get("sync") == inputs:
            return
        self._last["sync"] = inputs
        ids = self.ids(f)
        for blk, wid in enumerate(ids):
            if pv.diff.any_set(blk * BLOCK, BLOCK):
                continue
            hist = h.hist[blk]
            if hist.floor < 0:
                continue
            if not h.may_hold(blk, wid):
                self.w.violation(f"sync: site-b:v3 block {blk} holds write {wid}, but the host has write "
                                 f"{hist.writes[hist.floor].id} acknowledged and {pnode} does not track it")
                return

    # ------------------------------------------------------------------ the end
    def final(self) -> None:
        run = self.run
        b = run.core("site-b")
        p = run.core(run.primary_node)
        assert b is not None and p is not None
        for v1, v2, v3, _ in run.pairs:
            pv = v2 if run.migrated else v1
            pimg = bytes(self.w.daemons[run.primary_node].disk.volumes[pv].current)
            simg = bytes(self.w.daemons["site-b"].disk.volumes[v3].current)
            if pimg != simg:
                first = next(i for i in range(0, len(pimg), BLOCK) if pimg[i:i + BLOCK] != simg[i:i + BLOCK])
                self.w.violation(f"after convergence {run.primary_node}:{pv} and site-b:{v3} differ at byte {first}")
        for name in ("site-a1", "site-a2", "site-b"):
            c = run.core(name)
            if c is not None:
                bugs = {k: v for k, v in c.task_errors.items() if not v.startswith(("NodeUnreachable", "StateError"))}
                if bugs:
                    self.w.violation(f"{name} task errors at the end: {bugs}")
