"""The I/O side of the crash-consistency checker: a QD1 block writer and an image checker.

``write`` fills devices with self-describing blocks (``checker.make_block``) and logs
every write before it starts and after it returns; ``check`` reads the images and
the log and asks ``checker.analyse`` whether the images are a write-order-consistent
prefix (SPEC 7, invariants 12 and 19). Formats are documented in ``checker``.

CLI (``main``)::

    python -m replicator.blockwriter write --device D [--device D2] --log L --blocks N
                                           [--count N | --duration S] [--seed S] [--dsync]
    python -m replicator.blockwriter check --image I [--image I2] --log L [--blocks N]
                                           [--require-complete]

A device may also be an NBD URI (``nbd+unix:///app1?socket=...``): the writer then writes
through libnbd, so a whole consistency group of virtual volumes can be written in one order
without attaching them. Both print JSON. ``write`` exits 0, or 1 if a device error stopped it (the log is
still valid); ``check`` exits 0 if consistent (and complete when required), else 1.
Exit 2 is a usage or I/O error of the tool itself.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import mmap
import os
import random
import secrets
import signal
import stat
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from . import checker, process
from .checker import BLOCK_BYTES, Verdict, WriteLog
from .errors import IntegrityError, RcopyError, UsageError

READ_CHUNK_BYTES = 1 << 20


@dataclass
class WriteSummary:
    """What one writer run did and why it stopped."""

    run_id: int
    devices: list[str]
    blocks: int
    issued: int
    acked: int  # also the last acked seq: writes are acked in order at QD1
    elapsed_s: float
    stop_reason: str  # "count", "duration", "stopped" or "device-error"
    error: str | None
    errno_name: str | None
    direct: bool  # every device was opened with O_DIRECT
    dsync: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _open(path: str, flags: int, direct: bool) -> tuple[int, bool]:
    """Open with O_DIRECT if asked and the file system allows it (tmpfs does not)."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags), False


