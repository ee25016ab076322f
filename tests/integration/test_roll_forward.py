"""A primary killed between the journal append and the volume write (real files on disk).

The entry may already be applied at the secondary, so at restart the node rolls its journal
forward into the volume: primary and secondary must not differ.
"""
from __future__ import annotations

from replicator import states, wire
from replicator.node import Node

KiB = 1024


def _node(tmp_path) -> Node:
    return Node("site-a1", tmp_path / "state", f"ipc://{tmp_path}/ctl")


def test_restart_rolls_journal_entries_forward_into_the_volume(tmp_path) -> None:
    node = _node(tmp_path)
    node.handle(wire.Message("volume.create", {"name": "v1", "size": 1 << 20}))
    info = node.volumes["v1"].info
    info.remote_copy_flag, info.mode, info.group, info.pair_state = "source", "async", "g", states.DUPLEX
    node.save()
    journal = node._source_group("g").journal
    journal.append("v1", 4 * KiB, b"a" * 4 * KiB)
    journal.append("v1", 4 * KiB, b"b" * 4 * KiB)   # same block again: the later one must win
    journal.append("v1", 64 * KiB, b"c" * 4 * KiB)
    journal.close()                                  # ... and the process dies before the volume writes

    again = _node(tmp_path)
    store = again.volumes["v1"].store
    assert store.read(4 * KiB, 4 * KiB) == b"b" * 4 * KiB
    assert store.read(64 * KiB, 4 * KiB) == b"c" * 4 * KiB
    assert store.read(0, 4 * KiB) == bytes(4 * KiB)


def test_a_migration_source_past_its_handover_is_not_rolled_forward(tmp_path) -> None:
    node = _node(tmp_path)
    node.handle(wire.Message("volume.create", {"name": "v1", "size": 1 << 20}))
    info = node.volumes["v1"].info
    info.remote_copy_flag, info.mode, info.group, info.pair_state = "source", "async", "g", states.DUPLEX
    info.migration = {"frozen": True, "role": "source", "handover_seq": 2}
    node.save()
    journal = node._source_group("g").journal
    journal.append("v1", 0, b"old!" * KiB)           # backlog still being sent to the secondary
    journal.close()
    node.volumes["v1"].store.write(0, b"new!" * KiB)  # a dual write after the handover

    again = _node(tmp_path)
    assert again.volumes["v1"].store.read(0, 4 * KiB) == b"new!" * KiB
