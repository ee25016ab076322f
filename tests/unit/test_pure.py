"""Unit tests of the pure pieces: wire encoding, region maps, state tables, ordered apply."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from replicator import wire
from replicator.cluster import parse_size, parse_volume
from replicator.core import tables as T
from replicator.core.applier import OrderedApplier
from replicator.core.bitmap import Bitmap
from replicator.errors import IntegrityError, NotFound, ProtocolError, StateError, UsageError


# ---------------------------------------------------------------- wire
def test_wire_round_trip():
    msg = wire.Message("pair.write", {"volume": "v3", "offset": 4096}, [b"x" * 10, b""])
    back = wire.decode(wire.encode(msg))
    assert back == msg


def test_wire_decode_keeps_received_frames_without_a_copy():
    data = memoryview(b"d" * (1 << 20))
    back = wire.decode([memoryview(wire.encode(wire.Message("journal.push", {"n": 1}))[0]), data])
    assert back.fields == {"n": 1} and back.payloads[0] is data


@pytest.mark.parametrize("frames", [
    [], [b""], [b"\x02{}"], [b"\x01not json"], [b"\x01[1,2]"], [b'\x01{"kind": 5}'],
    [b'\x01{"kind": "x", "fields": []}'], [b"\x01\xff\xfe"],
])
def test_wire_rejects_malformed(frames):
    with pytest.raises(ProtocolError):
        wire.decode(frames)


@given(st.lists(st.binary(max_size=64), max_size=5))
@settings(max_examples=300)
def test_wire_fuzz_never_crashes(frames):
    try:
        wire.decode(frames)
    except ProtocolError:
        pass


def test_error_reply_raises_same_class():
    reply = wire.error_reply(NotFound("no volume x"))
    with pytest.raises(NotFound, match="no volume x"):
        wire.raise_if_error(reply)


# ---------------------------------------------------------------- region map
def test_bitmap_ranges_and_changes():
    m = Bitmap(10 << 20, 1 << 20)
    assert m.nregions == 10 and m.count() == 0
    assert m.set_range(1 << 20, 1) is not None
    assert m.set_range((1 << 20) + 5, 10) is None           # nothing changed: nothing to persist
    change = m.set_range((3 << 20) - 1, 2)                  # spans regions 2 and 3
    assert change is not None and (change.first, change.stop) == (0, 1) and m.bytes_at(0, 1) == m.to_bytes()[:1]
    assert list(m.iter_set()) == [1, 2, 3]
    assert m.any_set(2 << 20, 4096) and not m.any_set(5 << 20, 4096)
    m.clear(2)
    again = Bitmap(10 << 20, 1 << 20, m.to_bytes())
    assert list(again.iter_set()) == [1, 3]
    assert m.dirty_bytes() == 2 << 20


def test_bitmap_short_last_region_and_merge():
    m = Bitmap((2 << 20) + 4096, 1 << 20)
    assert m.nregions == 3 and m.extent(2) == (2 << 20, 4096)
    m.set(2)
    assert m.dirty_bytes() == 4096
    other = Bitmap((2 << 20) + 4096, 1 << 20)
    other.set(0)
    m.merge(other.to_bytes())
    assert list(m.iter_set()) == [0, 2]
    with pytest.raises(IntegrityError):
        Bitmap(64 << 20, 1 << 20, b"\x01")


def test_rw_mode_only_moves_forward():
    v = type("V", (), {"rw_mode": T.NORMAL})()
    for nxt in (T.THROUGH, T.PENDING, T.MIGRATING, T.NORMAL):
        T.go(T.RW_MODE, v, nxt)
    v.rw_mode = T.MIGRATING
    with pytest.raises(StateError, match="'migrating'"):
        T.go(T.RW_MODE, v, T.PENDING)
    v.rw_mode = T.NORMAL
    with pytest.raises(StateError):
        T.go(T.RW_MODE, v, T.MIGRATING)


def test_pair_transitions():
    v = type("V", (), {"pair_state": T.COPYING})()
    assert T.go(T.PAIR_STATE, v, T.DUPLEX) and v.pair_state == T.DUPLEX
    v.pair_state = T.SUSPENDED
    with pytest.raises(StateError, match="from 'suspended' to 'duplex'"):
        T.go(T.PAIR_STATE, v, T.DUPLEX)


def test_copy_source_valid():
    assert T.source_accepted("1", 1) and not T.source_accepted("1", 2)
    assert T.source_accepted("transitional", 1) and T.source_accepted("transitional", 2)
    assert T.source_accepted("2", 2) and not T.source_accepted("2", 1)
    assert T.COPY_SOURCE_VALID.check("1", "transitional") == "transitional"
    with pytest.raises(StateError):
        T.COPY_SOURCE_VALID.check("2", "transitional")
    with pytest.raises(StateError):          # invariant 16: V2 alone only after transitional (async)
        T.COPY_SOURCE_VALID.check("transitional", "1")


# ---------------------------------------------------------------- ordered apply
def test_applier_holds_gap_then_releases_in_order():
    a: OrderedApplier[str] = OrderedApplier(last_applied=99)
    a.offer(102, "c", 1)
    a.offer(101, "b", 1)
    assert a.ready() == []  # 100 missing
    a.offer(100, "a", 1)
    run = a.ready()
    assert [s for s, _ in run] == [100, 101, 102]
    a.applied(102)
    assert a.offer(101, "dup", 1) is False
    with pytest.raises(StateError):
        a.applied(50)


@given(st.integers(1, 60), st.randoms())
@settings(max_examples=200)
def test_applier_any_arrival_order_applies_a_prefix(n, rnd):
    """Invariants 12, 13, 18: whatever the arrival order and duplicates, applied output is 1..k in order."""
    a: OrderedApplier[int] = OrderedApplier()
    arrivals = list(range(1, n + 1)) + [rnd.randint(1, n) for _ in range(n // 3)]
    rnd.shuffle(arrivals)
    applied = []
    for seq in arrivals:
        a.offer(seq, seq, 1)
        for s, item in a.ready():
            applied.append(item)
            a.applied(s)
        assert applied == list(range(1, len(applied) + 1))
    assert applied == list(range(1, n + 1))


def test_applier_fig27_policy_stops_before_highest():
    a: OrderedApplier[int] = OrderedApplier(stop_before_highest=True)
    for s in (1, 2, 3):
        a.offer(s, s, 1)
    assert [s for s, _ in a.ready()] == [1, 2]


def test_applier_two_sources_transitional():
    """V1 sends < N0, V2 sends >= N0 interleaved; V2's data waits for V1's backlog (invariant 18)."""
    a: OrderedApplier[str] = OrderedApplier(last_applied=10)
    order = []
    for seq, src in [(14, "v2"), (11, "v1"), (15, "v2"), (12, "v1"), (13, "v1")]:
        a.offer(seq, src, 1)
        for s, item in a.ready():
            order.append((s, item))
            a.applied(s)
    assert order == [(11, "v1"), (12, "v1"), (13, "v1"), (14, "v2"), (15, "v2")]


def test_applier_buffer_bound():
    a: OrderedApplier[int] = OrderedApplier(buffer_bytes_max=10)
    a.offer(5, 5, 8)
    with pytest.raises(StateError):
        a.offer(6, 6, 8)
    a.offer(1, 1, 8)  # the next needed entry is always accepted


# ---------------------------------------------------------------- cluster parsing
@pytest.mark.parametrize("text,value", [("512M", 512 << 20), ("4G", 4 << 30), ("1048576", 1 << 20),
                                        ("1GiB", 1 << 30), ("0.5G", 512 << 20)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1G", "100", "1X"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        parse_size(text)


def test_parse_volume():
    assert parse_volume("site-a1:v1") == ("site-a1", "v1")
    for bad in ("v1", ":v1", "a:", "a:b:c"):
        with pytest.raises(UsageError):
            parse_volume(bad)


def test_every_error_class_maps_to_an_errno():
    """The plugins report exc.errno to NBD clients; every class must carry a real one."""
    import errno as errno_mod

    from replicator import errors
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.RcopyError)]
    assert set(errors.BY_NAME.values()) == set(classes)
    for cls in classes:
        assert cls.errno in errno_mod.errorcode, cls


def test_timeline_phase_spans_and_fio_log(tmp_path):
    from replicator import timeline
    rows = [{"t": 0.0, "phase": None}, {"t": 1.0, "phase": "through"}, {"t": 1.2, "phase": "migrating"},
            {"t": 3.0, "phase": "migrating"}, {"t": 3.2, "phase": "done"}]
    assert timeline.phase_spans(rows) == [("through", 1.0, 1.2), ("migrating", 1.2, 3.2), ("done", 3.2, 3.2)]
    log = tmp_path / "x_iops.1.log"
    log.write_text("200, 1500, 1, 0, 0\n400, 1700, 1, 0, 0\ngarbage\n")
    assert timeline.fio_log(log) == [(0.2, 1500.0), (0.4, 1700.0)]
    built = timeline.build("t", 100.0, [(0.2, 5.0)], [(0.2, 2e6)],
                           [{"time": 101.5, "phase": "migrating", "migrated_fraction": 0.5}], {"migrate": 101.0})
    assert built["latency_ms"] == [[0.2, 2.0]] and built["samples"][0]["t"] == 1.5
    assert built["events"] == {"migrate": 1.0}


# ---------------------------------------------------------------- nbdkit threads per connection
def test_nbdkit_threads_per_kind_of_daemon():
    from replicator.terminal import nbdkit_threads
    assert nbdkit_threads("node", {}) == nbdkit_threads("vvol_server", {}) == 8
    both = {"RCOPY_NBDKIT_THREADS": "4"}
    assert nbdkit_threads("node", both) == nbdkit_threads("vvol_server", both) == 4
    nodes_only = {"RCOPY_NBDKIT_THREADS": "4", "RCOPY_NODE_NBDKIT_THREADS": "1"}
    assert nbdkit_threads("node", nodes_only) == 1 and nbdkit_threads("vvol_server", nodes_only) == 4


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5", "100000", "\u00b2"])
def test_nbdkit_threads_refuses_what_is_not_a_thread_count(raw):
    from replicator.terminal import nbdkit_threads
    with pytest.raises(UsageError, match="RCOPY_NODE_NBDKIT_THREADS"):
        nbdkit_threads("node", {"RCOPY_NODE_NBDKIT_THREADS": raw})
