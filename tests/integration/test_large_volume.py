"""Issue 14 acceptance: a 1 TiB sparse pair reaches duplex without reading its holes, then
migrates; the bytes copied are reported and near what the volume holds."""
from __future__ import annotations

import os
import random

import pytest

from tests.conftest import nbd_handle

MiB, TiB = 1 << 20, 1 << 40
WRITTEN = 16 * MiB


@pytest.mark.timeout(600)
def test_a_1_tib_sparse_pair_reaches_duplex_and_migrates_copying_only_its_data(started):
    t = started
    for spec in ("site-a1:v1", "site-a2:v2", "site-b:v3"):
        t.volume_create(spec, TiB)
    t.pair_create("site-a1:v1", "site-b:v3", mode="async")
    t.wait_duplex("site-a1:v1", 120)                      # holes only: no region read one by one
    h = nbd_handle(t, "site-a1:v1")
    rnd = random.Random(14)
    for _ in range(WRITTEN // MiB):                        # 16 MiB scattered over the terabyte
        h.pwrite(os.urandom(MiB), rnd.randrange(TiB // MiB) * MiB)
    h.flush()
    h.shutdown()
    r = t.migrate("site-a1:v1", "site-a2:v2", timeout_s=300)
    assert r["state"] == "done", r
    print(f"migrated 1 TiB holding {WRITTEN // MiB} MiB: copied {r['copied_bytes']} bytes, "
          f"{r['zeroed_bytes']} as zeros")
    assert WRITTEN <= r["copied_bytes"] <= 1.1 * WRITTEN + 8 * MiB   # the data, and little more
    assert r["copied_bytes"] + r["zeroed_bytes"] >= TiB              # every region accounted for
    assert t.verify("site-a2:v2", "site-b:v3", timeout_s=300)["identical"]
