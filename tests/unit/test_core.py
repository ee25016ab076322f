"""The core's rules, one node at a time, with no process, file or socket (tests/unit/core_harness.py).

Each of issue 12's eight defects has a test here that the old threaded code failed; planting
the defect back into the core makes the same test fail (test_planted_defects.py).
"""
from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest

from replicator import wire
from replicator.core import effects as E
from replicator.core import tables as T
from replicator.core.bitmap import DiffMap
from replicator.core.journal_space import RECORD_HEADER_BYTES
from replicator.core.migration import source_key
from replicator.core.node import HostIo
from replicator.errors import IntegrityError, NodeUnreachable, RcopyError, StateError
from replicator.sim.scenario import SIM_CONFIG

from .core_harness import Harness

CORE = Path(__file__).resolve().parents[2] / "replicator" / "core"
SIZE = 32 * 1024
B = {"node": "site-b", "control": "site-b", "volume": "v3"}
A1 = {"node": "site-a1", "control": "site-a1", "volume": "v1"}
A2 = {"node": "site-a2", "control": "site-a2", "volume": "v2"}


def block(ch: str, n: int = 512) -> bytes:
    return ch.encode() * n


def finish_copy(h: Harness) -> None:
    """Answer the initial copy until the pair is duplex."""
    for _ in range(100):
        for c in list(h.calls):
            if c.msg.kind in ("pair.write", "pair.resync_done", "journal.push"):
                reply = wire.ok(applied=0, incarnation="b#1") if c.msg.kind == "journal.push" else wire.ok()
                h.answer(c, reply)
        h.advance(0.06)
        if h.core.volumes["v1"].info.pair_state == T.DUPLEX:
            return
    raise AssertionError("the initial copy did not finish")


def primary(mode: str = "sync", **kw: object) -> Harness:
    h = Harness("site-a1")
    h.ok("volume.create", name="v1", size=SIZE)
    h.request("pair.create", volume="v1", mode=mode, secondary=B, **kw)
    h.answer(h.pending("pair.join")[0], wire.ok())
    finish_copy(h)
    return h


def pump(h: Harness, rounds: int = 5, applied: int = 0) -> None:
    """Answer every push (as a secondary that applied ``applied``) and let time pass."""
    for _ in range(rounds):
        for c in h.pending("journal.push"):
            h.answer(c, wire.ok(applied=applied, incarnation="b#1"))
        h.advance(0.06)


def pushes(h: Harness) -> list[E.Call]:
    return [e for e in h.trace if isinstance(e, E.Call) and e.msg.kind == "journal.push" and e.msg.fields["entries"]]


def order(h: Harness, *preds: object) -> list[int]:
    """Indexes in the trace of the first effect matching each predicate, in turn."""
    out, start = [], 0
    for pred in preds:
        i = next(i for i in range(start, len(h.trace)) if pred(h.trace[i]))  # type: ignore[operator]
        out.append(i)
        start = i + 1
    return out


# ================================================================== the core does no I/O
FORBIDDEN = {"threading", "socket", "zmq", "os", "time", "nbdkit", "subprocess", "select", "asyncio", "io",
             "pathlib", "shutil", "tempfile", "multiprocessing", "queue", "signal"}


def test_the_core_imports_nothing_that_does_io() -> None:
    for path in CORE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_state_variables_change_only_through_their_tables() -> None:
    attrs = {t.attr for t in (T.PAIR_STATE, T.RW_MODE, T.COPY_SOURCE_VALID, T.PHASE, T.RUN_STATE, T.SOURCE_STAGE)}
    for path in CORE.glob("*.py"):
        if path.name == "tables.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                for sub in ast.walk(t):
                    if isinstance(sub, ast.Attribute) and sub.attr in attrs:
                        pytest.fail(f"{path.name}:{node.lineno} assigns .{sub.attr} outside tables.go")


def test_ring_space_header_matches_the_journal_format() -> None:
    from journal.entry import HEADER_SIZE
    assert RECORD_HEADER_BYTES == HEADER_SIZE


def test_the_phase_table_says_what_each_phase_does() -> None:
    assert [p.name for p in T.PHASES] == [T.THROUGH, T.PENDING, T.TRANSITIONAL, T.MIGRATING, T.DONE]
    for p in T.PHASES:
        assert p.rw_mode in T.RW_MODE.transitions and p.host_io and p.source and p.valid


