"""A primary killed between the journal append and the volume write (real files on disk).

The entry may already be applied at the secondary, so at restart the node rolls its journal
forward into the volume: primary and secondary must not differ.
"""
from __future__ import annotations

import json
from pathlib import Path

from journal import Journal
from replicator.core.model import PeerVolume, SourceGroupInfo, SourceMigration, VolumeInfo
from replicator.node import Node

KiB = 1024
SIZE = 1 << 20


def _state(tmp_path: Path, migration: SourceMigration | None = None) -> Path:
    """A node's state directory as a kill -9 left it: an async primary with a journal."""
    state = tmp_path / "state"
    (state / "volumes").mkdir(parents=True)
    info = VolumeInfo("v1", SIZE, remote_copy_flag="source", mode="async", group="g", pair_state="duplex",
                      copy_dest_info=PeerVolume("site-b", "ipc:///nonexistent", "v3"),
                      migration=migration.id if migration else "")
    record = {"version": 2, "volumes": {"v1": info.to_dict()},
              "source_groups": {"g": vars(SourceGroupInfo("g", 64 * KiB))}, "dest_groups": {},
              "migrations": {migration.id: migration.to_dict()} if migration else {}}
    (state / "node.json").write_text(json.dumps(record))
    (state / "volumes" / "v1.img").write_bytes(bytes(SIZE))
    return state


def _node(state: Path, tmp_path: Path) -> Node:
    node = Node("site-a1", state, f"ipc://{tmp_path}/ctl")
    node.start()
    return node


def test_restart_rolls_journal_entries_forward_into_the_volume(tmp_path) -> None:
    state = _state(tmp_path)
    journal = Journal(state / "journals", "g", 64 * KiB)
    journal.append("v1", 4 * KiB, b"a" * 4 * KiB)
    journal.append("v1", 4 * KiB, b"b" * 4 * KiB)   # same block again: the later one must win
    journal.append("v1", 64 * KiB, b"c" * 4 * KiB)
    journal.close()                                  # ... and the process dies before the volume writes
    node = _node(state, tmp_path)
    try:
        assert node.read("v1", 4 * KiB, 4 * KiB) == b"b" * 4 * KiB
        assert node.read("v1", 64 * KiB, 4 * KiB) == b"c" * 4 * KiB
        assert node.read("v1", 0, 4 * KiB) == bytes(4 * KiB)
    finally:
        node.stop()


def test_a_migration_source_past_its_handover_is_not_rolled_forward(tmp_path) -> None:
    frozen = SourceMigration("m", ["v1"], {"v1": PeerVolume("site-a2", "ipc:///x", "v2")}, stage="handed_over",
                             handover_seq=2)
    state = _state(tmp_path, frozen)
    journal = Journal(state / "journals", "g", 64 * KiB)
    journal.append("v1", 0, b"old!" * KiB)           # backlog still being sent to the secondary
    journal.close()
    with open(state / "volumes" / "v1.img", "r+b") as f:
        f.write(b"new!" * KiB)                        # a dual write after the handover
    node = _node(state, tmp_path)
    try:
        assert (state / "volumes" / "v1.img").read_bytes()[:4 * KiB] == b"new!" * KiB
    finally:
        node.stop()
