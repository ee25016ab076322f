"""Live migration V1 -> V2 under a writer, through the virtual volume (SPEC 4, invariants 1-11, 16, 30)."""
from __future__ import annotations

import os
import random
import threading

import nbd
import pytest

from replicator.errors import NotFound, StateError, UsageError
from tests.conftest import nbd_handle

MiB = 1 << 20
BLOCK = 4096


def vvol_handle(t, name="app"):
    h = nbd.NBD()
    h.connect_uri(t.cluster.vvol_server().nbd_uri(name))
    return h


class Writer(threading.Thread):
    """Writes random blocks through the virtual volume and remembers every acknowledged one."""

    def __init__(self, t, blocks: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.t, self.blocks, self.rnd = t, blocks, random.Random(seed)
        self.acked: dict[int, bytes] = {}
        self.stop = threading.Event()
        self.errors: list[Exception] = []
        self.count = 0

    def run(self) -> None:
        h = vvol_handle(self.t)
        try:
            while not self.stop.is_set():
                b = self.rnd.randrange(self.blocks)
                data = self.rnd.randbytes(BLOCK)
                h.pwrite(data, b * BLOCK)
                self.acked[b] = data
                self.count += 1
        except Exception as exc:
            self.errors.append(exc)
        finally:
            h.shutdown()

    def check(self) -> None:
        h = vvol_handle(self.t)
        for b, data in self.acked.items():
            assert h.pread(BLOCK, b * BLOCK) == data, f"block {b} lost"
        h.shutdown()


@pytest.mark.parametrize("mode,transfer", [("async", "push"), ("async", "pull"), ("sync", "push")])
def test_migrate_under_writes_remote_copy_continues(started, mode, transfer):
    t = started
    size = 48 * MiB
    for spec in ("site-a1:v1", "site-a2:v2", "site-b:v3"):
        t.volume_create(spec, size)
    t.pair_create("site-a1:v1", "site-b:v3", mode=mode, transfer=transfer)
    t.wait_duplex("site-a1:v1", 60)
    t.vvol_create("app", "site-a1:v1")
    h = vvol_handle(t)
    rnd = random.Random(1)
    for r in range(0, size, 2 * MiB):  # data everywhere, so the background copy has work
        h.pwrite(rnd.randbytes(64 * 1024), r)
    h.shutdown()
    w = Writer(t, size // BLOCK, seed=2)
    w.start()
    try:
        result = t.migrate("site-a1:v1", "site-a2:v2")
    finally:
        w.stop.set()
        w.join(30)
    assert not w.errors, w.errors
    assert w.count > 0
    assert result["state"] == "done" and result["vvols_switched"] == ["app"]
    assert result["host_pause_ms_max"] >= 0
    w.check()
    st = t.status()
    pair = next(p for p in st["pairs"] if p["primary"] == "site-a2:v2")
    assert pair["secondary"] == "site-b:v3" and pair["copy_source_valid"] == "2"
    v2 = next(v for v in st["volumes"] if v["node"] == "site-a2" and v["name"] == "v2")
    assert v2["rw_mode"] == "normal" and v2["role"] == "primary"
    assert next(vv for vv in st["vvols"] if vv["name"] == "app")["target"] == "site-a2:v2"
    assert t.verify("site-a2:v2", "site-b:v3", timeout_s=120)["identical"]
    assert t.verify("site-a1:v1", "site-a2:v2", wait=False)["identical"] is False or w.count == 0

    t.volume_create("site-a1:vback", size)            # a second migration before remove: refused
    with pytest.raises(StateError, match="earlier migration"):
        t.migrate("site-a2:v2", "site-a1:vback")
    assert next(vv for vv in t.status()["vvols"] if vv["name"] == "app")["target"] == "site-a2:v2"

    t.remove("site-a1")
    st = t.status()
    assert not any(p["primary"] == "site-a1:v1" for p in st["pairs"])
    h = vvol_handle(t)
    h.pwrite(b"after-remove".ljust(BLOCK, b"."), 0)
    h.shutdown()
    assert t.verify("site-a2:v2", "site-b:v3", timeout_s=60)["identical"]
    p = next(p for p in t.status()["pairs"] if p["primary"] == "site-a2:v2")
    assert p["state"] == "duplex" and p["copy_source_valid"] == "1"


def test_migration_that_cannot_start_changes_nothing(started):
    t = started
    t.volume_create("site-a1:v1", 16 * MiB)
    t.volume_create("site-b:v3", 16 * MiB)
    t.volume_create("site-a2:small", 8 * MiB)
    t.volume_create("site-a2:v2", 16 * MiB)
    with pytest.raises(StateError, match="not a remote-copy primary"):
        t.migrate("site-a1:v1", "site-a2:v2")
    t.pair_create("site-a1:v1", "site-b:v3", mode="async")
    t.wait_duplex("site-a1:v1", 60)
    with pytest.raises(UsageError, match="sizes?|same size"):
        t.migrate("site-a1:v1", "site-a2:small")
    with pytest.raises(NotFound):
        t.migrate("site-a1:v1", "site-a2:nope")
    h = nbd_handle(t, "site-a2:v2")
    h.pwrite(b"x" * 4096, 0)
    h.shutdown()
    with pytest.raises(StateError, match="not empty"):
        t.migrate("site-a1:v1", "site-a2:v2")
    st = t.status()
    assert all(v["rw_mode"] == "normal" for v in st["volumes"])
    assert st["migrations"] == []
    assert t.find_pair("site-a1:v1")["state"] == "duplex"


def _wait_phase(t, target, phases, timeout_s=60):
    import time
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            migs = [m for m in t.status()["migrations"] if m["target"] == target]
        except Exception:
            migs = []
        if migs and migs[0]["phase"] in phases:
            return migs[0]
        time.sleep(0.05)
    raise AssertionError(f"migration to {target} never reached {phases}")


def test_consistency_group_moves_together(started):
    t = started
    size = 16 * MiB
    for spec in ("site-a1:v1", "site-a1:v4", "site-a2:v2", "site-a2:v5", "site-b:v3", "site-b:v6"):
        t.volume_create(spec, size)
    t.pair_create("site-a1:v1", "site-b:v3", mode="async", group="g1")
    t.pair_create("site-a1:v4", "site-b:v6", mode="async", group="g1")
    t.wait_duplex("site-a1:v1", 60)
    t.wait_duplex("site-a1:v4", 60)
    h1, h4 = nbd_handle(t, "site-a1:v1"), nbd_handle(t, "site-a1:v4")
    for k in range(40):
        (h1 if k % 2 else h4).pwrite(os.urandom(BLOCK), k * BLOCK)
    h1.shutdown()
    h4.shutdown()
    with pytest.raises(UsageError, match="--group g1"):
        t.migrate("site-a1:v1", "site-a2:v2")
    stored_before = t.find_pair("site-a1:v1")["stored_seq"]
    r = t.migrate("site-a1:v1", "site-a2:v2", group="g1", volume_map={"v4": "v5"})
    assert r["members"] == {"site-a1:v1": "site-a2:v2", "site-a1:v4": "site-a2:v5"}
    h2, h5 = nbd_handle(t, "site-a2:v2"), nbd_handle(t, "site-a2:v5")
    for k in range(10):
        (h2 if k % 2 else h5).pwrite(os.urandom(BLOCK), (100 + k) * BLOCK)
    h2.shutdown()
    h5.shutdown()
    p2, p5 = t.find_pair("site-a2:v2"), t.find_pair("site-a2:v5")
    assert p2["group"] == p5["group"] == "g1"
    assert p2["stored_seq"] == p5["stored_seq"] == stored_before + 10  # one sequence, continued (inv. 11)
    assert t.verify("site-a2:v2", "site-b:v3", timeout_s=60)["identical"]
    assert t.verify("site-a2:v5", "site-b:v6", timeout_s=60)["identical"]


def test_dual_write_keeps_the_source_current(started):
    t = started
    size = 32 * MiB
    for spec in ("site-a1:v1", "site-a2:v2", "site-b:v3"):
        t.volume_create(spec, size)
    t.pair_create("site-a1:v1", "site-b:v3", mode="async")
    t.wait_duplex("site-a1:v1", 60)
    t.vvol_create("app", "site-a1:v1")
    h = vvol_handle(t)
    for r in range(0, size, MiB):
        h.pwrite(os.urandom(BLOCK), r)
    t.migrate("site-a1:v1", "site-a2:v2", dual_write=True, wait=False, rate_limit_bytes_s=4 * MiB)
    _wait_phase(t, "site-a2:v2", ("migrating", "transitional"))
    written = {}
    for k in range(50):
        data = os.urandom(BLOCK)
        h.pwrite(data, (k * 97 % (size // BLOCK)) * BLOCK)
        written[(k * 97 % (size // BLOCK)) * BLOCK] = data
    still = [m for m in t.status()["migrations"] if m["target"] == "site-a2:v2"][0]
    assert still["phase"] in ("migrating", "transitional")  # the writes above were dual-written
    t.wait_migration("site-a2:v2", 120)
    h.shutdown()
    v1 = nbd_handle(t, "site-a1:v1")
    for off, data in written.items():
        assert v1.pread(BLOCK, off) == data
    v1.shutdown()
    assert t.verify("site-a2:v2", "site-b:v3", timeout_s=60)["identical"]


def test_target_node_killed_mid_migration_resumes(started):
    import signal
    from replicator import process
    t = started
    size = 32 * MiB
    for spec in ("site-a1:v1", "site-a2:v2", "site-b:v3"):
        t.volume_create(spec, size)
    t.pair_create("site-a1:v1", "site-b:v3", mode="async")
    t.wait_duplex("site-a1:v1", 60)
    t.vvol_create("app", "site-a1:v1")
    h = vvol_handle(t)
    for r in range(0, size, MiB):
        h.pwrite(os.urandom(64 * 1024), r)
    h.shutdown()
    w = Writer(t, size // BLOCK, seed=5)
    w.start()
    t.migrate("site-a1:v1", "site-a2:v2", wait=False, rate_limit_bytes_s=4 * MiB)
    _wait_phase(t, "site-a2:v2", ("migrating",))
    os.kill(process.read_pid(str(t.cluster.node("site-a2").pidfile)), signal.SIGKILL)
    t.node_start("site-a2")  # the vvol's retries bridge the restart
    final = t.wait_migration("site-a2:v2", 120)
    w.stop.set()
    w.join(30)
    assert final["state"] == "done", final.get("error")
    assert not w.errors, w.errors
    w.check()
    assert t.verify("site-a2:v2", "site-b:v3", timeout_s=60)["identical"]


def test_migrating_a_suspended_pair_keeps_its_bitmap(started):
    t = started
    size = 16 * MiB
    for spec in ("site-a1:v1", "site-a2:v2", "site-b:v3"):
        t.volume_create(spec, size)
    t.pair_create("site-a1:v1", "site-b:v3", mode="async")
    t.wait_duplex("site-a1:v1", 60)
    t.pair_command("suspend", "site-a1:v1")
    h = nbd_handle(t, "site-a1:v1")
    h.pwrite(os.urandom(BLOCK), 5 * MiB)
    h.shutdown()
    t.migrate("site-a1:v1", "site-a2:v2")
    p = t.find_pair("site-a2:v2")
    assert p["state"] == "suspended" and p["dirty_bytes"] == 4096  # invariant 20: no lost bits
    t.pair_command("resume", "site-a2:v2")
    t.wait_duplex("site-a2:v2", 60)
    assert t.verify("site-a2:v2", "site-b:v3", timeout_s=60)["identical"]


def test_v2_takes_over_the_pairs_diff_block_size(started):
    """V1's pair tracks 64 KiB blocks, V2 was created with the default 4 KiB: at the handover
    V2 takes the pair's block size with its bits, and the resync sends that one block."""
    t = started
    size = 16 * MiB
    for spec in ("site-a1:v1", "site-a2:v2", "site-b:v3"):
        t.volume_create(spec, size)
    t.pair_create("site-a1:v1", "site-b:v3", mode="sync", diff_block_bytes=64 * 1024)
    t.wait_duplex("site-a1:v1", 60)
    t.pair_command("suspend", "site-a1:v1")
    h = nbd_handle(t, "site-a1:v1")
    h.pwrite(os.urandom(BLOCK), 5 * MiB + 64 * 1024)
    h.shutdown()
    assert t.find_pair("site-a1:v1")["dirty_bytes"] == 64 * 1024
    t.migrate("site-a1:v1", "site-a2:v2")
    p = t.find_pair("site-a2:v2")
    assert p["state"] == "suspended" and p["dirty_bytes"] == 64 * 1024
    before = p["copied_bytes"]
    t.pair_command("resume", "site-a2:v2")
    t.wait_duplex("site-a2:v2", 60)
    assert t.find_pair("site-a2:v2")["copied_bytes"] - before == 64 * 1024
    assert t.verify("site-a2:v2", "site-b:v3", timeout_s=60)["identical"]


def test_group_migration_with_primary_killed_keeps_interleaved_prefix(started):
    """Two volumes of one group migrate together; writes alternate between them; kill -9 of the
    source during the transitional phase: the two secondaries are jointly a prefix."""
    import signal
    import time

    from replicator import checker, process
    t = started
    size, blocks = 8 * MiB, 8 * MiB // BLOCK
    for spec in ("site-a1:v1", "site-a1:v4", "site-a2:v2", "site-a2:v5", "site-b:v3", "site-b:v6"):
        t.volume_create(spec, size)
    t.pair_create("site-a1:v1", "site-b:v3", mode="async", group="g1")
    t.pair_create("site-a1:v4", "site-b:v6", mode="async", group="g1")
    t.wait_duplex("site-a1:v1", 60)
    t.wait_duplex("site-a1:v4", 60)
    t.vvol_create("app1", "site-a1:v1")
    t.vvol_create("app4", "site-a1:v4")
    run_id, records, stop = 77, [], threading.Event()

    def writer():
        hs = [vvol_handle(t, "app1"), vvol_handle(t, "app4")]
        seq = 0
        rnd = random.Random(9)
        try:
            while not stop.is_set():
                seq += 1
                vol, block = seq % 2, rnd.randrange(blocks)
                records.append(checker.Record(seq, vol, block, acked=False))
                hs[vol].pwrite(checker.make_block(run_id, seq, vol, block), block * BLOCK)
                records[-1] = checker.Record(seq, vol, block, acked=True)
        except nbd.Error:
            pass
    th = threading.Thread(target=writer, daemon=True)
    th.start()
    time.sleep(0.5)
    t.migrate("site-a1:v1", "site-a2:v2", group="g1", volume_map={"v4": "v5"}, wait=False,
              rate_limit_bytes_s=2 * MiB)
    sb = process.read_pid(str(t.cluster.node("site-b").pidfile))
    os.kill(sb, signal.SIGSTOP)          # hold V1's backlog so the handover stays transitional
    _wait_phase(t, "site-a2:v2", ("transitional",))
    time.sleep(0.5)
    os.kill(process.read_pid(str(t.cluster.node("site-a1").pidfile)), signal.SIGKILL)
    time.sleep(0.5)
    stop.set()
    th.join(30)
    os.kill(sb, signal.SIGCONT)
    time.sleep(3)                        # let site-b apply whatever it can
    images = {0: nbd_handle(t, "site-b:v3").pread(size, 0), 1: nbd_handle(t, "site-b:v6").pread(size, 0)}
    verdict = checker.analyse(records, images, blocks, run_id=run_id)
    assert verdict.consistent, verdict.problems
    assert sum(r.acked for r in records) > 20
    t.node_start("site-a1")
    assert t.wait_migration("site-a2:v2", 120)["state"] == "done"
    assert t.verify("site-a2:v2", "site-b:v3", timeout_s=60)["identical"]
    assert t.verify("site-a2:v5", "site-b:v6", timeout_s=60)["identical"]


def test_abort_before_handover_restores_everything(started):
    t = started
    size = 8 * MiB
    for spec in ("site-a1:v1", "site-a2:v2", "site-b:v3"):
        t.volume_create(spec, size)
    t.pair_create("site-a1:v1", "site-b:v3", mode="async")
    t.wait_duplex("site-a1:v1", 60)
    t.vvol_create("app", "site-a1:v1")
    t.migrate("site-a1:v1", "site-a2:v2", start=False)       # stopped in THROUGH mode
    h = vvol_handle(t)
    h.pwrite(b"r" * BLOCK, 0)                               # relayed by V2 to V1
    t.abort_migration("site-a1:v1", "site-a2:v2")
    h.pwrite(b"s" * BLOCK, BLOCK)
    h.shutdown()
    st = t.status()
    assert next(v for v in st["vvols"] if v["name"] == "app")["target"] == "site-a1:v1"
    v2 = next(v for v in st["volumes"] if v["name"] == "v2")
    assert v2["rw_mode"] == "normal" and v2["role"] == "simplex"
    assert st["migrations"] == []
    assert t.verify("site-a1:v1", "site-b:v3", timeout_s=60)["identical"]
    t.migrate("site-a1:v1", "site-a2:v2", force=True)          # and it can start again later
    assert t.verify("site-a2:v2", "site-b:v3", timeout_s=60)["identical"]