# ================================================================== defect 4: sync writes and errors
def test_defect4_any_secondary_error_suspends_and_tracks_before_the_ack() -> None:
    h = primary("sync")
    req = h.write("v1", 4096, block("x"))
    call = h.pending("pair.write")[0]
    h.answer(call, wire.error_reply(IntegrityError("No space left on device (site-b)")))
    assert req in h.host and h.host[req].error is None           # the host write succeeds ...
    v = h.core.volumes["v1"]
    assert v.info.pair_state == T.SUSPENDED and v.diff.any_set(4096, 512)   # ... tracked, suspended
    done = h.trace.index(h.host[req])
    synced = max(i for i, e in enumerate(h.trace[:done]) if isinstance(e, E.BitmapSync) and e.kind == "diff")
    saved = max(i for i, e in enumerate(h.trace[:done]) if isinstance(e, E.SaveMgmt))
    assert synced < done and saved < done                          # both durable first


# ================================================================== defect 2: durability before reports
def test_defect2_push_sends_only_entries_that_are_durable() -> None:
    h = primary("async")
    pump(h)
    h.write("v1", 0, block("a"))
    pump(h)
    push = pushes(h)[0]
    i_push = h.trace.index(push)
    assert any(isinstance(e, E.JournalSync) for e in h.trace[:i_push])
    i_append = next(i for i, e in enumerate(h.trace) if isinstance(e, E.JournalAppend))
    i_sync = next(i for i, e in enumerate(h.trace) if isinstance(e, E.JournalSync) and i > i_append)
    assert i_append < i_sync < i_push


def secondary() -> Harness:
    h = Harness("site-b")
    h.ok("volume.create", name="v3", size=SIZE)
    h.ok("pair.join", volume="v3", source=A1, size=SIZE, mode="async", group="g", next_seq=1, epoch=0)
    return h


def test_defect2_applied_is_reported_only_once_data_and_pointer_are_durable() -> None:
    h = secondary()
    first = h.ok("journal.push", [block("a"), block("b")], group="g", source="site-a1",
                 entries=[[1, "v1", 0, 512], [2, "v1", 512, 512]])
    assert first["applied"] == 0
    again = h.ok("journal.push", [], group="g", source="site-a1", entries=[])
    assert again["applied"] == 2
    reply = next(e for e in reversed(h.trace) if isinstance(e, E.Reply) and e.msg.fields.get("applied") == 2)
    i_reply = h.trace.index(reply)
    i_write, i_sync, i_record = order(h, lambda e: isinstance(e, E.VolWriteMany) and e.writes[0][0] == "v3",
                                      lambda e: isinstance(e, E.VolSync) and e.volume == "v3",
                                      lambda e: isinstance(e, E.SaveApplied) and e.applied == 2)
    assert i_write < i_sync < i_record < i_reply


def test_defect2_a_resync_never_moves_the_applied_pointer_back() -> None:
    h = secondary()
    h.ok("journal.push", [block("a")], group="g", source="site-a1", entries=[[1, "v1", 0, 512]])
    h.ok("journal.push", [], group="g", source="site-a1", entries=[])
    reply = h.request("pair.resync_begin", group="g", next_seq=1, source="site-a1", epoch=1)
    with pytest.raises(StateError, match="back"):
        wire.raise_if_error(reply)


# ================================================================== defect 6: the handover's edges
def test_defect6_a_resync_from_a_source_that_is_not_valid_is_refused() -> None:
    h = secondary()
    h.ok("mig.add_source", volume="v3", source=A2)
    reply = h.request("pair.resync_begin", group="g", next_seq=5, source="site-a2", epoch=1)
    with pytest.raises(StateError, match="does not accept"):
        wire.raise_if_error(reply)


def source_ready(mode: str = "sync") -> Harness:
    h = primary(mode)
    h.ok("mig.prepare_source", volume="v1", target=A2, id="m")
    return h


def test_defect6_the_handover_waits_for_a_write_already_admitted() -> None:
    h = source_ready("sync")
    req = h.write("v1", 0, block("w"))                          # waiting for V3
    handover = h.request("mig.handover", volumes=["v1"], target="site-a2", id="m", attempt="x/1")
    assert handover is None                                       # no snapshot while it is in flight
    late = h.write("v1", 512, block("l"))                          # admitted after the freeze: refused
    assert isinstance(h.host[late].error, StateError)
    h.answer(h.pending("pair.write")[0], wire.ok())
    assert h.host[req].error is None
    snapshot = next(r for r in h.replies.values() if "members" in r.fields)
    assert snapshot.fields["members"][0]["pair_state"] == T.DUPLEX


