"""The small state machines of SPEC 3 and 4, as transition tables (no I/O).

* ``pair_state`` of a remote-copy pair: copying / duplex / suspended (SPEC 3).
* ``rw_mode`` of a destination primary V2: through -> pending -> migrating -> normal
  (SPEC 4.12, invariant 9).
* ``copy_source_valid`` of a secondary: 1 -> transitional -> 2 (async) or 1 -> 2 (sync).
An illegal transition raises StateError naming the state it was in.
"""
from __future__ import annotations

from .errors import StateError

COPYING, DUPLEX, SUSPENDED = "copying", "duplex", "suspended"
PAIR_TRANSITIONS: dict[str, set[str]] = {
    COPYING: {DUPLEX, SUSPENDED, COPYING},
    DUPLEX: {SUSPENDED, COPYING},
    SUSPENDED: {COPYING, SUSPENDED},
}

NORMAL, THROUGH, PENDING, MIGRATING = "normal", "through", "pending", "migrating"
RW_TRANSITIONS: dict[str, set[str]] = {
    NORMAL: {THROUGH},          # a fresh target volume enters the migration (S701)
    THROUGH: {PENDING, NORMAL},  # normal: migration aborted before the handover
    PENDING: {MIGRATING, THROUGH},
    MIGRATING: {NORMAL},
}

SOURCE_1, SOURCE_2, TRANSITIONAL = "1", "2", "transitional"
VALID_TRANSITIONS: dict[str, set[str]] = {
    SOURCE_1: {TRANSITIONAL, SOURCE_2},
    TRANSITIONAL: {SOURCE_2, SOURCE_1},
    SOURCE_2: {SOURCE_1},  # after removal the surviving source is renumbered 1
}


def transition(table: dict[str, set[str]], what: str, current: str, new: str) -> str:
    """Return ``new`` if ``current -> new`` is legal in ``table``; else StateError."""
    if new == current and new not in table.get(current, set()):
        return new
    if new not in table.get(current, set()):
        raise StateError(f"{what} cannot go from {current!r} to {new!r}")
    return new


def pair_transition(current: str, new: str) -> str:
    return transition(PAIR_TRANSITIONS, "pair_state", current, new)


def rw_transition(current: str, new: str) -> str:
    return transition(RW_TRANSITIONS, "rw_mode", current, new)


def valid_transition(current: str, new: str) -> str:
    return transition(VALID_TRANSITIONS, "copy_source_valid", current, new)


def source_accepted(copy_source_valid: str, source_index: int) -> bool:
    """May a secondary accept remote-copy data from source entry 1 or 2 (SPEC 4.7)?"""
    if copy_source_valid == TRANSITIONAL:
        return source_index in (1, 2)
    return str(source_index) == copy_source_valid
