"""RingSpace.fits agrees with placing the records one by one (it only counts, on numbers)."""
from hypothesis import given, settings, strategies as st

from replicator.core.journal_space import RingSpace


def _placed(space: RingSpace, sizes: list[int]) -> int:
    probe = RingSpace(space.capacity, space.head)
    probe.live.extend(space.live)
    n = 0
    for size in sizes:
        where = probe.place(size)
        if where is None:
            break
        probe.add(-1, where[0], size)
        n += 1
    return n


@settings(max_examples=400, deadline=None)
@given(capacity=st.integers(64, 4096), head=st.integers(0, 4095),
       live=st.lists(st.integers(40, 900), max_size=6), sizes=st.lists(st.integers(40, 1200), max_size=12))
def test_fits_counts_what_place_would_place(capacity: int, head: int, live: list[int], sizes: list[int]) -> None:
    space = RingSpace(capacity, head)
    for seq, size in enumerate(live, start=1):
        where = space.place(size)
        if where is None:
            break
        space.add(seq, where[0], size)
    assert space.fits(sizes) == _placed(space, sizes)