def test_defect6_a_frozen_source_never_resumes_its_pair_by_itself() -> None:
    h = source_ready("async")
    h.ok("pair.suspend", volume="v1")
    h.ok("mig.handover", volumes=["v1"], target="site-a2", id="m", attempt="x/1")
    for c in list(h.calls):
        h.answer(c, wire.ok(applied=0, incarnation="b#1"))
    h.advance(3.0)
    for c in list(h.calls):
        if c.msg.kind == "ping":
            h.answer(c, wire.ok())
    h.advance(3.0)
    assert not any(isinstance(e, E.Call) and e.msg.kind == "pair.resync_begin" for e in h.trace)


# ================================================================== defect 1: a handover that fails
def target(mode: str = "sync") -> Harness:
    h = Harness("site-a2")
    h.ok("volume.create", name="v2", size=SIZE)
    h.ok("mig.prepare_target", id="m", group="v1", members=[{"target": "v2", "size": SIZE, "source": A1,
                                                              "secondary": B}])
    return h


def test_defect1_a_failed_handover_goes_back_to_through_and_can_be_resumed() -> None:
    h = target()
    h.ok("mig.start", id="m")
    req = h.write("v2", 0, block("p"))                            # held in PENDING
    assert req not in h.host
    for _ in range(200):                                          # V1 never answers
        for c in h.pending("mig.handover"):
            h.answer(c, NodeUnreachable("no answer from site-a1"))
        h.advance(0.05)
        if h.pending("volume.write"):
            break
    v = h.core.volumes["v2"]
    tm = h.core.migrations["m"]
    assert (tm.phase, tm.state, v.info.rw_mode) == (T.THROUGH, T.FAILED, T.THROUGH)
    assert h.pending("mig.thaw")                                  # V1 is told to take writes again
    relay = h.pending("volume.write")[0]                          # the held write now goes to V1
    h.answer(relay, wire.ok())
    assert h.host[req].error is None
    for c in h.pending("mig.thaw"):
        h.answer(c, wire.ok())
    h.ok("mig.start", id="m")                                     # rcopy migrate --resume
    assert (tm.state, tm.phase) == (T.RUNNING, T.PENDING) and h.pending("mig.handover")


# ================================================================== defect 3: background tasks
def test_defect3_a_background_task_that_fails_is_restarted_and_reported() -> None:
    h = primary("async")
    pump(h)
    real = h.world.storage
    broken = {"n": 0}

    def storage(d, eff):  # noqa: ANN001
        if isinstance(eff, E.JournalSync) and broken["n"] < 1:
            broken["n"] += 1
            raise IntegrityError("journal g: cannot sync")
        return real(d, eff)
    h.world.storage = storage  # type: ignore[method-assign]
    h.write("v1", 0, block("a"))          # its push syncs the journal at once
    pump(h, 2)
    assert broken["n"] == 1 and "IntegrityError" in h.core.task_errors.get("push-v1", "")
    assert h.core.status()["task_errors"]                         # it shows
    pump(h, 10)
    assert pushes(h), "the push loop must come back after the failure"


# ================================================================== defect 7: bounded memory
def test_defect7_lag_samples_stay_bounded() -> None:
    h = primary("async")
    for i in range(400):
        h.write("v1", (i % 60) * 512, block("z"))
        h.advance(0.006)
        for c in list(h.calls):
            if c.msg.kind == "journal.push":
                h.answer(c, NodeUnreachable("slow secondary"))
    g = h.core.primary.groups["v1"]
    assert len(g.lag) <= h.core.cfg.lag_samples_max


# ================================================================== defect 8: dual write
def migrating_target(v1_diff: DiffMap | None = None) -> Harness:
    """V2 after a handover from a duplex sync V1 whose diff bitmap is ``v1_diff`` (clear)."""
    h = Harness("site-a2")
    h.ok("volume.create", name="v2", size=SIZE)
    h.ok("mig.prepare_target", id="m", group="v1", dual_write=True,
         members=[{"target": "v2", "size": SIZE, "source": A1, "secondary": B}])
    h.ok("mig.start", id="m")
    handover = h.pending("mig.handover")[0]
    diff = v1_diff or h.core.volumes["v2"].diff
    h.answer(handover, wire.ok([diff.packed()], handover_seq=0, journal={}, members=[{
        "volume": "v1", "mode": "sync", "group": "v1", "transfer": "push", "pair_state": "duplex",
        "suspend_reason": "", "auto_resume": True, "copy_epoch": 0,
        "diff_block_bytes": diff.block_bytes, "diff_frame": 0}]))
    for c in h.pending("mig.set_valid"):
        h.answer(c, wire.ok())
    assert h.core.volumes["v2"].info.rw_mode == T.MIGRATING
    return h


