"""The least an nbdkit Python plugin can do, for scripts/bench's ceiling rows: no rcopy code.

With ``file=IMAGE`` it serves the file with os.pwrite/os.pread; with ``uri=NBD-URI`` it
passes each request on with libnbd (one handle per nbdkit thread). Chaining a ``uri=``
instance in front of a ``file=`` one gives the shape of rcopy's host path (virtual
volume -> storage node): what two embedded-Python hops cost here before any replication.

    nbdkit --unix SOCK python scripts/ceiling/io_only.py file=IMAGE
    nbdkit --unix SOCK2 python scripts/ceiling/io_only.py uri=nbd+unix:///?socket=SOCK

Two knobs measure what Python costs per write (docs/BENCHMARKS.md, "What each microsecond of
Python costs"): ``busy_us=N`` spins N microseconds holding the GIL in each write, and
``gil=keep`` makes a ``file=`` write through replicator/pagecache.py (libc pwrite with the GIL
kept, as rcopy's nodes write) instead of os.pwrite:

    nbdkit --threads 8 --unix SOCK python scripts/ceiling/io_only.py file=IMAGE busy_us=5 gil=keep
"""
import os
import sys
import threading
import time

import nbdkit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nbd_plugins.threadstate import keep as _keep  # noqa: E402  (no rcopy code: nbdkit embedding only)

_KEEP = os.environ.get("RCOPY_KEEP_THREAD_STATE", "1") != "0"

API_VERSION = 2
_config: dict = {}
_fd = -1
_handles: dict = {}  # per OS thread: a threading.local does not survive between nbdkit callbacks


_busy_s = 0.0
_pwrite = os.pwrite


def config(key, value):
    global _busy_s, _pwrite
    if key == "busy_us":
        _busy_s = float(value) / 1e6
    elif key == "gil" and value in ("keep", "release"):
        if value == "keep":
            from replicator import pagecache
            _pwrite = pagecache.pwrite
    elif key in ("file", "uri"):
        _config[key] = value
    else:
        raise RuntimeError(f"unknown parameter {key}={value!r} (expected file=IMAGE or uri=NBD-URI, "
                           f"busy_us=N, gil=keep|release)")


def config_complete():
    if len(_config) != 1:
        raise RuntimeError("give exactly one of file=IMAGE or uri=NBD-URI")


def after_fork():
    global _fd
    if "file" in _config:
        _fd = os.open(_config["file"], os.O_RDWR)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def _target():
    h = _handles.get(threading.get_ident())
    if h is None:
        import nbd
        h = nbd.NBD()
        h.connect_uri(_config["uri"])
        _handles[threading.get_ident()] = h
    return h


def open(readonly):
    return 1


def get_size(h):
    return os.path.getsize(_config["file"]) if _fd >= 0 else _target().get_size()


def can_multi_conn(h):
    return True


def can_flush(h):
    return True


def pread(h, buf, offset, flags):
    if _KEEP:
        _keep()
    buf[:] = os.pread(_fd, len(buf), offset) if _fd >= 0 else _target().pread(len(buf), offset)


def pwrite(h, buf, offset, flags):
    if _KEEP:
        _keep()
    if _busy_s:
        end = time.perf_counter() + _busy_s
        while time.perf_counter() < end:
            pass
    if _fd >= 0:
        _pwrite(_fd, buf, offset)
    else:
        _target().pwrite(buf, offset)


def flush(h, flags):
    if _KEEP:
        _keep()
    if _fd >= 0:
        os.fsync(_fd)
    else:
        _target().flush()