def _ensure_size(fd: int, path: str, size_bytes: int) -> None:
    """Grow a regular file to ``size_bytes``; refuse a device that is smaller."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        if st.st_size < size_bytes:
            os.ftruncate(fd, size_bytes)
        return
    have = os.lseek(fd, 0, os.SEEK_END)
    if have < size_bytes:
        raise UsageError(f"{path} holds {have} bytes, fewer than the {size_bytes} asked for")


class _NbdTarget:
    """A device given as an NBD URI: writes through libnbd (the FUA flag for ``dsync``)."""

    def __init__(self, uri: str, dsync: bool, size_bytes: int) -> None:
        import nbd
        self.uri, self.h = uri, nbd.NBD()
        self.flags = nbd.CMD_FLAG_FUA if dsync else 0
        try:
            self.h.connect_uri(uri)
        except nbd.Error as e:
            raise RcopyError(f"cannot connect to {uri}: {e.string}") from None
        have = self.h.get_size()
        if have < size_bytes:
            self.close()
            raise UsageError(f"{uri} holds {have} bytes, fewer than the {size_bytes} asked for")

    def pwrite(self, buf: Any, offset: int) -> int:
        import nbd
        try:
            self.h.pwrite(bytes(buf), offset, self.flags)
        except nbd.Error as e:
            raise OSError(e.errno or errno.EIO, e.string) from None
        return len(buf)

    def close(self) -> None:
        self.h.shutdown()


class _FdTarget:
    """A device or file: pwrite on its descriptor."""

    def __init__(self, path: str, flags: int, direct: bool, size_bytes: int) -> None:
        self.fd, self.direct = _open(path, flags, direct)
        try:
            _ensure_size(self.fd, path, size_bytes)
        except BaseException:
            os.close(self.fd)
            raise

    def pwrite(self, buf: Any, offset: int) -> int:
        return os.pwrite(self.fd, buf, offset)

    def close(self) -> None:
        os.close(self.fd)


def _target(path: str, flags: int, direct: bool, dsync: bool, size_bytes: int) -> "_NbdTarget | _FdTarget":
    if path.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")):
        return _NbdTarget(path, dsync, size_bytes)
    return _FdTarget(path, flags, direct, size_bytes)


def _log(fd: int, line: bytes) -> None:
    # One unbuffered write per line to an O_APPEND file: a kill -9 loses nothing written.
    while line:
        line = line[os.write(fd, line):]


def write(devices: Sequence[str], log_path: str, blocks: int, count: int | None = None,
          duration_s: float | None = None, seed: int | None = None, *, dsync: bool = False,
          direct: bool = True, stop_event: threading.Event | None = None) -> WriteSummary:
    """Write random blocks at queue depth 1, volume ``seq % len(devices)``, logging each.

    Stops after ``count`` writes, ``duration_s`` seconds, when ``stop_event`` is set,
    or at the first failed write (recorded in the summary, not raised). The log at
    ``log_path`` is truncated: one log, one run.
    """
    if not devices:
        raise UsageError("give at least one device")
    if blocks < 1:
        raise UsageError(f"blocks must be at least 1, not {blocks}")
    if count is None and duration_s is None and stop_event is None:
        raise UsageError("give a count, a duration or a stop event")
    rng = random.Random(seed)
    run_id = secrets.randbits(64)
    flags = os.O_WRONLY | (os.O_DSYNC if dsync else 0)
    seq = 0
    reason, error, err_no = "stopped", None, None
    with ExitStack() as stack:
        targets = []
        for path in devices:
            target = _target(path, flags, direct, dsync, blocks * BLOCK_BYTES)
            stack.callback(target.close)
            targets.append(target)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        stack.callback(os.close, log_fd)
        buf = stack.enter_context(mmap.mmap(-1, BLOCK_BYTES))  # page-aligned, as O_DIRECT needs
        _log(log_fd, checker.log_header(run_id, list(devices), blocks))
        start = time.monotonic()
        deadline = math.inf if duration_s is None else start + duration_s
        while True:
            if count is not None and seq >= count:
                reason = "count"
                break
            if time.monotonic() >= deadline:
                reason = "duration"
                break
            if stop_event is not None and stop_event.is_set():
                break
            seq += 1
            volume, block = seq % len(targets), rng.randrange(blocks)
            buf[:] = checker.make_block(run_id, seq, volume, block)
            _log(log_fd, checker.log_issued(seq, volume, block))
            try:
                done = targets[volume].pwrite(buf, block * BLOCK_BYTES)
                if done != BLOCK_BYTES:
                    raise OSError(errno.EIO, f"short write of {done} bytes")
            except OSError as e:
                reason, err_no = "device-error", e.errno
                error = f"{devices[volume]}: {e.strerror or e}"
                _log(log_fd, checker.log_error(seq, e.errno, error))
                break
            _log(log_fd, checker.log_acked(seq, volume, block))
        elapsed_s = time.monotonic() - start
    return WriteSummary(
        run_id=run_id, devices=list(devices), blocks=blocks, issued=seq,
        acked=seq - (reason == "device-error"), elapsed_s=round(elapsed_s, 3),
        stop_reason=reason, error=error,
        errno_name=errno.errorcode.get(err_no, str(err_no)) if err_no is not None else None,
        direct=all(getattr(x, "direct", False) for x in targets), dsync=dsync)


def read_log(path: str) -> WriteLog:
    """Read and decode a writer log."""
    with open(path, "rb") as f:
        return checker.parse_log(f.read())


class _FileImage:
    """Block reader over a file or device: reads 1 MiB at a time, O_DIRECT when allowed.

    O_DIRECT keeps a block device's page cache from showing stale data when the
    volume was changed underneath it (by the replicator on another node).
    """

    def __init__(self, path: str, direct: bool = True) -> None:
        self.path = path
        self.fd, self.direct = _open(path, os.O_RDONLY, direct)
        self.buf = mmap.mmap(-1, READ_CHUNK_BYTES)
        self.base_bytes, self.valid_bytes = -1, 0

    def __call__(self, block: int) -> bytes:
        offset = block * BLOCK_BYTES
        start = offset - self.base_bytes
        if self.base_bytes < 0 or not 0 <= start < READ_CHUNK_BYTES:
            self._fill(offset - offset % READ_CHUNK_BYTES)
            start = offset - self.base_bytes
        return self.buf[start:min(start + BLOCK_BYTES, self.valid_bytes)]

    def _fill(self, base_bytes: int) -> None:
        try:
            n = os.preadv(self.fd, [self.buf], base_bytes)
        except OSError as e:
            if not (self.direct and e.errno == errno.EINVAL):
                raise
            os.close(self.fd)
            self.fd, self.direct = _open(self.path, os.O_RDONLY, False)
            n = os.preadv(self.fd, [self.buf], base_bytes)
        self.base_bytes, self.valid_bytes = base_bytes, n

    def close(self) -> None:
        os.close(self.fd)
        self.buf.close()


def check(images: Sequence[str], log_path: str, blocks: int | None = None,
          *, direct: bool = True) -> Verdict:
    """Judge image files or devices (one per volume, in the writer's order) against a log."""
    wlog = read_log(log_path)
    if wlog.run_id is None:
        raise IntegrityError(f"{log_path}: no header line; is it a blockwriter log?")
    if len(images) != wlog.volumes:
        raise UsageError(f"the log covers {wlog.volumes} volume(s); got {len(images)} image(s)")
    blocks = wlog.blocks if blocks is None else blocks
    assert blocks is not None
    with ExitStack() as stack:
        readers: dict[int, checker.Image] = {}
        for volume, path in enumerate(images):
            reader = _FileImage(path, direct)
            stack.callback(reader.close)
            readers[volume] = reader
        return checker.analyse(wlog.records, readers, blocks, run_id=wlog.run_id)


def check_paused(images: Sequence[str], log_path: str, pid: int, blocks: int | None = None) -> Verdict:
    """``check`` while process ``pid`` (the secondary's node) is held still: its images at one
    point of its apply, page cache included, while the writer goes on writing."""
    with process.paused(pid):
        return check(images, log_path, blocks, direct=False)


# ------------------------------------------------------------------ CLI
def _cmd_write(args: argparse.Namespace) -> int:
    stop = threading.Event()
    handled = (signal.SIGINT, signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.signal(s, lambda *_: stop.set()) for s in handled} if in_main else {}
    try:
        summary = write(args.device, args.log, args.blocks, args.count, args.duration, args.seed,
                        dsync=args.dsync, direct=not args.no_direct, stop_event=stop)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    print(json.dumps(summary.to_dict(), indent=2), flush=True)
    return 1 if summary.stop_reason == "device-error" else 0


def _cmd_check(args: argparse.Namespace) -> int:
    verdict = check(args.image, args.log, args.blocks, direct=not args.no_direct)
    ok = verdict.consistent and (verdict.complete or not args.require_complete)
    print(json.dumps({"ok": ok, **verdict.to_dict()}, indent=2), flush=True)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None, prog: str = "python -m replicator.blockwriter") -> int:
    """Run the ``write`` or ``check`` command; returns the exit status."""
    p = argparse.ArgumentParser(prog=prog, description="Write-order consistency checker: "
                                "write self-describing blocks, then check copies of them.")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write random 4 KiB blocks at QD1 and log each write")
    w.add_argument("--device", action="append", required=True,
                   help="a volume: a device, a file or an NBD URI (repeat for more)")
    w.add_argument("--log", required=True, help="write log to create (truncated)")
    w.add_argument("--blocks", type=int, required=True, help="4 KiB blocks used per volume")
    limit = w.add_mutually_exclusive_group()
    limit.add_argument("--count", type=int, help="stop after this many writes")
    limit.add_argument("--duration", type=float, help="stop after this many seconds")
    w.add_argument("--seed", type=int, help="seed for the block choice")
    w.add_argument("--dsync", action="store_true", help="open the devices with O_DSYNC")
    w.add_argument("--no-direct", action="store_true", help="do not use O_DIRECT")
    c = sub.add_parser("check", help="check that images are a write-order-consistent prefix")
    c.add_argument("--image", action="append", required=True,
                   help="image of a volume, in --device order (repeat for more)")
    c.add_argument("--log", required=True, help="the writer's log")
    c.add_argument("--blocks", type=int, help="4 KiB blocks per volume (default: from the log)")
    c.add_argument("--require-complete", action="store_true",
                   help="also require every acknowledged write (sync replication)")
    c.add_argument("--no-direct", action="store_true", help="read through the page cache")
    args = p.parse_args(argv)
    try:
        return _cmd_write(args) if args.command == "write" else _cmd_check(args)
    except (RcopyError, OSError) as e:
        print(f"rcopy: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