def test_defect8_dual_write_happens_in_order_before_the_ack_and_a_failure_is_recorded() -> None:
    h = migrating_target()
    req = h.write("v2", 0, block("d"))
    fetch = h.pending("mig.fetch")[0]                             # region 0 comes from V1 first
    h.answer(fetch, wire.ok([bytes(4096)], zero=0))
    h.answer(h.pending("pair.write")[0], wire.ok())
    dual = h.pending("mig.dual_write")[0]
    assert req not in h.host                                      # not acknowledged before V1 has it
    h.answer(dual, NodeUnreachable("site-a1 is down"))
    assert h.host[req].error is None
    assert "missed a write" in h.core.migrations["m"].dual_write_lost
    h.write("v2", 512, block("e"))
    h.answer(h.pending("pair.write")[0], wire.ok())
    assert not h.pending("mig.dual_write")                        # the fallback is gone, said so


def test_defect2_a_fetched_region_is_durable_before_its_migrated_bit() -> None:
    h = migrating_target()
    h.write("v2", 0, block("d"))
    h.answer(h.pending("mig.fetch")[0], wire.ok([b"o" * 4096], zero=0))
    i_write, i_sync, i_bit, i_bitsync = order(
        h, lambda e: isinstance(e, E.VolWrite) and e.volume == "v2",
        lambda e: isinstance(e, E.VolSync) and e.volume == "v2",
        lambda e: isinstance(e, E.BitmapPut) and e.kind == "migrated",
        lambda e: isinstance(e, E.BitmapSync) and e.kind == "migrated")
    assert i_write < i_sync < i_bit < i_bitsync


def test_defect2_a_damaged_migrated_bitmap_stops_the_migration_instead_of_guessing() -> None:
    from replicator.core.node import BootState
    h = migrating_target()
    record = h.core.record()
    st = BootState(mgmt=record, bitmaps={("v2", "diff"): h.core.volumes["v2"].diff.to_bytes(), ("v2", "migrated"): None,
                                         ("v2", "activity"): bytes(1)}, incarnation="a2#2")
    again = Harness("site-a2", boot=st)
    tm = again.core.migrations["m"]
    assert tm.state == T.FAILED and "damaged" in tm.error
    req = again.write("v2", 0, block("x"))
    assert isinstance(again.host[req].error, StateError)


def test_a_run_of_holes_from_v1_never_zeroes_a_region_v2_already_holds() -> None:
    """The background copy sends V1's regions without data as one zero command; V2 zeroes only
    the regions it has not migrated (one may hold a newer host write), zeros durable before bits."""
    h = migrating_target()
    h.write("v2", 4096 + 512, block("n"))                        # region 1: fetched, then written
    h.answer(h.pending("mig.fetch")[0], wire.ok([bytes(4096)], zero=0))
    h.answer(h.pending("pair.write")[0], wire.ok())
    h.answer(h.pending("mig.dual_write")[0], wire.ok())
    nregions = h.core.volumes["v2"].migrated.nregions
    h.ok("mig.region", volume="v2", region=0, count=nregions, zero=SIZE)
    v2 = h.volume_file("v2")
    assert v2[4096 + 512:4096 + 1024] == block("n")                # kept
    assert h.core.volumes["v2"].migrated.all_set()
    zeros = [e for e in h.trace if isinstance(e, E.VolZero) and e.volume == "v2"]
    assert [(z.offset, z.length) for z in zeros] == [(0, 4096), (8192, SIZE - 8192)]
    i_zero, i_sync, i_bit = order(h, lambda e: isinstance(e, E.VolZero) and e.volume == "v2",
                                  lambda e: isinstance(e, E.VolSync) and e.volume == "v2",
                                  lambda e: isinstance(e, E.BitmapSync) and e.kind == "migrated")
    assert i_zero < i_sync < i_bit


# ================================================================== found by the long run of 2026-12-01
def test_a_fold_makes_the_entries_data_durable_in_the_volume_before_it_discards_them() -> None:
    """Seed 109020: after a restart the roll-forward writes live entries into the volume's page
    cache; a fold then dropped them from the journal, and a second power loss lost them."""
    h = primary("async")
    for i in range(3):
        h.write("v1", i * 512, block("r"))
    h.ok("pair.suspend", volume="v1")                             # folds the unapplied entries
    i_sync, i_drop = order(h, lambda e: isinstance(e, E.VolSync) and e.volume == "v1",
                           lambda e: isinstance(e, E.JournalDiscard))
    last_write = max(i for i, e in enumerate(h.trace) if isinstance(e, E.VolWrite) and e.volume == "v1")
    last_sync = max(i for i, e in enumerate(h.trace[:i_drop]) if isinstance(e, E.VolSync) and e.volume == "v1")
    assert last_write < last_sync < i_drop


