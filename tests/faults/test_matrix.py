"""The fault matrix: for sync and async, in steady replication, initial copy, resync and the
migration phases, kill -9 or pause (SIGSTOP) each node while a QD1 writer of self-describing
blocks writes through the virtual volume. After recovery: no acknowledged write is lost at
the primary side, the secondary was a write-order-consistent prefix, replication converges.

CI runs a smaller matrix; ``RCOPY_FAULTS=full`` (or scripts/fault-matrix) runs all of it.
Each case appends a row to ``fault-matrix.md`` in the results directory.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import nbd
import pytest

from replicator import checker, lab, netlab, process
from replicator.terminal import Terminal

MiB = 1 << 20
BLOCK = 4096
SIZE = 16 * MiB
BLOCKS = SIZE // BLOCK

PHASES = ["steady", "initial-copy", "resync", "through", "migrating", "transitional"]
LOCAL_PHASES = ["local-through", "local-migrating", "local-transitional"]   # V2 on V1's node (SPEC 1.7)
FAULTS = ["kill:site-a1", "kill:site-a2", "kill:site-b", "pause:site-a1", "pause:site-b", "cut:wan"]
CI_CASES = [("async", "steady", "kill:site-a1"), ("sync", "steady", "kill:site-a1"),
            ("async", "steady", "kill:site-b"), ("sync", "steady", "pause:site-b"),
            ("async", "initial-copy", "kill:site-b"), ("async", "resync", "kill:site-a1"),
            ("async", "through", "kill:site-a1"), ("async", "migrating", "kill:site-a2"),
            ("sync", "migrating", "kill:site-a1"), ("async", "transitional", "kill:site-a1"),
            ("async", "transitional", "kill:site-a2"), ("async", "steady", "cut:wan"),
            ("sync", "steady", "cut:wan"), ("async", "migrating", "cut:wan"),
            # a copy interrupted with journal entries still unapplied (once lost them at the secondary)
            ("async", "resync", "kill:site-b"), ("async", "initial-copy", "cut:wan"),
            ("async", "local-transitional", "kill:site-a1"), ("sync", "local-migrating", "kill:site-a1")]


def cases() -> list[tuple[str, str, str]]:
    if os.environ.get("RCOPY_FAULTS") == "full":
        return [(m, p, f) for m in ("async", "sync") for p in PHASES + LOCAL_PHASES for f in FAULTS
                if not (m == "sync" and p.endswith("transitional"))
                and not (p.startswith("local-") and f.endswith("site-a2"))]
    return CI_CASES


RESULTS = Path(os.environ.get("RCOPY_RESULTS", "test-results"))
ROWS: list[str] = []


class Writer(threading.Thread):
    """QD1 self-describing block writer through the virtual volume; remembers what was acked."""

    def __init__(self, uri: str) -> None:
        super().__init__(daemon=True)
        self.uri, self.run_id = uri, random.getrandbits(63)
        self.records: list[checker.Record] = []
        self.stop = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        h = nbd.NBD()
        h.connect_uri(self.uri)
        rnd, seq = random.Random(self.run_id), 0
        try:
            while not self.stop.is_set():
                seq += 1
                block = rnd.randrange(BLOCKS)
                self.records.append(checker.Record(seq, 0, block, acked=False))
                h.pwrite(checker.make_block(self.run_id, seq, 0, block), block * BLOCK)
                self.records[-1] = checker.Record(seq, 0, block, acked=True)
        except nbd.Error as exc:
            self.error = str(exc)
        finally:
            try:
                h.shutdown()
            except nbd.Error:
                pass

    def halt(self) -> None:
        self.stop.set()
        self.join(60)

    @property
    def acked(self) -> int:
        return sum(r.acked for r in self.records)


def read_image(t: Terminal, spec: str) -> bytes:
    node, vol = spec.split(":")
    h = nbd.NBD()
    h.connect_uri(t.cluster.node(node).nbd_uri(vol))
    try:
        return b"".join(h.pread(8 * MiB, off) for off in range(0, SIZE, 8 * MiB))
    finally:
        h.shutdown()


def pid_of(t: Terminal, node: str) -> int:
    pid = process.read_pid(str(t.cluster.node(node).pidfile))
    assert pid
    return pid


def settle_secondary(t: Terminal, timeout_s: float = 30.0) -> None:
    last, since, deadline = None, time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            now = [(g["applied"], g["waiting"]) for g in t.node_request("site-b", "status", timeout_s=2)["groups"]
                   if g["role"] == "dest"]
        except Exception:
            return
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > 1.0:
            return
        time.sleep(0.1)


def wait_phase(t: Terminal, target: str, phases: tuple[str, ...], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        migs = [m for m in t.status(only=[target.split(":")[0]])["migrations"] if m["target"] == target]
        if migs and migs[0]["phase"] in phases:
            return
        time.sleep(0.02)
    raise AssertionError(f"never reached {phases}")


def dump_stacks(lab_dir: Path) -> None:
    """Have every live daemon write its threads' Python stacks to stacks.log (SIGUSR1)."""
    for pidfile in lab_dir.glob("*/nbdkit.pid"):
        pid = process.read_pid(str(pidfile))
        if process.alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
    time.sleep(0.2)


