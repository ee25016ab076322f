"""nbdkit plugin: the virtual-volume server; every virtual volume is an export.

Thin adapter only: config, start the engine after nbdkit forked, forward each
callback to replicator.vvol.VirtualVolumes, map exceptions to errno in one place.

    nbdkit --unix SOCK python nbd_plugins/virtual_volume.py \
        state=/var/lib/rcopy/host control=tcp://127.0.0.1:7201 [keys=DIR]
"""
import errno
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nbdkit  # noqa: E402  (provided by nbdkit's embedded interpreter)

API_VERSION = 2
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


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def after_fork():
    global _engine, _server
    from pathlib import Path

    from replicator.keys import load as load_keys
    from replicator.transport import Server
    from replicator.vvol import VirtualVolumes
    logging.basicConfig(
        filename=os.path.join(_config["state"], "vvol.log"),
        level=getattr(logging, _config.get("log_level", "INFO").upper(), logging.INFO),
        format="%(asctime)s %(threadName)s %(levelname)s %(name)s: %(message)s")
    _engine = VirtualVolumes(Path(_config["state"]))
    keys = load_keys(Path(_config["keys"])) if _config.get("keys") else None
    _server = Server(_config["control"], _engine.handle, keys=keys)
    _server.start()


def cleanup():
    if _server is not None:
        _server.stop()


def _fail(exc):
    code = getattr(exc, "errno", None)
    nbdkit.set_error(code if isinstance(code, int) and code > 0 else errno.EIO)
    if not hasattr(exc, "errno"):
        logging.getLogger("rcopy.plugin").exception("request failed")
    raise exc


def list_exports(readonly, is_tls):
    return sorted(_engine.vvols) if _engine else []


def default_export(readonly, is_tls):
    return ""


def open(readonly):
    try:
        return _engine.get(nbdkit.export_name())
    except Exception as exc:
        _fail(exc)


def get_size(h):
    return h.size


def can_write(h):
    return True


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    return True  # every connection reaches the same node volume; a flush there covers all


def can_zero(h):
    return True


def can_trim(h):
    return True


def pread(h, buf, offset, flags):
    try:
        buf[:] = _engine.pread(h, len(buf), offset)
    except Exception as exc:
        _fail(exc)


def pwrite(h, buf, offset, flags):
    try:
        _engine.pwrite(h, buf, offset, bool(flags & nbdkit.FLAG_FUA))
    except Exception as exc:
        _fail(exc)


def flush(h, flags):
    try:
        _engine.flush(h)
    except Exception as exc:
        _fail(exc)


def zero(h, count, offset, flags):
    try:
        _engine.zero(h, count, offset, bool(flags & nbdkit.FLAG_FUA))
    except Exception as exc:
        _fail(exc)


def trim(h, count, offset, flags):
    """NBD allows a server to ignore TRIM; doing so keeps primary and secondary identical."""
    try:
        _engine.trim(h, count, offset)
    except Exception as exc:
        _fail(exc)