def test_two_resumes_at_once_start_one_resync() -> None:
    """Seed 132530: the user's resume and the automatic one both sent resync_begin with one epoch;
    the late second one dropped the entries V3 had buffered since the first, and V3 stalled."""
    h = primary("async")
    h.ok("pair.suspend", volume="v1")
    first = h.request("pair.resume", volume="v1")
    second = h.request("pair.resume", volume="v1")
    assert first is None and second is None                       # both wait for V3
    begins = h.pending("pair.resync_begin")
    assert len(begins) == 1
    h.answer(begins[0], wire.ok())
    assert not h.pending("pair.resync_begin")                      # the second found it resumed
    assert sum(isinstance(e, E.Call) and e.msg.kind == "pair.resync_begin" for e in h.trace) == 1


def test_v1_reports_drained_only_once_that_is_durable() -> None:
    """Seed 133260: V2 acted on 'drained' (V3 stopped taking V1) before V1 had saved it; V1
    restarted in handed_over and waited for ever for an applied report from V3."""
    h = source_ready("async")
    h.ok("mig.handover", volumes=["v1"], target="site-a2", id="m", attempt="x/1")
    sm = h.core.migrations[source_key("m")]
    T.go(T.SOURCE_STAGE, sm, T.HANDED_OVER)
    T.go(T.SOURCE_STAGE, sm, T.DRAINED)                            # in memory, not saved yet
    st = h.ok("mig.source_status", volumes=["v1"])["volumes"][0]
    assert st["stage"] == T.DRAINED and not st["drained"]
    h.core.mig.saved_stage["m"] = T.DRAINED                        # what source_procedure sets after save()
    assert h.ok("mig.source_status", volumes=["v1"])["volumes"][0]["drained"]


def test_a_pair_verify_marked_stays_suspended_until_the_operator_resumes_it() -> None:
    """Online verify suspends the pair to mark what differs; the automatic resumer must leave
    that to `rcopy pair resume` (or --repair), as the CLI says."""
    h = primary("async")
    h.ok("verify.mark", volume="v1", ranges=[[4096, 512]])
    v1 = h.core.volumes["v1"]
    assert v1.info.pair_state == T.SUSPENDED and v1.info.suspend_reason == T.VERIFY_SUSPEND
    assert v1.diff.dirty_bytes() > 0
    for _ in range(10):                               # V3 answers every ping: reachable
        for c in list(h.calls):
            h.answer(c, wire.ok(applied=0, incarnation="b#1"))
        h.advance(1.0)
    assert v1.info.pair_state == T.SUSPENDED
    assert not any(isinstance(e, E.Call) and e.msg.kind == "pair.resync_begin" for e in h.trace)
    h.request("pair.resume", volume="v1")
    assert h.pending("pair.resync_begin")


def test_a_plain_write_holds_its_regions_and_its_count_until_it_is_written() -> None:
    """NodeCore.direct_write (a volume in no pair written without a task): while its bytes are
    being written, the initial copy of a pair created meanwhile waits for its region (so the copy
    reads the new bytes) and the volume cannot be deleted; a pair or a held region sends writes
    back to the task."""
    h = Harness("site-a1")
    h.ok("volume.create", name="v1", size=SIZE)
    w = h.direct("v1", 0, block("n"))
    vol = w.vol
    assert vol.inflight == 1 and w.group is None and w.data == block("n")
    assert h.direct("v1", 256, block("m")) is None      # its region is held: the task waits
    with pytest.raises(Exception, match="outside"):
        h.direct("v1", SIZE - 256, block("m"))
    assert "in flight" in str(h.request("volume.delete", name="v1").fields)
    h.request("pair.create", volume="v1", mode="sync", secondary=B)
    h.answer(h.pending("pair.join")[0], wire.ok())
    h.advance(0.1)
    assert not [c for c in h.pending("pair.write") if c.msg["offset"] == 0]   # region 0 waits
    h.direct_landed(w)                                                          # the bytes land
    h.advance(0.1)
    copy = [c for c in h.pending("pair.write") if c.msg["offset"] == 0]
    assert copy and bytes(copy[0].msg.payloads[0][:512]) == block("n")
    assert vol.inflight == 0 and h.direct("v1", 1024, block("m")) is None   # a sync pair now