@pytest.fixture
def matrix_cluster(request, tmp_path):
    """The three nodes and the vvol server; for a WAN cut, each site in its own network
    namespace with site-b behind the WAN link (netlab.py), as ``rcopy lab up --netns``."""
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    (lab_dir / lab.LAB_MARK).write_text("test\n")
    try:
        net = None
        if request.node.callspec.params["fault"] == "cut:wan":
            net = netlab.setup(lab_dir, local=["host", "site-a1", "site-a2"], remote="site-b")
        c = lab.make_cluster(lab_dir, net=net)
        c.path.write_text(lab.dump(c))
        t = Terminal(c)
        for name in ("site-a1", "site-a2", "site-b"):
            t.node_start(name)
        yield t
    finally:
        dump_stacks(lab_dir)
        for log in lab_dir.glob("*/*.log"):  # kept for a post-mortem (pytest prunes tmp_path); the lab goes
            for dest in (tmp_path / "logs" / log.parent.name, RESULTS / "logs" / request.node.name / log.parent.name):
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy(log, dest / log.name)
        lab.down(lab_dir)


@pytest.mark.parametrize("mode,phase,fault", cases(), ids=lambda x: str(x))
def test_fault(matrix_cluster, mode, phase, fault):
    t = matrix_cluster
    lab_dir = t.cluster.dir
    t0 = time.monotonic()
    target = "site-a1:v9" if phase.startswith("local-") else "site-a2:v2"
    phase = phase.removeprefix("local-")
    for spec in ("site-a1:v1", target, "site-b:v3"):
        t.volume_create(spec, SIZE)
    if phase == "initial-copy":  # a primary with data everywhere, so the copy has work
        h = nbd.NBD()
        h.connect_uri(t.cluster.node("site-a1").nbd_uri("v1"))
        for off in range(0, SIZE, 256 * 1024):
            h.pwrite(os.urandom(4096), off)
        h.shutdown()
    else:
        t.pair_create("site-a1:v1", "site-b:v3", mode=mode)
        t.wait_duplex("site-a1:v1", 60)
    t.vvol_create("app", "site-a1:v1")
    w = Writer(t.cluster.vvol_server().nbd_uri("app"))
    w.start()
    time.sleep(0.5)

    paused: list[int] = []
    migrating = phase in ("through", "migrating", "transitional")
    if phase == "initial-copy":
        t.pair_create("site-a1:v1", "site-b:v3", mode=mode)
    elif phase == "resync":
        t.pair_command("suspend", "site-a1:v1")
        time.sleep(0.5)
        t.pair_command("resume", "site-a1:v1")
    elif phase == "through":
        t.migrate("site-a1:v1", target, start=False)
    elif phase == "migrating":
        t.migrate("site-a1:v1", target, wait=False, rate_limit_bytes_s=2 * MiB)
        wait_phase(t, target, ("migrating", "transitional"))
    elif phase == "transitional":
        t.migrate("site-a1:v1", target, wait=False, rate_limit_bytes_s=2 * MiB)
        os.kill(pid_of(t, "site-b"), signal.SIGSTOP)   # V1's backlog cannot drain now
        paused.append(pid_of(t, "site-b"))
        wait_phase(t, target, ("transitional",))

    # ---- the fault
    action, node = fault.split(":")
    killed = None
    time.sleep(0.3)
    if action == "kill":
        killed = node
        os.kill(pid_of(t, node), signal.SIGKILL)
    elif action == "cut":
        netlab.cut(lab_dir)
    else:
        os.kill(pid_of(t, node), signal.SIGSTOP)
        paused.append(pid_of(t, node))
    time.sleep(1.5)

    # ---- the secondary is a write-order-consistent prefix (checked with the writer stopped,
    # paused nodes running again and killed ones still dead)
    w.halt()
    for pid in paused:
        with contextlib.suppress(ProcessLookupError):  # paused first, then killed by the fault
            os.kill(pid, signal.SIGCONT)
    if action == "cut":
        netlab.heal(lab_dir)
    prefix_ok = "n/a"
    if killed != "site-b":
        settle_secondary(t)
        v = checker.analyse(w.records, {0: read_image(t, "site-b:v3")}, BLOCKS, run_id=w.run_id)
        if mode == "async" or phase != "initial-copy":
            assert v.consistent or phase in ("initial-copy", "resync"), v.problems
        prefix_ok = "yes" if v.consistent else "no (inconsistent by design: copying)"

    # ---- recovery
    if killed:
        t.node_start(killed)
    primary = "site-a1:v1"
    if migrating:
        if phase == "through":
            t.continue_migration(target, timeout_s=180)
        else:
            t.wait_migration(target, 180)
        primary = target
    pair = t.find_pair(primary)
    if pair["state"] == "suspended":
        t.pair_command("resume", primary)
    t.wait_duplex(primary, 120)

    # ---- no acknowledged write lost at the primary side; replication converges
    final = checker.analyse(w.records, {0: read_image(t, primary)}, BLOCKS, run_id=w.run_id)
    assert final.consistent and final.complete, final.problems
    r = t.verify(primary, "site-b:v3", timeout_s=120)
    assert r["identical"], r
    ROWS.append(f"| {mode} | {'local ' if target.startswith('site-a1') else ''}{phase} | {fault} | {w.acked} | 0 | {prefix_ok} | yes | "
                f"{time.monotonic() - t0:.0f} |")


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    if ROWS:
        RESULTS.mkdir(parents=True, exist_ok=True)
        text = ("| mode | phase | fault | acked writes | lost writes | secondary prefix | converged | s |\n"
                "|---|---|---|---|---|---|---|---|\n" + "\n".join(ROWS) + "\n")
        (RESULTS / "fault-matrix.md").write_text(text)
        print("\n" + text)
