"""diff_bitmap at 4 KiB per bit (issue 14 item 3): what a resync sends, what a restart finds,
what a handover carries, with no process, file or socket (tests/unit/core_harness.py)."""
from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest

from replicator import wire
from replicator.core import effects as E
from replicator.core import tables as T
from replicator.core.bitmap import Bitmap, DiffMap
from replicator.errors import IntegrityError, UsageError
from replicator.sim.scenario import SIM_CONFIG

from .core_harness import Harness
from .test_core import B, finish_copy, migrating_target

MiB, KiB = 1 << 20, 1 << 10
CFG = replace(SIM_CONFIG, region_bytes=MiB, diff_block_bytes=4 * KiB)   # the product's geometry
SIZE = 16 * MiB


def suspended_pair(mode: str = "sync") -> Harness:
    h = Harness("site-a1", cfg=CFG)
    h.ok("volume.create", name="v1", size=SIZE)
    h.request("pair.create", volume="v1", mode=mode, secondary=B)
    h.answer(h.pending("pair.join")[0], wire.ok())
    finish_copy(h)
    h.ok("pair.suspend", volume="v1")
    return h


def scattered_writes(h: Harness, n: int) -> set[int]:
    """``n`` 4 KiB writes at distinct random 4 KiB blocks; their offsets."""
    offsets = {b * 4 * KiB for b in random.Random(14).sample(range(SIZE // (4 * KiB)), n)}
    for i, off in enumerate(sorted(offsets)):
        h.write("v1", off, bytes([1 + i % 250]) * (4 * KiB))
    return offsets


def resync(h: Harness) -> list[E.Call]:
    """Resume and answer the resync; the pair.write calls it made."""
    start = len(h.trace)
    h.request("pair.resume", volume="v1")
    h.answer(h.pending("pair.resync_begin")[0], wire.ok())
    finish_copy(h)
    return [e for e in h.trace[start:] if isinstance(e, E.Call) and e.msg.kind == "pair.write"]


def test_a_resync_after_scattered_4k_writes_sends_those_blocks_not_their_regions() -> None:
    h = suspended_pair()
    n = 100
    offsets = scattered_writes(h, n)
    writes = resync(h)
    sent = sum(len(p) for c in writes for p in c.msg.payloads)
    assert n * 4 * KiB <= sent <= 1.1 * n * 4 * KiB          # not n x 1 MiB (16 MiB here)
    assert h.core.volumes["v1"].copied_bytes == sent          # the initial copy of the empty volume: zeros
    # one message per dirty region, as before: its runs of dirty blocks go together
    regions = {off // MiB for off in offsets}
    assert len(writes) == len(regions)
    got = {}
    for c in writes:
        for (off, length), data in zip(c.msg["extents"], c.msg.payloads):
            for k in range(0, length, 4 * KiB):
                got[off + k] = data[k:k + 4 * KiB]
    assert set(got) == offsets
    image = h.volume_file("v1")
    assert all(got[off] == image[off:off + 4 * KiB] for off in offsets)
    assert h.core.volumes["v1"].diff.count() == 0


def test_a_write_smaller_than_a_block_marks_its_whole_block_and_only_it() -> None:
    h = suspended_pair()
    h.write("v1", 5 * MiB + 4 * KiB + 512, b"x" * 512)
    v = h.core.volumes["v1"]
    assert list(v.diff.ranges()) == [(5 * MiB + 4 * KiB, 4 * KiB)] and v.diff.dirty_bytes() == 4 * KiB
    writes = resync(h)
    assert [c.msg["extents"] for c in writes] == [[[5 * MiB + 4 * KiB, 4 * KiB]]]


def test_the_fine_bitmap_survives_a_restart_from_its_durable_bytes() -> None:
    h = suspended_pair()
    before = len(h.trace)
    offsets = scattered_writes(h, 40)
    # each write persisted the byte of its bit, not the bitmap (512 bytes per 16 MiB here)
    puts = [e for e in h.trace[before:] if isinstance(e, E.BitmapPut) and e.kind == "diff"]
    assert puts and all(len(e.data) == 1 for e in puts)
    v = h.core.volumes["v1"]
    again = Harness("site-a1", boot=h.durable_boot("site-a1#2"), cfg=CFG)
    w = again.core.volumes["v1"]
    assert w.info.diff_block_bytes == 4 * KiB and w.diff.to_bytes() == v.diff.to_bytes()
    assert {off for off, _ in w.diff.ranges()} <= offsets and w.diff.dirty_bytes() == 40 * 4 * KiB
    assert [r for r in range(w.diff.nregions) if w.diff.is_set(r)] == sorted({o // MiB for o in offsets})
    assert w.info.pair_state == T.SUSPENDED


def test_a_bitmap_file_of_another_block_size_is_damaged_and_every_block_is_marked() -> None:
    h = suspended_pair()
    boot = h.durable_boot("site-a1#2")
    boot.bitmaps[("v1", "diff")] = bytes(SIZE // MiB // 8)          # one bit per region: not this pair's
    again = Harness("site-a1", boot=boot, cfg=CFG)
    w = again.core.volumes["v1"]
    assert w.diff.dirty_bytes() == SIZE
    assert any("diff bitmap unreadable" in log.text for log in again.logs)


def test_pair_create_takes_its_block_size_and_refuses_one_that_does_not_divide_a_region() -> None:
    h = Harness("site-a1", cfg=CFG)
    h.ok("volume.create", name="v1", size=SIZE)
    reply = h.request("pair.create", volume="v1", mode="sync", secondary=B, diff_block_bytes=3 * KiB)
    assert reply is not None and reply["error"] == "UsageError"
    h.request("pair.create", volume="v1", mode="sync", secondary=B, diff_block_bytes=64 * KiB)
    h.answer(h.pending("pair.join")[0], wire.ok())
    v = h.core.volumes["v1"]
    assert v.diff.block_bytes == 64 * KiB and v.info.diff_block_bytes == 64 * KiB
    assert any(isinstance(e, E.BitmapCreate) and e.block_bytes == 64 * KiB for e in h.trace)
    finish_copy(h)
    h.ok("pair.suspend", volume="v1")
    h.write("v1", 3 * MiB, b"y" * 4096)
    assert [c.msg["extents"] for c in resync(h)] == [[[3 * MiB, 64 * KiB]]]


def test_v2_takes_the_pairs_block_size_and_bits_from_v1_at_the_handover() -> None:
    v1 = DiffMap(32 * KiB, SIM_CONFIG.region_bytes, 512)             # V1 tracks 512-byte blocks
    v1.set_range(9 * 512, 512)
    h = migrating_target(v1)
    v = h.core.volumes["v2"]
    assert v.diff.block_bytes == 512 and v.info.diff_block_bytes == 512
    assert list(v.diff.ranges()) == [(9 * 512, 512)]
    assert v.info.pair_state == T.SUSPENDED                          # handed over with a block to resync


# ---------------------------------------------------------------------- DiffMap itself
def test_diffmap_runs_clear_only_what_was_sent_and_keep_the_summary() -> None:
    m = DiffMap(4 * MiB + 8 * KiB, MiB, 4 * KiB)
    assert m.nregions == 5 and m.first_set() is None
    m.set_range(MiB + 4 * KiB, 8 * KiB)
    m.set_range(MiB + 64 * KiB, 1)
    m.set_range(4 * MiB + 4 * KiB, 4 * KiB)                             # the short last region
    assert m.first_set() == 1 and m.is_set(1) and not m.is_set(2) and m.first_set(2) == 4
    assert m.runs(1) == [(MiB + 4 * KiB, 8 * KiB), (MiB + 64 * KiB, 4 * KiB)]
    m.clear_ranges(m.runs(1)[:1])
    assert m.is_set(1) and m.runs(1) == [(MiB + 64 * KiB, 4 * KiB)]
    m.clear_ranges(m.runs(1))
    assert not m.is_set(1) and m.first_set() == 4 and m.dirty_bytes() == 4 * KiB
    m.clear_regions(range(4, 5))
    assert m.first_set() is None and m.count() == 0


def test_diffmap_cover_merge_and_packing() -> None:
    activity = Bitmap(8 * MiB, MiB)
    activity.set(3)
    m = DiffMap(8 * MiB, MiB, 4 * KiB)
    change = m.cover(activity)
    assert change is not None and list(m.ranges()) == [(3 * MiB, MiB)] and m.is_set(3)
    other = DiffMap(8 * MiB, MiB, 4 * KiB)
    other.set_range(7 * MiB, 4 * KiB)
    m.merge_packed(other.packed(), 4 * KiB)
    assert list(m.ranges()) == [(3 * MiB, MiB), (7 * MiB, 4 * KiB)] and m.is_set(7)
    with pytest.raises(IntegrityError, match="65536-byte blocks"):
        m.merge(DiffMap(8 * MiB, MiB, 64 * KiB).to_bytes(), 64 * KiB)
    with pytest.raises(IntegrityError):
        m.merge(Bitmap(8 * MiB, MiB).to_bytes(), 4 * KiB)         # the coarse size, mislabelled
    with pytest.raises(UsageError):
        DiffMap(8 * MiB, MiB, 3 * KiB)


def test_a_1_tib_diffmap_stays_small_and_its_initial_copy_walks_regions() -> None:
    t0 = time.perf_counter()
    m = DiffMap(1 << 40, MiB, 4 * KiB)
    assert m.blocks.bits.nbytes + m.summary.bits.nbytes <= 33 * MiB    # 32 MiB of blocks, 128 KiB summary
    change = m.set_all()                                              # pair create: one 32 MiB write
    assert (change.first, change.stop) == (0, 32 * MiB)
    assert m.first_set() == 0 and m.runs(0) == [(0, MiB)] and m.run(0, 256) == 256
    m.clear_regions(range(0, 256))                                     # a run of holes
    assert m.first_set() == 256 and m.dirty_bytes() == (1 << 40) - 256 * MiB
    m.clear_all()
    m.set_range((1 << 40) - 4 * KiB, 4 * KiB)
    assert m.first_set() == m.nregions - 1
    m.load(m.to_bytes())                                               # a restart: one scan
    assert m.first_set() == m.nregions - 1 and m.count() == 1
    assert time.perf_counter() - t0 < 5.0


def test_diffmap_count_and_summary_agree_with_its_bits_after_any_changes() -> None:
    rnd = random.Random(3)
    size, region, blk = 64 * KiB + 1536, 4 * KiB, 512
    m = DiffMap(size, region, blk)
    for _ in range(2000):
        op = rnd.randrange(5)
        offset = rnd.randrange(size)
        length = rnd.randrange(1, min(12 * KiB, size - offset) + 1)
        if op == 0:
            m.set_range(offset, length)
        elif op == 1:
            m.clear_ranges([(offset, length)])
        elif op == 2:
            r = rnd.randrange(m.nregions)
            m.clear_ranges(m.runs(r)[: rnd.randrange(3)])
        elif op == 3:
            first = rnd.randrange(m.nregions)
            m.clear_regions(range(first, rnd.randrange(first, m.nregions + 1)))
        else:
            other = Bitmap(size, region)
            other.set(rnd.randrange(other.nregions))
            m.cover(other)
        assert m.count() == m.blocks.bits.count(1)
        assert [m.is_set(r) for r in range(m.nregions)] == \
            [m.blocks.any_set(r * region, region) for r in range(m.nregions)]
        assert m.run(0, 4) == next((i for i in range(min(4, m.nregions)) if not m.is_set(i)), min(4, m.nregions))
    assert DiffMap(size, region, blk, m.to_bytes()).to_bytes() == m.to_bytes()