def test_a_pair_create_waits_for_the_writes_past_the_plain_gate_and_closes_it() -> None:
    """core/plain_gate.py: a plain write the core admits opens the volume's gate (a read opens it to
    reads); a pair create
    closes it in the step that makes the volume a primary, only once no write is past it; a
    flush syncs the volume for the writes that passed; a volume delete refuses while one is past."""
    h = Harness("site-a1")
    h.ok("volume.create", name="v1", size=SIZE)
    vol = h.core.volumes["v1"]
    assert not vol.gate.enter()                          # closed until the core admits a write
    h.feed(HostIo(("host", 0), "read", "v1", 0, 512, None, False))
    assert vol.gate.reads and not vol.gate.open and h.host[("host", 0)].data == bytes(512)  # reads only
    vol.gate.reads = False
    h.direct_landed(h.direct("v1", 0, block("a")))
    assert vol.gate.enter()                              # open: this write passes without the core
    assert "in flight" in str(h.request("volume.delete", name="v1").fields)
    assert not vol.gate.enter()                          # the refusal closed it: the core's path
    h.direct_landed(h.direct("v1", 0, block("a")))       # ... which opens it again
    def flush_syncs() -> bool:
        mark = len(h.storage_log)
        h.feed(HostIo(("host", mark), "flush", "v1", 0, 0, None, False))
        return any(isinstance(e, E.VolSync) for e in h.storage_log[mark:])
    assert flush_syncs() and not flush_syncs()           # the core's writes; then nothing new
    vol.gate.leave(512)                                  # the write past the gate is done
    assert flush_syncs()                                 # ... and a flush syncs for it
    assert vol.gate.enter()
    h.request("pair.create", volume="v1", mode="sync", secondary=B)
    h.answer(h.pending("pair.join")[0], wire.ok())
    assert h.drains and vol.info.remote_copy_flag == "off"      # waits for the write past the gate
    assert not vol.gate.enter()                                  # closed meanwhile
    h.direct_landed(h.direct("v1", 1024, block("c")))            # the core's write does not reopen it
    assert not vol.gate.open and vol.gate.enter(read=True)           # reads go on, and are not waited for
    vol.gate.leave(512)
    h.drained()
    vol.gate.leave_read()
    assert vol.info.remote_copy_flag == "source" and not vol.gate.open
    h.write("v1", 512, block("b"))                      # a primary's write never opens it
    assert not vol.gate.open and vol.gate.fold() == (2, 1024)
    h.feed(HostIo(("host", 9), "read", "v1", 0, 512, None, False))
    assert vol.gate.reads and not vol.gate.open          # a primary's read lets reads pass


def test_a_migration_target_shuts_the_gate_to_reads_and_never_opens_it() -> None:
    """V2 relays its reads to V1 (THROUGH) or fetches regions (MIGRATING): its gate opened to
    reads while it was plain is shut when the migration to it starts, and stays shut."""
    h = Harness("site-a2")
    h.ok("volume.create", name="v2", size=SIZE)
    v2 = h.core.volumes["v2"]
    h.feed(HostIo(("host", 0), "read", "v2", 0, 512, None, False))
    assert v2.gate.reads
    h.ok("mig.prepare_target", id="m", group="v1", members=[{"target": "v2", "size": SIZE, "source": A1,
                                                              "secondary": B}])
    assert not v2.gate.reads and not v2.gate.open
    h.feed(HostIo(("host", 1), "read", "v2", 0, 512, None, False))     # relayed to V1 (THROUGH)
    assert not v2.gate.reads and h.pending("volume.read")


def test_an_async_write_without_a_task_is_journaled_first_and_holds_until_written() -> None:
    """NodeCore.direct_write on a duplex async primary: the entry is numbered and stored in the
    call (before the volume write), the region, the in-flight count and the entry's volume write
    are held until direct_written, and the journal keeps its own copy of the bytes (nbdkit reuses
    its buffer). A region whose activity bit is not set yet goes through the task."""
    h = primary("async")
    g = h.core.primary.groups[h.core.volumes["v1"].info.group]
    assert h.direct("v1", 0, block("a")) is None            # activity bit not set: the task sets it
    h.write("v1", 0, block("a"))
    buf = bytearray(block("b"))
    w = h.direct("v1", 512, buf)
    assert w is not None and w.group is g and w.seq == g.stored and not w.as_task
    assert h.daemon.disk.journals[g.name].stored == w.seq           # journaled before the volume write
    assert h.volume_file("v1")[512:1024] != block("b")
    assert w.vol.inflight == 1 and w.seq in g.writing
    assert h.direct("v1", 700, block("c")) is None          # its region is held
    h.direct_landed(w)
    buf[:] = block("x")                                     # nbdkit's buffer, reused
    assert h.volume_file("v1")[512:1024] == block("b")
    assert w.vol.inflight == 0 and w.seq not in g.writing and not w.vol.locks.held
    assert w.vol.active_seq[0] == w.seq
    assert bytes(g.cache[w.seq].data) == block("b")


