"""nbdkit plugin: one storage node; every volume is an export (export name = volume name).

Thin adapter only: config, start the engine after nbdkit forked, forward each
callback to replicator.node.Node, map exceptions to errno in one place.

    nbdkit --unix SOCK python nbd_plugins/storage_node.py name=site-a1 \
        state=/var/lib/rcopy/site-a1 control=tcp://127.0.0.1:7101
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nbdkit  # noqa: E402  (provided by nbdkit's embedded interpreter)
from nbd_plugins.threadstate import keep  # noqa: E402
from nbd_plugins.common import (API_VERSION, block_status, can_extents, can_fast_zero,  # noqa: E402,F401
                                can_fua, can_flush, can_multi_conn, can_trim, can_write, can_zero,
                                default_export, fail,
                                logged_start, setup_logging, thread_model)

_config: dict = {}
_node = None
_FUA = nbdkit.FLAG_FUA


def config(key, value):
    if key not in ("name", "state", "control", "keys", "metrics", "log_level"):
        raise RuntimeError(f"unknown parameter {key!r} (expected name, state, control)")
    _config[key] = value


def config_complete():
    missing = [k for k in ("name", "state", "control") if k not in _config]
    if missing:
        raise RuntimeError(f"missing parameter(s): {', '.join(missing)}")


def after_fork():
    global _node
    from replicator.node import Node
    setup_logging(os.path.join(_config["state"], "node.log"), _config.get("log_level", "INFO"))
    with logged_start(f"node {_config['name']}"):
        _node = Node(_config["name"], _config["state"], _config["control"], _config.get("keys"),
                     _config.get("metrics"))
        _node.start()


def cleanup():
    if _node is not None:
        _node.stop()


def list_exports(readonly, is_tls):
    return _node.export_names() if _node else []


def open(readonly):
    name = nbdkit.export_name()
    try:
        _node.size(name)   # NotFound for a volume that does not exist
    except Exception as exc:
        fail(exc)
    return name


def get_size(h):
    return _node.size(h)


def pread(h, buf, offset, flags):
    keep()
    try:
        buf[:] = _node.read(h, offset, len(buf))
    except Exception as exc:
        fail(exc)


def pwrite(h, buf, offset, flags):
    keep()
    try:
        _node.write(h, buf, offset, flags & _FUA)
    except Exception as exc:
        fail(exc)


def flush(h, flags):
    keep()
    try:
        _node.flush(h)
    except Exception as exc:
        fail(exc)


def trim(h, count, offset, flags):
    """TRIM: the range reads as zeros on every replica afterwards (journaled like a write)."""
    keep()
    try:
        _node.trim(h, count, offset, bool(flags & nbdkit.FLAG_FUA))
    except Exception as exc:
        fail(exc)


def zero(h, count, offset, flags):
    """WRITE_ZEROES (also a fast zero): a punched hole, replicated as a command without payload."""
    keep()
    try:
        _node.zero(h, count, offset, bool(flags & nbdkit.FLAG_FUA))
    except Exception as exc:
        fail(exc)


def extents(h, count, offset, flags):
    """NBD block status: where the volume has holes (read as zeros) and where data."""
    keep()
    try:
        return block_status(_node.extents(h, count, offset))
    except Exception as exc:
        fail(exc)
