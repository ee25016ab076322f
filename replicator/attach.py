"""Attach a virtual volume as a local block device, and detach it.

Where the kernel has the nbd module, ``nbd-client`` gives ``/dev/nbdN`` (Unix
socket or TCP exports without TLS; a request the server does not answer within
``NBD_CLIENT_TIMEOUT_S`` fails with EIO instead of hanging the host). Where it
has not (these machines), or for TLS exports, ``nbdfuse`` exposes the export as a file on a FUSE
mount and ``losetup --direct-io=on`` turns that file into ``/dev/loopN`` (direct
I/O: about 3x the IOPS of a buffered loop device here). Each attachment is
recorded in ``WORKDIR/attach/NAME.json`` so ``detach`` can undo exactly it; only
PIDs we started are ever signalled.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from . import process
from .errors import RcopyError, StateError


def _record_path(workdir: Path, name: str) -> Path:
    return Path(workdir) / "attach" / f"{name}.json"


def _run(*args: str, timeout: float = 60) -> str:
    try:
        r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RcopyError(f"{args[0]} failed: {exc}") from None
    if r.returncode != 0:
        raise RcopyError(f"{' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


NBD_CLIENT_TIMEOUT_S = 60


def kernel_nbd_available() -> bool:
    return Path("/dev/nbd0").exists() and shutil.which("nbd-client") is not None


def attach(name: str, uri: str, workdir: Path) -> str:
    """Make export ``name`` (libnbd ``uri``) a block device; return its path."""
    workdir = Path(workdir)
    rec_path = _record_path(workdir, name)
    if rec_path.exists():
        rec = json.loads(rec_path.read_text())
        raise StateError(f"{name} is already attached as {rec.get('device')} (rcopy detach {name})")
    rec_path.parent.mkdir(parents=True, exist_ok=True)
    rec: dict[str, Any] = {"name": name, "uri": uri}
    try:
        server = _nbd_client_server(uri) if kernel_nbd_available() else None
        if server is not None:
            rec["method"] = "nbd-client"
            rec["device"] = _attach_nbd_client(name, server)
        else:
            rec["method"] = "nbdfuse"
            _attach_nbdfuse(name, uri, workdir, rec)
    except BaseException:
        _undo(rec)
        raise
    rec_path.write_text(json.dumps(rec, indent=1))
    return rec["device"]


def _nbd_client_server(uri: str) -> list[str] | None:
    """nbd-client's arguments naming the server of ``uri``, or None if it cannot reach it
    (TLS with a PSK: nbd-client only does certificates)."""
    from urllib.parse import urlsplit
    if uri.startswith("nbd+unix://"):
        return ["-unix", uri.split("socket=", 1)[1]]
    if uri.startswith("nbd://"):
        parts = urlsplit(uri)
        return [parts.hostname or "localhost", str(parts.port or 10809)]
    return None


def _attach_nbd_client(name: str, server: list[str]) -> str:
    for i in range(16):
        dev = f"/dev/nbd{i}"
        if not Path(dev).exists():
            break
        if Path(f"/sys/block/nbd{i}/pid").exists():
            continue  # in use
        if server[0] == "-unix":
            args = ["nbd-client", "-N", name, *server, dev]
        else:  # nbd-client HOST PORT DEVICE
            args = ["nbd-client", server[0], server[1], dev, "-N", name]
        _run(*args, "-b", "4096", "-t", str(NBD_CLIENT_TIMEOUT_S))
        return dev
    raise RcopyError("no free /dev/nbdN device")


def _attach_nbdfuse(name: str, uri: str, workdir: Path, rec: dict[str, Any]) -> None:
    mnt = workdir / "attach" / name
    mnt.mkdir(parents=True, exist_ok=True)
    pidfile = workdir / "attach" / f"{name}.nbdfuse.pid"
    pidfile.unlink(missing_ok=True)
    log = open(workdir / "attach" / f"{name}.nbdfuse.log", "ab")
    proc = subprocess.Popen(["nbdfuse", "-C", "4", "-P", str(pidfile), f"{mnt}/disk", *_source_args(uri)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    rec.update(mountpoint=str(mnt), nbdfuse_pid=proc.pid)
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and (mnt / "disk").exists()):
        if proc.poll() is not None:
            raise RcopyError(f"nbdfuse exited ({proc.returncode}); see {workdir}/attach/{name}.nbdfuse.log")
        if time.monotonic() > deadline:
            raise RcopyError("nbdfuse did not become ready within 30 s")
        time.sleep(0.05)
    rec["device"] = _run("losetup", "-f", "--show", "--direct-io=on", str(mnt / "disk"))


def _source_args(uri: str) -> list[str]:
    """nbdfuse's arguments naming the server. nbdfuse 1.14 refuses tls-psk-file in a URI,
    so a TLS export is reached through ``nbdkit -s nbd ... tls=require`` as a subprocess."""
    from urllib.parse import parse_qs, urlsplit
    parts = urlsplit(uri)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    if "tls-psk-file" not in query:
        return [uri]
    where = [f"socket={query['socket']}"] if "socket" in query else [f"hostname={parts.hostname}",
                                                                      f"port={parts.port or 10809}"]
    return ["--command", "nbdkit", "-s", "--exit-with-parent", "nbd", *where,
            f"export={parts.path.lstrip('/')}", "tls=require", f"tls-psk={query['tls-psk-file']}",
            f"tls-username={parts.username or 'rcopy'}"]


def detach(name: str, workdir: Path) -> bool:
    """Undo ``attach``; safe to call twice. Returns False if nothing was attached."""
    rec_path = _record_path(Path(workdir), name)
    if not rec_path.exists():
        return False
    _undo(json.loads(rec_path.read_text()))
    rec_path.unlink(missing_ok=True)
    return True


def _undo(rec: dict[str, Any]) -> None:
    dev = rec.get("device")
    if rec.get("method") == "nbd-client" and dev:
        subprocess.run(["nbd-client", "-d", dev], capture_output=True, timeout=60)
        return
    if dev:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)
    mnt = rec.get("mountpoint")
    if mnt and mnt in mounts_under(mnt):  # not os.path.ismount: a dead FUSE mount fails stat
        r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, timeout=60)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=60)
    pid = rec.get("nbdfuse_pid")
    if pid:
        deadline = time.monotonic() + 10
        while process.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.stop_pid(pid, timeout_s=5)
    if mnt:
        try:
            os.rmdir(mnt)
        except OSError:
            pass


def mounts_under(path: str | Path) -> list[str]:
    """Mount points at or below ``path``, deepest first (read from /proc/mounts)."""
    root = str(Path(path)).rstrip("/")
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    points = [f[1].replace("\\040", " ") for f in (line.split() for line in lines) if len(f) > 1]
    return sorted({p for p in points if p == root or p.startswith(root + "/")}, key=len, reverse=True)


def attached(workdir: Path) -> list[dict[str, Any]]:
    """Every attachment recorded under ``workdir``."""
    d = Path(workdir) / "attach"
    out = []
    for p in sorted(d.glob("*.json")) if d.exists() else []:
        try:
            out.append(json.loads(p.read_text()))
        except ValueError:
            out.append({"name": p.stem})
    return out
