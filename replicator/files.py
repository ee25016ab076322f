"""Small durable-file helpers: replace a file atomically, fsync a directory."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_write(path: Path, data: bytes, size: int = 0) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file, never a mix;
    with ``size``, zeros follow up to that size (a sparse tail: nothing written)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if size > len(data):
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
