"""A consistency group of 16 volumes migrated together while one writer writes across all of them
in one order (issue 14): V3 is a write-order-consistent cut over the 16 at every point checked
during the migration, and holds every acknowledged write once drained."""
from __future__ import annotations

import threading
import time

import pytest

from replicator import blockwriter, process

KiB, MiB = 1 << 10, 1 << 20
N, SIZE = 16, 4 * MiB
BLOCKS = SIZE // 4096


def check_v3(t, log) -> dict:
    """site-b held still: its 16 images judged against the writer's log so far."""
    images = [str(t.cluster.node("site-b").state / "volumes" / f"s{i}.img") for i in range(N)]
    pid = process.read_pid(str(t.cluster.node("site-b").pidfile))
    return blockwriter.check_paused(images, str(log), pid).to_dict()


@pytest.mark.timeout(240)
def test_a_16_volume_group_migrates_under_dependent_writes_and_v3_stays_a_consistent_cut(started, tmp_path):
    t = started
    for i in range(N):
        for spec in (f"site-a1:g{i}", f"site-a2:g{i}", f"site-b:s{i}"):
            t.volume_create(spec, SIZE)
        t.pair_create(f"site-a1:g{i}", f"site-b:s{i}", mode="async", group="cg")
        t.vvol_create(f"app{i}", f"site-a1:g{i}")
    for i in range(N):
        t.wait_duplex(f"site-a1:g{i}", 60)
    uris = [t.cluster.vvol_server().nbd_uri(f"app{i}") for i in range(N)]
    log, stop, done = tmp_path / "writes.log", threading.Event(), {}
    writer = threading.Thread(target=lambda: done.update(
        summary=blockwriter.write(uris, str(log), BLOCKS, seed=14, stop_event=stop)), daemon=True)
    writer.start()
    checks = []
    try:
        time.sleep(1.0)
        t.migrate("site-a1:g0", "site-a2:g0", group="cg", wait=False, rate_limit_bytes_s=4 * MiB)   # per volume, one after the other: ~16 s
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            mig = next(m for m in t.status()["migrations"] if m["target"] == "site-a2:g0")
            verdict = check_v3(t, log)
            checks.append((mig["phase"], verdict["prefix_seq"], verdict["acked_max"]))
            assert verdict["consistent"], (mig["phase"], verdict["problems"])
            if mig["state"] == "done":
                break
            time.sleep(0.7)
    finally:
        stop.set()
        writer.join(30)
    summary = done["summary"]
    assert summary.stop_reason == "stopped", summary
    assert mig["state"] == "done" and len(checks) >= 3, checks
    assert {"transitional", "migrating"} & {phase for phase, _, _ in checks}, checks
    assert checks[-1][1] > checks[0][1] > 0                  # V3 moved on during the migration
    for i in range(N):
        t.wait_drained(f"site-a2:g{i}", f"site-b:s{i}", 60)
    final = check_v3(t, log)
    assert final["consistent"] and final["complete"], final
    assert final["acked_max"] == summary.acked > 500
    print(f"{summary.acked} writes across {N} volumes; checks (phase, V3 prefix, acked): {checks}")
