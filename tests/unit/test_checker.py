"""Unit tests of the crash-consistency checker (SPEC 7, invariants 12 and 19): no I/O."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from replicator import checker
from replicator.checker import BLOCK_BYTES, Record, analyse, make_block, parse_block
from replicator.errors import IntegrityError

RUN = 0x1234_5678_9ABC_DEF0


def history(n: int, volumes: int = 2, blocks: int = 16, seed: int = 1) -> list[Record]:
    rng = random.Random(seed)
    return [Record(seq, seq % volumes, rng.randrange(blocks)) for seq in range(1, n + 1)]


def apply(log: list[Record], upto: int, volumes: int, blocks: int,
          skip: frozenset[int] | set[int] = frozenset(), run_id: int = RUN) -> dict[int, bytearray]:
    """Images after the writes numbered <= ``upto``, leaving out the seqs in ``skip``."""
    images = {v: bytearray(blocks * BLOCK_BYTES) for v in range(volumes)}
    for r in log:
        if r.seq <= upto and r.seq not in skip:
            put(images, r.volume, r.block, make_block(run_id, r.seq, r.volume, r.block))
    return images


def put(images: dict[int, bytearray], volume: int, block: int, data: bytes) -> None:
    images[volume][block * BLOCK_BYTES:(block + 1) * BLOCK_BYTES] = data


# ---------------------------------------------------------------- block format
def test_block_round_trip():
    buf = make_block(RUN, 42, 1, 7)
    assert len(buf) == BLOCK_BYTES
    assert parse_block(buf) == checker.BlockInfo(RUN, 42, 1, 7, torn=False)
    assert parse_block(memoryview(buf)) == parse_block(buf)
    assert make_block(RUN, 42, 1, 7) == buf  # deterministic
    assert make_block(RUN, 43, 1, 7)[40:] != buf[40:]  # payload differs per write


@pytest.mark.parametrize("content", [bytes(BLOCK_BYTES), random.Random(3).randbytes(BLOCK_BYTES),
                                    make_block(RUN, 1, 0, 0)[:-1], b""])
def test_foreign_or_short_content_is_not_ours(content):
    assert parse_block(content) is None


@pytest.mark.parametrize("offset", [8, 12, 20, 30, 40, 2000, 4091, 4092, 4095])
def test_flipped_byte_is_torn(offset):
    buf = bytearray(make_block(RUN, 5, 0, 3))
    buf[offset] ^= 0x40
    info = parse_block(buf)
    assert info is not None and info.torn


def test_sector_tear_is_torn():
    new, old = make_block(RUN, 9, 0, 3), make_block(RUN, 4, 0, 3)
    for sectors in range(1, 8):
        cut = sectors * 512
        assert parse_block(new[:cut] + old[cut:]).torn
        assert parse_block(old[:cut] + new[cut:]).torn


# ---------------------------------------------------------------- the log
def test_log_round_trip_and_partial_last_line():
    data = (checker.log_header(RUN, ["a", "b"], 16) + checker.log_issued(1, 1, 3)
            + checker.log_acked(1, 1, 3) + checker.log_issued(2, 0, 5)
            + checker.log_error(2, 5, "a: Input/output error") + b"I 3 1")
    wlog = checker.parse_log(data)
    assert (wlog.run_id, wlog.volumes, wlog.blocks, wlog.devices) == (RUN, 2, 16, ["a", "b"])
    assert wlog.records == [Record(1, 1, 3, True), Record(2, 0, 5, False)]
    assert wlog.errors == [{"seq": 2, "errno": 5, "error": "a: Input/output error"}]
    assert wlog.dropped_bytes == 5


@pytest.mark.parametrize("bad", [b"X 1 2 3\n", b"I 1 2\n", b"I one 0 0\n", b"I 0 0 0\n",
                                 b"I 1 0 0\nA 1 0 1\n", b"H {}\n", b"H not json\n", b"H [1]\n"])
def test_log_malformed_lines_are_reported(bad):
    with pytest.raises(IntegrityError, match="write log line"):
        checker.parse_log(checker.log_header(RUN, ["a"], 4) + bad)


def test_log_second_header_is_reported():
    head = checker.log_header(RUN, ["a"], 4)
    with pytest.raises(IntegrityError, match="line 2"):
        checker.parse_log(head + head)


# ---------------------------------------------------------------- analyse
def test_empty_images_with_empty_log():
    v = analyse([], {0: bytes(4 * BLOCK_BYTES)}, 4, run_id=RUN)
    assert v.consistent and v.complete and v.prefix_seq == 0 and v.blocks_checked == 4


def test_prefix_at_every_k_is_consistent():
    log = history(120)
    for k in range(0, 121):
        v = analyse(log, apply(log, k, 2, 16), 16, run_id=RUN)
        assert v.consistent, (k, v.problems)
        assert v.prefix_seq_min <= k <= v.prefix_seq
        assert v.complete == (k == 120)
        assert v.acked_max == v.issued_max == 120 and v.blocks_checked == 32


def test_later_write_without_earlier_one_fails():
    log = history(60)
    k = 30
    images = apply(log, k, 2, 16)
    missing = log[k]  # seq k + 1, not applied
    later = next(r for r in log[k + 1:] if (r.volume, r.block) != (missing.volume, missing.block))
    put(images, later.volume, later.block, make_block(RUN, later.seq, later.volume, later.block))
    v = analyse(log, images, 16, run_id=RUN)
    assert not v.consistent and v.prefix_seq is None and not v.complete
    assert "not a prefix" in v.problems[0] and f"seq {later.seq}" in v.problems[0]


def test_two_volumes_jointly():
    log = history(80)
    front, back = apply(log, 70, 2, 16), apply(log, 40, 2, 16)
    # Each volume alone is a prefix; together (vol 1 ahead of vol 0) they are not.
    assert analyse(log, {0: back[0]}, 16, run_id=RUN).consistent
    assert analyse(log, {1: front[1]}, 16, run_id=RUN).consistent
    mixed = analyse(log, {0: back[0], 1: front[1]}, 16, run_id=RUN)
    assert not mixed.consistent
    assert analyse(log, {0: front[0], 1: front[1]}, 16, run_id=RUN).consistent


def test_torn_block_fails():
    log = history(20, volumes=1, blocks=4)
    images = apply(log, 20, 1, 4)
    images[0][2 * BLOCK_BYTES + 1000] ^= 1
    v = analyse(log, images, 4, run_id=RUN)
    assert not v.consistent and v.torn_blocks == [(0, 2)] and "torn" in v.problems[0]


def test_other_runs_blocks_are_initial_content():
    log = [Record(1, 0, 0), Record(2, 0, 1)]
    images = apply(log, 2, 1, 4)
    put(images, 0, 2, make_block(RUN + 1, 99, 0, 2))  # left by an earlier run
    torn = bytearray(make_block(RUN + 1, 98, 0, 3))
    torn[500] ^= 1
    put(images, 0, 3, bytes(torn))  # an earlier run's torn block, never written by this run
    v = analyse(log, images, 4, run_id=RUN)
    assert v.consistent and v.complete and v.blocks_written == 2
    # Without a run id, a block the log does not know is a violation.
    assert not analyse(log, images, 4).consistent


def test_block_in_the_wrong_place_fails():
    log = [Record(1, 0, 0), Record(2, 1, 0)]
    images = apply(log, 2, 2, 2)
    put(images, 0, 1, make_block(RUN, 1, 0, 0))  # seq 1 copied to block 1 as well
    v = analyse(log, images, 2, run_id=RUN)
    assert not v.consistent and "the log puts it at vol 0 block 0" in v.problems[0]
    images = apply(log, 2, 2, 2)
    put(images, 1, 1, make_block(RUN, 7, 1, 1))
    assert "not in the log" in analyse(log, images, 2, run_id=RUN).problems[0]


def test_issued_not_acked_may_be_present_or_absent():
    log = history(30, volumes=2, blocks=8)
    log[-1] = Record(30, log[-1].volume, log[-1].block, acked=False)  # writer died mid-write
    present = analyse(log, apply(log, 30, 2, 8), 8, run_id=RUN)
    absent = analyse(log, apply(log, 29, 2, 8), 8, run_id=RUN)
    for v in (present, absent):
        assert v.consistent and v.complete and v.acked_max == 29 and v.issued_max == 30
    assert present.prefix_seq_min == 30
    # An unacked write followed by acked ones (deeper queues) may be skipped ...
    log[10] = Record(11, log[10].volume, log[10].block, acked=False)
    assert analyse(log, apply(log, 30, 2, 8, skip={11}), 8, run_id=RUN).consistent
    # ... but if present, everything before it must be too.
    images = apply(log, 5, 2, 8)
    r = log[10]
    put(images, r.volume, r.block, make_block(RUN, r.seq, r.volume, r.block))
    assert not analyse(log, images, 8, run_id=RUN).consistent


def test_behind_is_consistent_but_not_complete():
    log = history(50)
    v = analyse(log, apply(log, 35, 2, 16), 16, run_id=RUN)
    assert v.consistent and not v.complete and v.prefix_seq < 50 and v.acked_max == 50


def test_images_as_callables_and_views():
    log = history(40, volumes=2, blocks=8)
    images = apply(log, 25, 2, 8)
    readers = {0: lambda i: bytes(images[0][i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES]),
               1: memoryview(images[1])}
    assert analyse(log, readers, 8, run_id=RUN) == analyse(log, images, 8, run_id=RUN)


def test_short_image_reads_as_initial_content():
    log = [Record(1, 0, 0, acked=False)]
    v = analyse(log, {0: b""}, 3, run_id=RUN)
    assert v.consistent and v.complete and v.blocks_checked == 3


def test_log_write_outside_checked_blocks_fails():
    v = analyse([Record(1, 0, 9)], {0: bytes(4 * BLOCK_BYTES)}, 4, run_id=RUN)
    assert not v.consistent and "outside" in v.problems[0]


def test_problem_list_is_bounded():
    log = history(10, volumes=1, blocks=64)
    images = {0: bytearray(64 * BLOCK_BYTES)}
    for b in range(64):
        put(images, 0, b, make_block(RUN, 1000 + b, 0, b))
    v = analyse(log, images, 64, run_id=RUN)
    assert v.problem_count == 64 and len(v.problems) == checker.PROBLEMS_LISTED_MAX


# ---------------------------------------------------------------- properties
@st.composite
def histories(draw):
    volumes = draw(st.integers(1, 3))
    blocks = draw(st.integers(1, 5))
    ops = draw(st.lists(st.tuples(st.integers(0, volumes - 1), st.integers(0, blocks - 1),
                                  st.sampled_from([True, True, False])), max_size=30))
    log = [Record(seq, v, b, acked) for seq, (v, b, acked) in enumerate(ops, 1)]
    return volumes, blocks, log


def feasible(log: list[Record], held: dict[tuple[int, int], int]) -> list[int]:
    """Brute force: every K for which each block holds its last write <= K, unacked optional."""
    ks = []
    for k in range(0, len(log) + 1):
        ok = True
        for key, s in held.items():
            if s > k or any(r.acked and s < r.seq <= k and (r.volume, r.block) == key
                            for r in log):
                ok = False
                break
        if ok:
            ks.append(k)
    return ks


@settings(max_examples=200, deadline=None)
@given(histories(), st.data())
def test_property_prefix_images_are_consistent(h, data):
    volumes, blocks, log = h
    k = data.draw(st.integers(0, len(log)))
    skip = {r.seq for r in log if not r.acked and r.seq <= k and data.draw(st.booleans())}
    v = analyse(log, apply(log, k, volumes, blocks, skip), blocks, run_id=RUN)
    assert v.consistent, v.problems
    assert v.prefix_seq_min <= k <= v.prefix_seq
    assert v.complete == (v.prefix_seq >= v.acked_max)


@settings(max_examples=300, deadline=None)
@given(histories(), st.data())
def test_property_matches_brute_force(h, data):
    volumes, blocks, log = h
    picks = data.draw(st.lists(st.integers(0, 40), min_size=volumes * blocks,
                               max_size=volumes * blocks))
    images = apply(log, 0, volumes, blocks)
    held = {}
    for (v, b), pick in zip(((v, b) for v in range(volumes) for b in range(blocks)), picks):
        choices = [0] + [r.seq for r in log if (r.volume, r.block) == (v, b)]
        held[v, b] = s = choices[pick % len(choices)]
        if s:
            put(images, v, b, make_block(RUN, s, v, b))
    ks = feasible(log, held)
    verdict = analyse(log, images, blocks, run_id=RUN)
    assert verdict.consistent == bool(ks)
    if ks:
        assert (verdict.prefix_seq_min, verdict.prefix_seq) == (ks[0], ks[-1])
        acked_max = max((r.seq for r in log if r.acked), default=0)
        assert verdict.complete == (ks[-1] >= acked_max)
