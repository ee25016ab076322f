"""Start and stop the daemons rcopy runs: nbdkit with one of our plugins.

Processes are tracked by PID files only; nothing is ever killed by name.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Iterator

from .errors import RcopyError, StateError

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGINS = REPO_ROOT / "nbd_plugins"
PIDFILE_WAIT_S = 10.0


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """Hold process ``pid`` still (SIGSTOP) for the block, e.g. to read a secondary's images at one
    point of its apply; SIGCONT however the block ends."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def python_path() -> str:
    """PYTHONPATH that makes rcopy and its dependencies importable inside nbdkit."""
    paths = [str(REPO_ROOT), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    seen: list[str] = []
    for p in paths:
        if p not in seen:
            seen.append(p)
    return os.pathsep.join(seen)


def start_nbdkit(plugin: str, params: dict[str, str], *, socket: str, pidfile: str,
                 logfile: str, threads: int = 8, extra_args: list[str] | None = None,
                 netns: str | None = None) -> int:
    """Start ``nbdkit python nbd_plugins/PLUGIN`` in the background; return its PID.

    ``socket`` is a Unix socket path, or ``host:port`` for TCP. With ``netns``, nbdkit
    runs inside that network namespace (``ip netns exec``).
    """
    Path(pidfile).unlink(missing_ok=True)
    args = ["ip", "netns", "exec", netns] if netns else []
    args += ["nbdkit", "--log=stderr", "--pidfile", pidfile, "--threads", str(threads)]
    if ":" in socket and not socket.startswith("/"):
        host, port = socket.rsplit(":", 1)
        args += ["--ipaddr", host, "--port", port]
    else:
        Path(socket).unlink(missing_ok=True)
        args += ["--unix", socket]
    args += list(extra_args or [])
    args += ["python", str(PLUGINS / plugin)]
    args += [f"{k}={v}" for k, v in params.items()]
    env = dict(os.environ, PYTHONPATH=python_path(), PYTHONUNBUFFERED="1")
    with open(logfile, "ab") as log:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                              env=env, timeout=60)
    if proc.returncode != 0:
        raise RcopyError(f"nbdkit {plugin} failed to start (exit {proc.returncode}); see {logfile}: "
                         + tail(logfile))
    # nbdkit's parent exits right after forking and the child writes the pidfile after it,
    # so on a busy machine the file can appear a moment after the command returned
    deadline = time.monotonic() + PIDFILE_WAIT_S
    while (pid := read_pid(pidfile)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if pid is None:
        raise RcopyError(f"nbdkit {plugin} wrote no pidfile {pidfile} in {PIDFILE_WAIT_S:g} s; see {logfile}")
    return pid


def tail(path: str, lines: int = 5) -> str:
    try:
        return " | ".join(Path(path).read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def read_pid(pidfile: str) -> int | None:
    try:
        return int(Path(pidfile).read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int | None, timeout_s: float = 10.0) -> bool:
    """SIGTERM, wait, then SIGKILL the process ``pid``; True if it was running."""
    if not alive(pid):
        return False
    assert pid is not None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll ``predicate`` until it returns a true value; StateError on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StateError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def python_executable() -> str:
    return sys.executable