def sync_warm(h: Harness, regions: int) -> None:
    """Task writes to the first ``regions`` regions, answered: their activity bits are set."""
    reqs = [h.write("v1", r * 4096, block("a")) for r in range(regions)]
    while h.pending("pair.write"):
        h.answer(h.pending("pair.write")[0], wire.ok())
    assert all(h.host[r].error is None for r in reqs)


def sync_direct(h: Harness, offset: int, data: bytes) -> Any:
    """A sync write without a task whose bytes landed: its batch is on its way (or queued)."""
    w = h.direct("v1", offset, data)
    assert w is not None and w.waits and not w.as_task
    h.direct_landed(w)
    return w


def test_a_sync_write_without_a_task_is_answered_once_the_secondary_holds_it() -> None:
    """NodeCore.direct_write on a duplex sync primary: written here, then sent with its volume's
    next batch; the region, the in-flight count and the activity hold until the secondary
    answers, and only then is the host answered (by the batch's sender, not the writer).
    Batches in flight at once: sync_batches_in_flight; the writes that wait meanwhile share the
    next round trip."""
    h = primary("sync")
    assert h.direct("v1", 4096, block("a")) is None         # activity bit not set: the task sets it
    sync_warm(h, 5)
    reqs, ws = [], []
    for i, ch in enumerate("bcde"):
        ws.append(sync_direct(h, 4096 * (i + 1), block(ch)))
        reqs.append(h.last_req)
    vol = ws[0].vol
    assert h.volume_file("v1")[4096:4608] == block("b")     # written here before it is sent
    calls = h.pending("pair.write")
    assert len(calls) == h.core.cfg.sync_batches_in_flight == 2
    assert [c.msg["offset"] for c in calls] == [4096, 8192] and bytes(calls[0].msg.payloads[0]) == block("b")
    assert not any(r in h.host for r in reqs)               # nobody answered before the secondary
    assert vol.inflight == 4 and vol.locks.held and h.direct("v1", 4700, block("x")) is None
    h.answer(calls[0], wire.ok())
    assert reqs[0] in h.host and h.host[reqs[0]].error is None and reqs[1] not in h.host
    batch = h.pending("pair.write")[-1]                     # the two that waited share one round trip
    assert [o for o, *_ in batch.msg["writes"]] == [12288, 16384]
    h.answer(calls[1], wire.ok())
    h.answer(batch, wire.ok())
    assert all(h.host[r].error is None for r in reqs)
    assert vol.inflight == 0 and not vol.locks.held and not any(vol.active.values())
    assert vol.info.pair_state == T.DUPLEX and not vol.diff.any_set(0, SIZE)


def test_a_sync_write_without_a_task_the_secondary_fails_is_tracked_before_the_ack() -> None:
    """Defect 4 for a write without a task: any error of its batch suspends the pair and tracks
    the write (diff bit and pair state durable) before the host is answered, with success; the
    writes queued behind it are tracked without a try."""
    h = primary("sync")
    sync_warm(h, 5)
    sync_direct(h, 4096, block("x"))
    req = h.last_req
    sync_direct(h, 8192, block("y"))
    sync_direct(h, 12288, block("z"))                       # queued behind two batches in flight
    queued = h.last_req
    first, second = h.pending("pair.write")
    h.answer(first, wire.error_reply(IntegrityError("No space left on device (site-b)")))
    v = h.core.volumes["v1"]
    assert req in h.host and h.host[req].error is None and h.host[queued].error is None
    assert v.info.pair_state == T.SUSPENDED and v.diff.any_set(4096, 512) and v.diff.any_set(12288, 512)
    done = h.trace.index(h.host[req])
    synced = max(i for i, e in enumerate(h.trace[:done]) if isinstance(e, E.BitmapSync) and e.kind == "diff")
    saved = max(i for i, e in enumerate(h.trace[:done]) if isinstance(e, E.SaveMgmt))
    assert synced < done and saved < done
    h.answer(second, wire.ok())                             # the other batch arrived: answered as is
    assert all(r.error is None for r in h.host.values())
    assert v.inflight == 0 and not v.locks.held and not any(v.active.values())
    assert h.direct("v1", 16384, block("w")) is None        # suspended: tracked writes take the task


