"""nbdkit plugin: one storage node; every volume is an export (export name = volume name).

Thin adapter only: config, start the engine after nbdkit forked, forward each
callback to replicator.node.Node, map exceptions to errno in one place.

    nbdkit --unix SOCK python nbd_plugins/storage_node.py name=site-a1 \
        state=/var/lib/rcopy/site-a1 control=tcp://127.0.0.1:7101
"""
import errno
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nbdkit  # noqa: E402  (provided by nbdkit's embedded interpreter)

API_VERSION = 2
_config: dict = {}
_node = None


def config(key, value):
    if key not in ("name", "state", "control", "keys", "metrics", "log_level"):
        raise RuntimeError(f"unknown parameter {key!r} (expected name, state, control)")
    _config[key] = value


def config_complete():
    missing = [k for k in ("name", "state", "control") if k not in _config]
    if missing:
        raise RuntimeError(f"missing parameter(s): {', '.join(missing)}")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def after_fork():
    global _node
    sys.setswitchinterval(float(os.environ.get("RCOPY_SWITCH_S", "0.005")))
    from replicator.node import Node
    logging.basicConfig(
        filename=os.path.join(_config["state"], "node.log"),
        level=getattr(logging, _config.get("log_level", "INFO").upper(), logging.INFO),
        format="%(asctime)s %(threadName)s %(levelname)s %(name)s: %(message)s")
    _node = Node(_config["name"], _config["state"], _config["control"], _config.get("keys"),
                 _config.get("metrics"))
    _node.start()


def cleanup():
    if _node is not None:
        _node.stop()


def _fail(exc):
    code = getattr(exc, "errno", None)
    nbdkit.set_error(code if isinstance(code, int) and code > 0 else errno.EIO)
    if not hasattr(exc, "errno"):
        logging.getLogger("rcopy.plugin").exception("request failed")
    raise exc


def list_exports(readonly, is_tls):
    return sorted(_node.volumes) if _node else []


def default_export(readonly, is_tls):
    return ""


def open(readonly):
    try:
        return _node.volume(nbdkit.export_name())
    except Exception as exc:
        _fail(exc)


def get_size(h):
    return h.info.size


def can_write(h):
    return True


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    return True


def can_zero(h):
    return True


def can_trim(h):
    return True


def pread(h, buf, offset, flags):
    try:
        buf[:] = _node.read(h, offset, len(buf))
    except Exception as exc:
        _fail(exc)


def pwrite(h, buf, offset, flags):
    try:
        _node.write(h, buf, offset, bool(flags & nbdkit.FLAG_FUA))
    except Exception as exc:
        _fail(exc)


def flush(h, flags):
    try:
        _node.flush(h)
    except Exception as exc:
        _fail(exc)


def trim(h, count, offset, flags):
    """NBD allows a server to ignore TRIM; doing so keeps primary and secondary identical."""
    try:
        _node.trim(h, count, offset)
    except Exception as exc:
        _fail(exc)
