"""Shared fixtures: a real cluster of nbdkit storage nodes in a temporary directory.

Every fixture tears down what it started (processes by PID, attachments, mounts)
even when the test fails.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from replicator import lab
from replicator.terminal import Terminal


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root (loop devices, FUSE)")
        for item in items:
            if "e2e" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Terminal]:
    """Three storage nodes (site-a1, site-a2, site-b) and a vvol server, not yet started."""
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    (lab_dir / lab.LAB_MARK).write_text("test\n")
    c = lab.make_cluster(lab_dir)
    c.path.write_text(lab.dump(c))
    term = Terminal(c)
    try:
        yield term
    finally:
        lab.down(lab_dir)


@pytest.fixture
def started(cluster: Terminal) -> Terminal:
    for name in ("site-a1", "site-a2", "site-b"):
        cluster.node_start(name)
    return cluster


def nbd_handle(term: Terminal, spec: str):
    """A libnbd handle connected straight to a volume's export."""
    import nbd
    node, vol = spec.split(":")
    h = nbd.NBD()
    h.connect_uri(term.cluster.node(node).nbd_uri(vol))
    return h


def run(*args: str, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, timeout=timeout, capture_output=True, text=True, **kw)


def make_pair(term: Terminal, size: int, mode: str = "sync", primary: str = "site-a1:v1",
              secondary: str = "site-b:v3", **kw) -> None:
    """Create both volumes and a pair between them, and wait until it is duplex."""
    term.volume_create(primary, size)
    term.volume_create(secondary, size)
    term.pair_create(primary, secondary, mode=mode, **kw)
    term.wait_duplex(primary, 120)
