"""Thin volumes (issue 14): NBD block status at the node and through the virtual volume (never a
false hole on a V2 still migrating), and allocated all-zero data copied as zero commands."""
from __future__ import annotations

import json
import os
import subprocess
import time

import nbd
import pytest

from tests.conftest import nbd_handle

KiB, MiB = 1 << 10, 1 << 20
SIZE = 32 * MiB
DATA = [(1 * MiB, 64 * KiB), (5 * MiB, 3 * MiB), (20 * MiB + 4 * KiB, 4 * KiB), (31 * MiB, MiB)]


def nbd_map(uri: str) -> list[tuple[int, int, bool]]:
    """``nbdinfo --map`` of an export: (offset, length, hole) runs."""
    out = subprocess.run(["nbdinfo", "--map", "--json", uri], check=True, capture_output=True, text=True,
                         timeout=60).stdout
    return [(e["offset"], e["length"], e["type"] & 3 == 3) for e in json.loads(out)]


def holes_in(runs: list[tuple[int, int, bool]], offset: int, length: int) -> int:
    """Bytes of [offset, offset+length) that ``runs`` call holes."""
    return sum(max(0, min(o + n, offset + length) - max(o, offset)) for o, n, hole in runs if hole)


def write_data(h) -> None:
    for offset, length in DATA:
        h.pwrite(os.urandom(length), offset)
    h.flush()


def assert_map_matches_data(runs: list[tuple[int, int, bool]]) -> None:
    """Every written range is data; the space between them (beyond their 4 KiB blocks) is hole."""
    assert sum(n for _, n, _ in runs) == SIZE and runs[0][0] == 0
    for offset, length in DATA:
        assert holes_in(runs, offset, length) == 0, (offset, runs)
    assert holes_in(runs, 2 * MiB, 3 * MiB) == 3 * MiB
    assert holes_in(runs, 8 * MiB, 12 * MiB) == 12 * MiB
    assert holes_in(runs, 0, SIZE) >= SIZE - sum(n for _, n in DATA) - 64 * KiB


@pytest.mark.timeout(120)
def test_block_status_shows_holes_and_data_at_the_node_and_through_the_vvol(started):
    t = started
    t.volume_create("site-a1:v1", SIZE)
    t.vvol_create("app", "site-a1:v1")
    node_uri = t.cluster.node("site-a1").nbd_uri("v1")
    vvol_uri = t.cluster.vvol_server().nbd_uri("app")
    assert nbd_map(node_uri) == [(0, SIZE, True)]                # a new volume is one hole
    assert nbd_map(vvol_uri) == [(0, SIZE, True)]
    h = nbd_handle(t, "site-a1:v1")
    write_data(h)
    at_node, through_vvol = nbd_map(node_uri), nbd_map(vvol_uri)
    assert_map_matches_data(at_node)
    assert through_vvol == at_node
    h.trim(3 * MiB, 5 * MiB)                                     # a discard shows as a hole again
    h.shutdown()
    assert holes_in(nbd_map(vvol_uri), 5 * MiB, 3 * MiB) == 3 * MiB


def _wait_mode(t, spec: str, mode: str, timeout_s: float = 60) -> dict:
    node, name = spec.split(":")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        vol = next(v for v in t.status()["volumes"] if v["node"] == node and v["name"] == name)
        if vol["rw_mode"] == mode:
            return vol
        time.sleep(0.05)
    raise AssertionError(f"{spec} never reached {mode}")


@pytest.mark.timeout(180)
def test_a_v2_still_migrating_never_reports_an_unmigrated_region_as_a_hole(started):
    t = started
    for spec in ("site-a1:v1", "site-a2:v2", "site-b:v3"):
        t.volume_create(spec, SIZE)
    t.pair_create("site-a1:v1", "site-b:v3", mode="async")
    t.wait_duplex("site-a1:v1", 60)
    t.vvol_create("app", "site-a1:v1")
    h = nbd_handle(t, "site-a1:v1")
    write_data(h)
    h.shutdown()
    v2_uri = t.cluster.node("site-a2").nbd_uri("v2")
    v2_file = t.cluster.node("site-a2").state / "volumes" / "v2.img"
    # THROUGH: V2 holds nothing yet and asks V1
    t.migrate("site-a1:v1", "site-a2:v2", start=False, rate_limit_bytes_s=MiB)
    assert_map_matches_data(nbd_map(v2_uri))
    # MIGRATING, slowly (1 MiB/s): V2's file still has holes where V1 has data; V2's export never
    # says so (the fixture stops the nodes mid-migration)
    t.continue_migration("site-a2:v2", wait=False)
    _wait_mode(t, "site-a2:v2", "migrating")
    with open(v2_file, "rb") as f:
        unmigrated = [(o, n) for o, n in DATA if _is_hole(f.fileno(), o, n)]
    runs = nbd_map(v2_uri)
    vol = next(v for v in t.status()["volumes"] if v["name"] == "v2")
    assert vol["rw_mode"] == "migrating" and unmigrated, "the copy went too fast to test anything"
    for offset, length in DATA:
        assert holes_in(runs, offset, length) == 0, (offset, runs)
    assert nbd_map(t.cluster.vvol_server().nbd_uri("app")) == runs


def _is_hole(fd: int, offset: int, length: int) -> bool:
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError:
        return True


@pytest.mark.timeout(180)
def test_allocated_all_zero_data_is_copied_as_zero_commands(started):
    """Initial copy, resync and migration send data that is all zero bytes as zero commands."""
    t = started
    for spec in ("site-a1:v1", "site-a2:v2", "site-b:v3"):
        t.volume_create(spec, SIZE)
    h = nbd_handle(t, "site-a1:v1")
    h.pwrite(bytes(8 * MiB), 0)                     # written zeros: allocated, not a hole
    h.pwrite(os.urandom(MiB), 16 * MiB)
    h.flush()
    v1_file = t.cluster.node("site-a1").state / "volumes" / "v1.img"
    assert os.stat(v1_file).st_blocks * 512 >= 9 * MiB
    t.pair_create("site-a1:v1", "site-b:v3", mode="async")
    p = t.wait_duplex("site-a1:v1", 60)
    assert (p["copied_bytes"], p["zeroed_bytes"]) == (MiB, SIZE - MiB)
    t.pair_command("suspend", "site-a1:v1")
    h.pwrite(bytes(2 * MiB), 24 * MiB)              # zeros written while suspended ...
    h.pwrite(os.urandom(64 * KiB), 28 * MiB)        # ... and some data
    h.flush()
    h.shutdown()
    t.pair_command("resume", "site-a1:v1")
    p = t.wait_duplex("site-a1:v1", 60)
    assert (p["copied_bytes"], p["zeroed_bytes"]) == (MiB + 64 * KiB, SIZE - MiB + 2 * MiB)
    v3_file = t.cluster.node("site-b").state / "volumes" / "v3.img"
    assert os.stat(v3_file).st_blocks * 512 <= 2 * MiB   # the zeros are holes at V3
    assert t.verify("site-a1:v1", "site-b:v3", timeout_s=60)["identical"]
    r = t.migrate("site-a1:v1", "site-a2:v2", timeout_s=120)
    assert r["state"] == "done"
    # the data regions (1 MiB each: 16 MiB's and 28 MiB's); the written zeros go as zeros
    assert r["copied_bytes"] == 2 * MiB and r["copied_bytes"] + r["zeroed_bytes"] >= SIZE, r
    assert t.verify("site-a2:v2", "site-b:v3", timeout_s=60)["identical"]
