"""What both nbdkit plugins share: capabilities and the exception -> errno table.

Imported into each plugin's module namespace (nbdkit looks callbacks up there).
"""
import contextlib
import errno
import faulthandler
import logging
import os
import signal

import nbdkit  # noqa: E402  (provided by nbdkit's embedded interpreter)

API_VERSION = 2
_stacks = None


def fail(exc):
    """Report ``exc`` to the NBD client with its errno (RcopyError classes carry one), then raise."""
    code = getattr(exc, "errno", None)
    nbdkit.set_error(code if isinstance(code, int) and code > 0 else errno.EIO)
    if not hasattr(exc, "errno"):
        logging.getLogger("rcopy.plugin").exception("request failed")
    raise exc


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def default_export(readonly, is_tls):
    return ""


def can_write(h):
    return True


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    return True  # every connection reaches the same volume file; a flush covers them all


def can_zero(h):
    return True  # WRITE_ZEROES: a punched hole on every replica, replicated without payload


def can_fast_zero(h):
    return True  # a punched hole is never slower than writing the zeros


def can_trim(h):
    return True  # TRIM: the range reads as zeros afterwards on every replica (a thin volume shrinks)


def can_extents(h):
    return True  # NBD block status: the holes of the volume file (a V2 still migrating: see the engine)


def block_status(extents):
    """The engine's (offset, length, hole) runs as nbdkit extents (a hole reads as zeros)."""
    hole = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
    return [(offset, length, hole if is_hole else 0) for offset, length, is_hole in extents]


def setup_logging(path, level="INFO"):
    """Log to ``path``; ``kill -USR1 PID`` appends every thread's Python stack to stacks.log beside it."""
    logging.basicConfig(filename=path, level=getattr(logging, str(level).upper(), logging.INFO),
                        format="%(asctime)s %(threadName)s %(levelname)s %(name)s: %(message)s")
    global _stacks
    _stacks = open(os.path.join(os.path.dirname(path), "stacks.log"), "a")  # kept open for the handler
    faulthandler.register(signal.SIGUSR1, file=_stacks, all_threads=True)


@contextlib.contextmanager
def logged_start(what):
    """Log a start-up failure with its traceback before nbdkit sees it (and exits)."""
    try:
        yield
    except BaseException:
        logging.getLogger("rcopy").exception("%s failed to start", what)
        raise
