"""Every state variable of rcopy and its transition table (SPEC 3, 4.12; invariants 9, 16).

Each variable changes only through ``go(table, holder, new)``, which checks the
table and raises StateError naming the state it was in. ``tests/unit`` checks that
no other code of the core assigns these attributes.

The migration's phases are one table, ``PHASES``: what V2 does with host I/O in
each phase, what V1 does, and what V3 accepts. Read it before migration.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import StateError


class Table:
    """The legal transitions of one state variable."""

    def __init__(self, name: str, attr: str, transitions: dict[str, tuple[str, ...]]) -> None:
        self.name, self.attr, self.transitions = name, attr, transitions

    def check(self, current: str, new: str) -> str:
        if new not in self.transitions.get(current, ()):
            raise StateError(f"{self.name} cannot go from {current!r} to {new!r}")
        return new


def start_over(table: Table, holder: Any, initial: str) -> None:
    """A pair is created or deleted at this volume: the variable starts at its initial value."""
    setattr(holder, table.attr, initial)


def go(table: Table, holder: Any, new: str) -> bool:
    """Move ``holder``'s variable to ``new`` along ``table``; False if it was there already."""
    current = getattr(holder, table.attr)
    if current == new:
        return False
    setattr(holder, table.attr, table.check(current, new))
    return True


# ---------------------------------------------------------------------- pair_state (source side)
OFF = ""
COPYING, DUPLEX, SUSPENDED = "copying", "duplex", "suspended"
PAIR_STATE = Table("pair_state", "pair_state", {
    OFF: (COPYING, SUSPENDED),              # pair create: the initial copy, or suspended with the async
                                            # group it joins (V2 takes V1's state over: start_over)
    COPYING: (DUPLEX, SUSPENDED, OFF),
    DUPLEX: (SUSPENDED, COPYING, OFF),
    SUSPENDED: (COPYING, OFF),              # resume = differential resync
})
# Suspensions only an operator's resume ends (the automatic resumer leaves them alone).
USER_SUSPEND = "suspended by user"
VERIFY_SUSPEND = "verify found out-of-sync data; rcopy pair resume resyncs it"
HELD_SUSPENSIONS = (USER_SUSPEND, VERIFY_SUSPEND)

# ---------------------------------------------------------------------- rw_mode (a destination primary V2)
NORMAL, THROUGH, PENDING, MIGRATING = "normal", "through", "pending", "migrating"
RW_MODE = Table("rw_mode", "rw_mode", {
    NORMAL: (THROUGH,),                     # S701
    THROUGH: (PENDING, NORMAL),             # S802; normal = aborted before the handover
    PENDING: (MIGRATING, THROUGH),          # S810; through = the handover failed, V1 still primary
    MIGRATING: (NORMAL,),                   # S822
})

# ---------------------------------------------------------------------- copy_source_valid (secondary V3)
SOURCE_1, SOURCE_2, TRANSITIONAL = "1", "2", "transitional"
COPY_SOURCE_VALID = Table("copy_source_valid", "copy_source_valid", {
    SOURCE_1: (TRANSITIONAL, SOURCE_2),     # S807 async / sync
    TRANSITIONAL: (SOURCE_2,),              # S817, only after V1 reported its backlog drained
    SOURCE_2: (SOURCE_1,),                  # S1601: V1 removed, V2 renumbered as the only source
})


def source_accepted(copy_source_valid: str, source_index: int) -> bool:
    """May a secondary accept remote-copy data from source entry 1 or 2 (SPEC 4.7)?"""
    if copy_source_valid == TRANSITIONAL:
        return source_index in (1, 2)
    return str(source_index) == copy_source_valid


# ---------------------------------------------------------------------- a migration at its target (V2)
DONE, FAILED, ABORTED = "done", "failed", "aborted"
PHASE = Table("migration phase", "phase", {
    THROUGH: (PENDING, ABORTED),
    PENDING: (TRANSITIONAL, MIGRATING, THROUGH),
    TRANSITIONAL: (MIGRATING,),
    MIGRATING: (DONE,),
})

RUNNING = "running"
RUN_STATE = Table("migration state", "state", {
    RUNNING: (DONE, FAILED, ABORTED),
    FAILED: (RUNNING, ABORTED),             # rcopy migrate --resume / --abort
})

# ---------------------------------------------------------------------- a migration at its source (V1)
PREPARED, FROZEN, HANDED_OVER, DRAINED, COMPLETE = "prepared", "frozen", "handed_over", "drained", "complete"
SOURCE_STAGE = Table("migration source stage", "stage", {
    PREPARED: (FROZEN,),                    # S901-S906: the handover snapshot was taken
    FROZEN: (HANDED_OVER, PREPARED),        # V2 confirmed it took over; prepared = thawed, it never did
    HANDED_OVER: (DRAINED,),                # S910
    DRAINED: (COMPLETE,),                   # S916
})


@dataclass(frozen=True)
class Phase:
    """One row of the migration table."""

    name: str
    rw_mode: str            # V2's rw_mode
    host_io: str            # what V2 does with a host request
    source: str             # what V1 does
    valid: str              # V3's copy_source_valid
    steps: str              # SPEC steps that lead here


PHASES: tuple[Phase, ...] = (
    Phase(THROUGH, THROUGH, "relays it to V1 and returns V1's answer (V2 keeps no data)",
          "primary: serves relayed and direct requests, replicates to V3", SOURCE_1, "S701-S704"),
    Phase(PENDING, PENDING, "holds it, in arrival order, until the handover is done (bounded; "
          "if V1 does not answer, back to THROUGH and the migration is failed, resumable)",
          "freezes: no new host update, waits for in-flight I/O, hands over pair state, diff bitmap, "
          "counter N0 and journal positions (thawed if V2 never took over)", SOURCE_1, "S801-S806"),
    Phase(TRANSITIONAL, MIGRATING, "serves it locally, fetching unmigrated regions from V1 first; "
          "async writes numbered from N0", "sends its backlog (numbers < N0) to V3, then reports drained",
          TRANSITIONAL, "S807-S811 (async)"),
    Phase(MIGRATING, MIGRATING, "serves it locally, fetching unmigrated regions from V1 first",
          "copies every unmigrated region to V2 (never over a region V2 has), then reports complete",
          SOURCE_2, "S812-S817 (sync: S807)"),
    Phase(DONE, NORMAL, "serves it locally", "holds nothing V2 needs; rcopy remove unregisters it",
          SOURCE_2, "S820-S823"),
)
PHASE_ROWS = {p.name: p for p in PHASES}