def test_an_async_write_without_a_task_whose_append_fails_folds_then_writes() -> None:
    """A failed journal append in direct_write goes on as host_write's task would: the journal
    folds into the diff bitmap (the pair suspends), then the volume is written and the host answered."""
    h = primary("async")
    h.write("v1", 0, block("a"))
    w = h.direct("v1", 1024, block("f"), fail=RcopyError("disk full"))
    assert w is not None and w.as_task
    for _ in range(20):
        if h.last_req in h.host:
            break
        h.advance(0.1)
    assert h.host[h.last_req].error is None
    vol = w.vol
    assert h.volume_file("v1")[1024:1536] == block("f")
    assert vol.info.pair_state == T.SUSPENDED and vol.diff.any_set(1024, 512)
    assert vol.inflight == 0 and not vol.locks.held and not vol.active
    assert h.direct("v1", 2048, block("g")) is None         # suspended: tracked writes take the task


def test_the_background_copy_keeps_copy_streams_messages_in_flight() -> None:
    """A stream whose hole check reserved the regions ahead made the other streams find nothing
    and end: one region message in flight at a time (2026-12-04: 1.3x the copy rate once fixed).
    Now they wait for what it gives back, so copy_streams messages go at once."""
    h = source_ready("sync")
    h.ok("mig.handover", volumes=["v1"], target="site-a2", id="m", attempt="x/1")
    for offset in range(0, SIZE, 4096):                           # data in every region: no holes
        h.world.storage(h.daemon, E.VolWrite("v1", offset, block(chr(97 + offset // 4096), 4096)))
    sm, v1 = h.core.migrations[source_key("m")], h.core.volumes["v1"]
    h.core.rt.spawn(h.core.mig._background_copy(sm, v1), "copy")
    h.feed_effects(h.core.rt.take())
    streams, batch = h.core.cfg.copy_streams, h.core.cfg.copy_batch_regions
    sent: list[tuple[int, int]] = []
    while not v1.migrated.all_set():
        calls = h.pending("mig.region")
        assert len(calls) == min(streams, -(-(v1.migrated.nregions - len(sent) * batch) // batch))
        for c in calls:
            sent.append((c.msg["region"], c.msg["count"]))
            h.answer(c, wire.ok(skipped=False))
    assert sorted(sent) == [(r, min(batch, v1.migrated.nregions - r)) for r in range(0, v1.migrated.nregions, batch)]


def test_a_window_of_pushes_travels_at_once_and_sends_every_entry_once_in_order() -> None:
    """While a push travels, fewer entries than a batch wait for its reply (small writes gather
    into one push); whole batches go at once, up to push_window of them before a reply comes
    back (a long link is not idle meanwhile), each read from the journal while the others
    travel. Answered in any order, they send every entry once, in order."""
    h = Harness("site-a1", cfg=replace(SIM_CONFIG, push_cache_bytes=0, push_window=3))  # every batch read
    h.ok("volume.create", name="v1", size=SIZE)
    h.request("pair.create", volume="v1", mode="async", secondary=B)
    h.answer(h.pending("pair.join")[0], wire.ok())
    finish_copy(h)
    for c in h.pending("journal.push"):                             # heartbeats: the secondary is b#1
        h.answer(c, wire.ok(applied=0, incarnation="b#1"))
    n = 60
    for i in range(n):
        h.write("v1", i % 32 * 1024, block(chr(97 + i % 26), 1024))
    first = h.pending("journal.push")
    assert [len(c.msg["entries"]) for c in first] == [1]            # the rest waits for its reply
    h.answer(first[0], wire.ok(applied=0, incarnation="b#1"))
    window = h.pending("journal.push")
    assert [len(c.msg["entries"]) for c in window] == [12, 12, 12]  # whole batches (12 KiB), a window
    for _ in range(20):
        calls = h.pending("journal.push")
        if not any(c.msg["entries"] for c in calls):
            break
        for c in reversed(calls):                                   # the replies out of order
            h.answer(c, wire.ok(applied=0, incarnation="b#1"))
    assert [m[0] for c in pushes(h) for m in c.msg["entries"]] == list(range(1, n + 1))
    assert any(isinstance(e, E.JournalRead) for e in h.trace)
