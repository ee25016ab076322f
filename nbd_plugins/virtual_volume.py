"""nbdkit plugin: the virtual-volume server; every virtual volume is an export.

Thin adapter only: config, start the engine after nbdkit forked, forward each
callback to replicator.vvol.VirtualVolumes, map exceptions to errno in one place.

    nbdkit --unix SOCK python nbd_plugins/virtual_volume.py \
        state=/var/lib/rcopy/host control=tcp://127.0.0.1:7201 [keys=DIR]
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
_engine = None
_server = None


def config(key, value):
    if key not in ("state", "control", "keys", "log_level"):
        raise RuntimeError(f"unknown parameter {key!r} (expected state, control, keys)")
    _config[key] = value


def config_complete():
    missing = [k for k in ("state", "control") if k not in _config]
    if missing:
        raise RuntimeError(f"missing parameter(s): {', '.join(missing)}")


def after_fork():
    global _engine, _server
    from pathlib import Path

    from replicator.keys import load as load_keys
    from replicator.transport import HandlerServer
    from replicator.vvol import VirtualVolumes
    setup_logging(os.path.join(_config["state"], "vvol.log"), _config.get("log_level", "INFO"))
    with logged_start("virtual volume server"):
        _engine = VirtualVolumes(Path(_config["state"]))
        keys = load_keys(Path(_config["keys"])) if _config.get("keys") else None
        _server = HandlerServer(_config["control"], _engine.handle, keys=keys)
        _server.start()


def cleanup():
    if _server is not None:
        _server.stop()


def list_exports(readonly, is_tls):
    return sorted(_engine.vvols) if _engine else []


def open(readonly):
    try:
        return _engine.get(nbdkit.export_name())
    except Exception as exc:
        fail(exc)


def get_size(h):
    return h.size


def pread(h, buf, offset, flags):
    keep()
    try:
        buf[:] = _engine.pread(h, len(buf), offset)
    except Exception as exc:
        fail(exc)


def pwrite(h, buf, offset, flags):
    keep()
    try:
        _engine.pwrite(h, buf, offset, bool(flags & nbdkit.FLAG_FUA))
    except Exception as exc:
        fail(exc)


def flush(h, flags):
    keep()
    try:
        _engine.flush(h)
    except Exception as exc:
        fail(exc)


def zero(h, count, offset, flags):
    keep()
    try:
        _engine.zero(h, count, offset, bool(flags & nbdkit.FLAG_FUA))
    except Exception as exc:
        fail(exc)


def trim(h, count, offset, flags):
    """TRIM goes to the volume the virtual volume maps to, like a write."""
    keep()
    try:
        _engine.trim(h, count, offset)
    except Exception as exc:
        fail(exc)


def extents(h, count, offset, flags):
    """NBD block status: where the volume has holes (read as zeros) and where data."""
    keep()
    try:
        return block_status(_engine.extents(h, count, offset))
    except Exception as exc:
        fail(exc)
