"""Threads with a name the operating system shows too (``top -H``, /proc/PID/task/*/comm, py-spy),
so the CPU of each of a node's threads can be measured (scripts/profile)."""
from __future__ import annotations

import ctypes
import threading
from typing import Callable

_PR_SET_NAME = 15
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the Python name only
    _prctl = None


def name_this_thread(name: str) -> None:
    """Give the calling OS thread ``name`` (at most 15 bytes are kept)."""
    if _prctl is not None:
        _prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def start(target: Callable[[], None], name: str) -> threading.Thread:
    """A started daemon thread running ``target``, named ``name`` in Python and in the OS."""
    def run() -> None:
        name_this_thread(name)
        target()
    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t
