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
