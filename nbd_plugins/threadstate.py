"""Keep a Python thread state on each nbdkit worker thread, instead of one per request.

nbdkit's Python plugin wraps every callback in PyGILState_Ensure/Release. On a thread
Python did not create, Ensure makes a new thread state and Release destroys it again: each
request then pays for a thread state (and the mmap'ed stack chunk its frames need), and with
several threads the page-table churn makes them wait for each other. Measured with fio's nbd
engine on a plugin that only calls os.pwrite (scripts/ceiling/io_only.py): 40k write IOPS with
one nbdkit thread and 20k with eight; with the thread state kept, 83k and 76k.

``keep()`` takes one more PyGILState_Ensure on the calling thread the first time it runs
there, so the count never drops to zero and the state survives between callbacks. A thread
nbdkit ends (a client disconnected) leaves its state behind: ``keep()`` remembers each one
and, every ``SWEEP_EVERY`` new threads, deletes the states of threads that no longer exist
(from another thread, holding the GIL, as CPython does after a fork), so memory stays bounded.
"""
from __future__ import annotations

import ctypes
import os
import threading

SWEEP_EVERY = 64

_api = ctypes.pythonapi
_api.PyThreadState_Get.restype = ctypes.c_void_p
_api.PyThreadState_Clear.argtypes = [ctypes.c_void_p]
_api.PyThreadState_Delete.argtypes = [ctypes.c_void_p]
_mine = threading.local()
_lock = threading.Lock()
_kept: dict[int, list[int]] = {}       # native thread id -> thread states kept for it
_since_sweep = 0


def keep() -> None:
    """Keep the calling thread's Python state after this callback (cheap after the first call)."""
    if getattr(_mine, "kept", False):
        return
    _api.PyGILState_Ensure()
    _mine.kept = True
    global _since_sweep
    with _lock:
        _kept.setdefault(threading.get_native_id(), []).append(_api.PyThreadState_Get())
        _since_sweep += 1
        if _since_sweep >= SWEEP_EVERY:
            _since_sweep = 0
            _sweep()


def _sweep() -> None:
    """Delete the kept states of threads that have ended (called with _lock and the GIL held)."""
    alive = {int(t) for t in os.listdir("/proc/self/task")}
    for tid in [t for t in _kept if t not in alive]:
        for state in _kept.pop(tid):
            _api.PyThreadState_Clear(state)
            _api.PyThreadState_Delete(state)


def kept_states() -> int:
    """How many thread states are kept (for tests)."""
    with _lock:
        return sum(len(v) for v in _kept.values())
