"""The exceptions rcopy raises, one tree users can catch.

    RcopyError
     +-- UsageError          a wrong argument, name or size given by the user
     +-- NotFound            a node, volume, pair or virtual volume that does not exist
     +-- StateError          the request is valid but not in the current state
     +-- NodeUnreachable     a node did not answer in time (down, paused, cut off)
     +-- ProtocolError       a malformed, unauthenticated or unknown message
     +-- IntegrityError      corrupt data on disk (journal, bitmap, management info)
     +-- IOErrorRange        an I/O request outside a volume (NBD maps it to EINVAL)
     +-- ReadOnlyError       a host write to a volume that must not be written (secondary)
     +-- RangeNotStored      a journal pull of a range that is not stored yet (SPEC 5.11)
"""
from __future__ import annotations

import errno


class RcopyError(Exception):
    """Base of every error rcopy reports; its message is meant for the user."""

    errno: int = errno.EIO


class UsageError(RcopyError):
    errno = errno.EINVAL


class NotFound(RcopyError):
    errno = errno.ENOENT


class StateError(RcopyError):
    errno = errno.EBUSY


class NodeUnreachable(RcopyError):
    errno = errno.EIO


class ProtocolError(RcopyError):
    errno = errno.EPROTO


class IntegrityError(RcopyError):
    errno = errno.EIO


class IOErrorRange(RcopyError):
    errno = errno.EINVAL


class ReadOnlyError(RcopyError):
    errno = errno.EROFS


class RangeNotStored(RcopyError):
    errno = errno.ENODATA


#: Name on the wire -> class, so a remote error is raised again as the same class.
BY_NAME: dict[str, type[RcopyError]] = {
    cls.__name__: cls
    for cls in (RcopyError, UsageError, NotFound, StateError, NodeUnreachable,
                ProtocolError, IntegrityError, IOErrorRange, ReadOnlyError, RangeNotStored)
}
