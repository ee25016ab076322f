"""One seed = one exact run: a cluster, a host load, a procedure and faults, checked at every step.

The seed chooses the copy mode (sync/async, push/pull), one or two volumes in the
consistency group, a procedure (steady replication, initial copy, suspend and
resume, a journal that fills, a migration, one that is aborted, one followed by
removal) and up to three faults at random moments (kill -9, power loss, SIGSTOP
for a while, a cut WAN link, a slow disk). After the load, every fault is undone
and the run must converge: the secondary equals the primary, which holds every
write the host must still find, and every migration that started has finished.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Generator

from ..core import effects as E
from ..core import procedures as P
from ..core import tables as T
from ..core.config import Config
from ..core.node import Completed, NodeCore
from ..core.proc_runner import drive
from ..core.runtime import Runtime
from ..core.vvol import VirtualVolume
from ..errors import RcopyError
from .checks import Checker
from .host import BLOCK, Host, OldPath
from .world import Daemon, World

NODES = ("site-a1", "site-a2", "site-b")
VOLUME_BYTES = 32 * 1024
REGION_BYTES = 4096
PROCEDURES = ("steady", "initial-copy", "suspend-resume", "journal-full", "migrate", "migrate-abort",
              "migrate-remove", "migrate-resume")
FAULTS = ("none", "kill", "power", "pause", "cut", "slow")
# only with --procedures (the default run's seeds stay as they were); migrate-local: V2 is a volume
# of V1's node (SPEC 1.7), then the old volume is removed
EXTRA_PROCEDURES = ("verify", "migrate-local")

SIM_CONFIG = Config(region_bytes=REGION_BYTES, diff_block_bytes=REGION_BYTES // 4, sync_timeout_s=0.4, copy_wait_s=1.0, peer_timeout_s=1.5,
                    control_timeout_s=1.0, heartbeat_s=0.1, link_retry_s=0.02, pull_idle_s=0.05,
                    push_batch_bytes=16 * 1024,
                    push_batch_entries=16, push_cache_bytes=8 * 1024, discard_every_s=0.02, journal_bytes_default=96 * 1024,
                    reorder_bytes_max=64 * 1024, apply_batch_bytes=8 * 1024, pending_hold_max_s=8.0,
                    handover_timeout_s=2.0, valid_quick_s=0.3, copy_streams=2, copy_batch_regions=3,
                    resume_check_s=0.2, activity_retire_s=0.2, activity_idle_s=0.3, lag_samples_max=64,
                    lag_sample_every_s=0.005,
                    restart_backoff_s=0.05, restart_backoff_max_s=0.5, poll_s=0.05)
VVOL_RETRY_S = 2.0
LOAD_S = 1.4                     # how long the hosts write (faults come within it)
OLD_PATH_SHARE = 0.1           # migrations: the part of the writes that goes straight to V1


@dataclass
class Plan:
    """What a seed chose."""

    seed: int
    mode: str
    transfer: str
    volumes: int
    procedure: str
    faults: list[tuple[float, str, str, float]] = field(default_factory=list)  # (at, kind, node, duration)
    qd: int = 3

    def line(self) -> str:
        faults = ", ".join(f"{k}:{n}@{t:.2f}" + (f"+{d:.2f}" for _ in [0] if d).__next__() if False else
                           f"{k}:{n}@{t:.2f}{'+%.2f' % d if d else ''}" for t, k, n, d in self.faults) or "none"
        return (f"seed {self.seed}: {self.mode}/{self.transfer} x{self.volumes}, {self.procedure}, "
                f"faults {faults}")


def plan(seed: int, only_faults: tuple[str, ...] | None = None,
         only_procedures: tuple[str, ...] | None = None) -> Plan:
    rnd = random.Random(f"plan-{seed}")
    mode = rnd.choice(("async", "async", "sync"))
    transfer = rnd.choice(("push", "push", "pull")) if mode == "async" else "push"
    volumes = rnd.choice((1, 1, 2)) if mode == "async" else 1
    procs = only_procedures or PROCEDURES
    procedure = procs[seed % len(procs)] if only_procedures is None else rnd.choice(procs)
    p = Plan(seed, mode, transfer, volumes, procedure, qd=rnd.choice((1, 2, 3, 4)))
    kinds = only_faults or FAULTS
    for _ in range(rnd.choice((0, 1, 1, 2, 3))):
        kind = rnd.choice(kinds)
        if kind == "none":
            continue
        node = rnd.choice(NODES) if kind != "cut" else "wan"
        duration = rnd.uniform(0.05, 1.2) if kind in ("pause", "cut", "slow", "kill", "power") else 0.0
        p.faults.append((rnd.uniform(0.0, LOAD_S - 0.2), kind, node, duration))
    p.faults.sort()
    return p


class TerminalCore:
    """The management terminal inside the simulator: each procedure runs as one task."""

    def __init__(self) -> None:
        self.rt = Runtime()

    def handle(self, event: Any, now: float) -> list[Any]:
        self.rt.now = now
        if isinstance(event, Completed):
            self.rt.complete(event.op, event.result)
        return self.rt.take()


class Run:
    """One simulated run of one seed."""

    def __init__(self, p: Plan) -> None:
        self.p = p
        self.w = World(p.seed, SIM_CONFIG)
        self.rnd = random.Random(p.seed * 31 + 7)
        self.d = P.Directory({n: n for n in NODES}, ["host"], lambda n, v: f"{n}:{v}", timeout_s=4.0)
        for n in NODES:
            self.w.add_node(n)
        self.vv = self.w.add_vvol("host")
        self.term = Daemon(self.w, "terminal", "terminal")
        self.term.core = TerminalCore()
        self.w.daemons["terminal"] = self.term
        self.group = "g1" if p.volumes > 1 else "v1"
        self.pairs = [("v1", "v2", "v3", "app")] + ([("w1", "w2", "w3", "app2")] if p.volumes > 1 else [])
        self.hosts: list[Host] = []
        self.primary_node = "site-a1"
        self.tnode = "site-a1" if p.procedure == "migrate-local" else "site-a2"   # V2's node
        self.migration_started = False
        self.migrated = False
        self.removed = False
        self.failures: list[str] = []
        self.checker = Checker(self)
        self.checks = 0
        self.w.host_done = self._host_done
        self.injected: list[str] = []
        self.powered_off: dict[str, bool] = {}
        self.quiet = False
        self.verified = 0

    # ------------------------------------------------------------------ terminal
    def proc(self, gen: Generator[Any, Any, Any], done: Callable[[Any, BaseException | None], None]) -> None:
        rt = self.term.core.rt
        self.term.up = True
        rt.now = self.w.now
        rt.spawn(drive(rt, self.d, gen), "proc", on_exit=lambda t, e, v: done(v, e))
        for eff in rt.take():
            self.w.execute(self.term, eff)

    def _host_done(self, eff: Any) -> None:
        for h in self.hosts:
            if eff.req in h.inflight:
                h.done(eff)
                return
        self.w.violation(f"a host completion nobody waits for: {eff.req}")

    def core(self, node: str) -> NodeCore | None:
        d = self.w.daemons[node]
        return d.core if d.up else None

    # ------------------------------------------------------------------ the run
    def run(self) -> None:
        w, p = self.w, self.p
        for n in NODES:
            w.start(w.daemons[n])
        w.start(self.vv)
        self.vv.core.retry_s = VVOL_RETRY_S
        self.step = "setup"
        self.proc(self._setup(), self._after_setup)
        w.run_until(60.0, stop=lambda: self.step == "loaded" or bool(w.violations))
        if w.violations or self.step != "loaded":
            if self.step != "loaded" and not w.violations:
                w.violation(f"set-up did not finish ({self.step}): {self.failures}")
            return
        t0 = w.now
        for h in self.hosts:
            h.start(t0 + LOAD_S)
        self._schedule_procedure(t0)
        for at, kind, node, duration in p.faults:
            w.at(t0 + at, self._fault, kind, node, duration)
        w.run_until(t0 + LOAD_S + 0.4)
        if w.violations:
            return
        self._quiesce()

    def _setup(self) -> Generator[Any, Any, None]:
        p = self.p
        for v1, v2, v3, _ in self.pairs:
            yield P.Ask("site-a1", "volume.create", {"name": v1, "size": VOLUME_BYTES})
            yield P.Ask(self.tnode, "volume.create", {"name": v2, "size": VOLUME_BYTES})
            yield P.Ask("site-b", "volume.create", {"name": v3, "size": VOLUME_BYTES})
        if p.procedure != "initial-copy":
            yield from self._create_pairs()
            for v1, *_ in self.pairs:
                yield from P.wait_pair(self.d, f"site-a1:{v1}", lambda x: x["state"] == "duplex", 30.0,
                                       "duplex", lambda: self.w.now)

    def _create_pairs(self) -> Generator[Any, Any, None]:
        p = self.p
        # small journals fill: a fold then meets the backlog of V1 in a migration inside one node
        # (a sync pair has no journal: the option is refused for it)
        jbytes = {"journal-full": 6 * 1024, "migrate-local": 10 * 1024}.get(p.procedure) if p.mode == "async" else None
        st = yield from P.status(self.d, only=["site-a1"])
        existing = {x["primary"] for x in st["pairs"]}
        for v1, _, v3, _ in self.pairs:
            if f"site-a1:{v1}" not in existing:     # a retry after a failure does what is left
                yield from P.pair_create(self.d, f"site-a1:{v1}", f"site-b:{v3}", p.mode,
                                         self.group if p.volumes > 1 else None, p.transfer, jbytes)

    def _after_setup(self, value: Any, error: BaseException | None) -> None:
        if error is not None:
            self.failures.append(f"set-up: {error}")
            self.step = "failed"
            return
        for v1, _, _, app in self.pairs:
            self.vv.core.vvols[app] = VirtualVolume(app, f"site-a1:{v1}", VOLUME_BYTES)
            h = Host(self.w, "host", VOLUME_BYTES // BLOCK, random.Random(self.p.seed * 131 + len(self.hosts)),
                     qd=self.p.qd)
            h.app = app
            if random.Random(f"zero-{self.p.seed}").random() < 0.5:     # half the seeds TRIM / WRITE_ZEROES too
                h.zero_share = 0.08
                h.zero_rnd = random.Random(self.p.seed * 977 + len(self.hosts))
            if self.p.procedure.startswith("migrate"):      # some writes keep going straight to V1
                h.old_path = OldPath(self.w, h, "site-a1", v1)
                self.w.daemons[h.old_path.name] = h.old_path
                h.old_share = OLD_PATH_SHARE
            self.hosts.append(h)
        self.checker.install()
        self.step = "loaded"

    # ------------------------------------------------------------------ procedures
    def _schedule_procedure(self, t0: float) -> None:
        proc, w = self.p.procedure, self.w
        at = t0 + self.rnd.uniform(0.1, 0.9)
        if proc == "initial-copy":
            w.at(t0 + self.rnd.uniform(0.05, 0.5), self._start, self._create_pairs(), "pair create")
        elif proc == "suspend-resume":
            w.at(at, self._start, P.pair_command(self.d, "suspend", "site-a1:v1"), "suspend")
            w.at(at + self.rnd.uniform(0.1, 0.6), self._start, P.pair_command(self.d, "resume", "site-a1:v1"),
                 "resume")
        elif proc.startswith("migrate"):
            w.at(at, self._start_migration)
        elif proc == "verify":
            for start in (at, at + self.rnd.uniform(0.2, 0.5)):
                w.at(start, self._start_verify)

    def _start_verify(self) -> None:
        """Online verify under the host's load: a healthy pair shows no difference, not even once."""
        def done(r: Any, e: BaseException | None) -> None:
            self.w.log(f"terminal: verify --online: {'ok' if e is None else e}"
                       + (f" ({r['checked_bytes']} bytes, {len(r['busy'])} busy, {len(r['dirty'])} marked)"
                          if r else ""))
            if e is not None and not isinstance(e, RcopyError):
                self.w.violation(f"terminal verify raised {type(e).__name__}: {e}")
            elif e is not None:
                self.failures.append(f"verify: {e}")
            elif r is None:                 # the run ended before the verify did
                return
            elif r["different"] or r["flapped"]:
                self.w.violation(f"online verify found a difference on a healthy pair: chunks {r['different'][:5]}, "
                                 f"{r['flapped']} differed once")
            else:
                self.verified += 1
        self.w.log("terminal: verify --online")
        self.proc(P.online_verify(self.d, "site-a1:v1", "site-b:v3", lambda: self.w.now, regions=2,
                                  request_timeout_s=5.0), done)

    def _start(self, gen: Generator[Any, Any, Any], what: str) -> None:
        def done(v: Any, e: BaseException | None) -> None:
            self.w.log(f"terminal: {what}: {'ok' if e is None else e}")
            if e is not None and not isinstance(e, RcopyError):
                self.w.violation(f"terminal {what} raised {type(e).__name__}: {e}")
            elif e is not None:
                self.failures.append(f"{what}: {e}")
        self.w.log(f"terminal: {what}")
        self.proc(gen, done)

    def _start_migration(self) -> None:
        proc = self.p.procedure
        dual = self.rnd.random() < 0.3

        def done(v: Any, e: BaseException | None) -> None:
            self.w.log(f"terminal: migrate: {'ok' if e is None else e}")
            if e is None:
                self.migration_started = True
                if proc == "migrate-abort":
                    self.w.after(self.rnd.uniform(0.0, 0.2), self._start,
                                 P.abort_migration(self.d, "site-a1:v1", f"{self.tnode}:v2"), "abort")
            elif not isinstance(e, RcopyError):
                self.w.violation(f"terminal migrate raised {type(e).__name__}: {e}")
            else:
                self.failures.append(f"migrate: {e}")
        self.w.log("terminal: migrate" + (" --dual-write" if dual else ""))
        self.proc(P.migrate(self.d, "site-a1:v1", f"{self.tnode}:v2", group=self.group if self.p.volumes > 1 else None,
                            volume_map={"w1": "w2"}, dual_write=dual, start=proc != "migrate-abort"), done)

    # ------------------------------------------------------------------ faults
    def _fault(self, kind: str, node: str, duration: float) -> None:
        w = self.w
        self.injected.append(kind)
        if kind == "cut":
            w.set_cut(True)
            w.after(duration, w.set_cut, False)
            return
        d = w.daemons[node]
        if not d.up:
            return
        if kind in ("kill", "power"):
            if kind == "power" and node in ("site-a1", "site-a2"):
                for h in self.hosts:
                    h.power_lost()
            w.kill(d, power=kind == "power")
            self.checker.node_down(node, power=kind == "power")
            if kind == "power":
                self.powered_off[node] = True
            w.after(duration, self._restart, node, kind == "power")
        elif kind == "pause":
            w.pause(d)
            w.after(duration, w.resume, d)
        elif kind == "slow":
            w.slow_disk[node] = 20.0
            w.after(duration, w.slow_disk.pop, node, None)

    def _restart(self, node: str, power: bool) -> None:
        d = self.w.daemons[node]
        if not d.up:
            self.w.start(d, power_lost=power or self.powered_off.pop(node, False))
            self.checker.node_up(node)

    # ------------------------------------------------------------------ the end
    def _quiesce(self) -> None:
        w = self.w
        for h in self.hosts:
            h.running = False
        w.set_cut(False) if w.cut else None
        for d in w.daemons.values():
            if d.kind == "node":
                if d.paused:
                    w.resume(d)
                if not d.up:
                    self._restart(d.name, False)
        w.slow_disk.clear()
        deadline = w.now + 40.0
        self.resumed_migration = False
        self.removing = False
        self.retry_create_at = 0.0
        while w.now < deadline and not w.violations:
            w.run_until(w.now + 0.25)
            if self._converged():
                break
        if w.violations:
            return
        if not self._converged():
            w.violation(f"did not converge within 40 s: {self._why_not()}")
            return
        self.quiet = True
        self._final_read()

    def _migration(self) -> dict[str, Any] | None:
        a2 = self.core(self.tnode)
        if a2 is None:
            return None
        migs = a2.mig.status()
        return migs[0] if migs else None

    def _converged(self) -> bool:
        return not self._why_not(act=True)

    def _why_not(self, act: bool = False) -> str:
        w = self.w
        if any(h.outstanding() for h in self.hosts):
            return f"host requests outstanding: {[list(h.inflight) for h in self.hosts]}"
        if self.term.core.rt.tasks:
            return "terminal procedures still running"
        cores = {n: self.core(n) for n in NODES}
        if any(c is None or not c.ready for c in cores.values()):
            return "a node is not ready"
        m = self._migration()
        if m is not None and m["state"] == T.DONE:
            self.migrated = True
        if m is not None and m["state"] == T.FAILED:
            if act and not self.resumed_migration:
                self.resumed_migration = True
                self._start(P.continue_migration(self.d, f"{self.tnode}:v2"), "migrate --resume")
            return f"migration failed: {m['error']}"
        if m is not None and m["state"] == T.RUNNING:
            if act and m["phase"] == T.THROUGH and self.w.now >= self.retry_create_at:
                self.retry_create_at = self.w.now + 2.0     # the abort or the start did not get through
                if self.p.procedure == "migrate-abort":
                    self._start(P.abort_migration(self.d, "site-a1:v1", f"{self.tnode}:v2"), "abort (again)")
                else:
                    self._start(P.continue_migration(self.d, f"{self.tnode}:v2"), "migrate --resume")
            return f"migration running ({m['phase']}, waiting for {m['waiting_for']})"
        if self.p.procedure in ("migrate-remove", "migrate-local") and m is not None and m["state"] == T.DONE and not self.removed:
            if act and not self.removing:
                self.removing = True
                self._start(self._remove(), "remove site-a1")
            return "removal pending"
        primary = self.tnode if self.migrated else "site-a1"
        self.primary_node = primary
        pc = cores[primary]
        pvs = [pc.volumes[v2 if self.migrated else v1] for v1, v2, _, _ in self.pairs]
        for pv, (v1, v2, v3, _) in sorted(zip(pvs, self.pairs), key=lambda x: x[0].info.remote_copy_flag == "source"):
            if pv.info.remote_copy_flag != "source":
                if act and not self.migrated and self.w.now >= self.retry_create_at:
                    self.retry_create_at = self.w.now + 2.0     # the pair create failed: try again
                    self._start(self._create_pairs(), "pair create (again)")
                return f"{primary}:{pv.name} is not a primary ({pv.info.remote_copy_flag})"
            if pv.info.pair_state != T.DUPLEX:
                if act and pv.info.pair_state == T.SUSPENDED and pv.info.suspend_reason in T.HELD_SUSPENSIONS:
                    self._start(P.pair_command(self.d, "resume", f"{primary}:{pv.name}"), "resume")
                return f"{pv.name} is {pv.info.pair_state} ({pv.info.suspend_reason})"
            sv = cores["site-b"].volumes[v3]
            if not sv.info.consistent:
                return f"{v3} is not consistent"
        if self.p.mode == "async":
            g = pc.primary.groups.get(self.group)
            dg = cores["site-b"].secondary.groups.get(self.group)
            if g is None or dg is None:
                return "group missing"
            if g.applied < g.stored or dg.durable_applied < g.stored or g.pending:
                return f"lag: stored {g.stored}, applied {g.applied}, V3 {dg.durable_applied}"
        return ""

    def _remove(self) -> Generator[Any, Any, Any]:
        if self.tnode == "site-a1":                 # one node: remove the old volumes, one by one
            r = []
            for v1, *_ in self.pairs:
                r.append((yield from P.remove(self.d, f"site-a1:{v1}")))
        else:
            r = yield from P.remove(self.d, "site-a1")
        self.removed = True
        return r

    def _final_read(self) -> None:
        """Every block, through the virtual volume, holds a write the host may find there; the
        secondary holds exactly what the primary holds."""
        w = self.w
        results: dict[str, Any] = {}
        for h in self.hosts:
            h.read_all(lambda got, h=h: results.__setitem__(h.app, got))
        w.run_until(w.now + 5.0, stop=lambda: len(results) == len(self.hosts))
        for h in self.hosts:
            got = results.get(h.app)
            if got is None:
                w.violation(f"final read of {h.app} failed: {h.errors[-1:] or 'no answer'}")
                continue
            for b, wid in enumerate(got):
                bad = h.check_block(b, wid)
                if bad:
                    w.violation(f"final read of {h.app} block {b}: {bad}")
                    break
        self.checker.final()
