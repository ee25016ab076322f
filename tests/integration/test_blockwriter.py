"""Block writer and checker on real files: clean runs, crash snapshots, kill -9, device errors."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from replicator import blockwriter
from replicator.checker import BLOCK_BYTES

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = 256


def _images(d: Path, n: int = 2) -> list[str]:
    paths = [str(d / f"vol{i}.img") for i in range(n)]
    for p in paths:
        Path(p).touch()
    return paths


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replicator.blockwriter", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def _acked_lines(log: Path) -> int:
    return log.read_bytes().count(b"\nA ") if log.exists() else 0


@pytest.fixture
def writer_proc(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, list[str], Path]]:
    """A CLI writer on two files that would run 30 s; killed (by PID) at teardown."""
    devices, log = _images(tmp_path), tmp_path / "write.log"
    args = ["write", "--log", str(log), "--blocks", str(BLOCKS), "--duration", "30"]
    for d in devices:
        args += ["--device", d]
    proc = subprocess.Popen([sys.executable, "-m", "replicator.blockwriter", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while _acked_lines(log) < 500:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "writer made no progress"
            time.sleep(0.02)
        yield proc, devices, log
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


def test_write_then_check_two_files(tmp_path):
    devices, log = _images(tmp_path), str(tmp_path / "write.log")
    summary = blockwriter.write(devices, log, BLOCKS, count=2000, seed=7)
    assert (summary.issued, summary.acked, summary.stop_reason) == (2000, 2000, "count")
    assert all(os.path.getsize(d) == BLOCKS * BLOCK_BYTES for d in devices)
    v = blockwriter.check(devices, log)
    assert v.consistent and v.complete and v.prefix_seq == 2000, v.problems
    assert v.blocks_checked == 2 * BLOCKS and v.blocks_written > BLOCKS


def test_falls_back_without_o_direct(tmp_path, monkeypatch):
    """A file system that refuses O_DIRECT (tmpfs on older kernels) gets buffered I/O."""
    real_open = os.open

    def picky_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(path, flags, *args)

    monkeypatch.setattr(blockwriter.os, "open", picky_open)
    devices, log = _images(tmp_path), str(tmp_path / "write.log")
    summary = blockwriter.write(devices, log, 64, count=300)
    assert summary.acked == 300 and not summary.direct
    assert blockwriter.check(devices, log).complete


def test_new_run_treats_old_blocks_as_initial_content(tmp_path):
    devices, log = _images(tmp_path), str(tmp_path / "write.log")
    blockwriter.write(devices, log, BLOCKS, count=1500)
    summary = blockwriter.write(devices, log, BLOCKS, count=20)
    v = blockwriter.check(devices, log)
    assert v.consistent and v.complete and v.blocks_written <= 20 and v.acked_max == 20
    assert blockwriter.read_log(log).run_id == summary.run_id


def test_stop_event_from_another_thread(tmp_path):
    devices, log = _images(tmp_path), str(tmp_path / "write.log")
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    summary = blockwriter.write(devices, log, BLOCKS, stop_event=stop)
    assert summary.stop_reason == "stopped" and summary.acked > 0
    assert blockwriter.check(devices, log).complete


def test_device_error_stops_cleanly(tmp_path, monkeypatch):
    devices, log = _images(tmp_path), str(tmp_path / "write.log")
    real_pwrite, calls = os.pwrite, [0]

    def dying_pwrite(fd, data, offset):
        calls[0] += 1
        if calls[0] > 100:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(blockwriter.os, "pwrite", dying_pwrite)
    summary = blockwriter.write(devices, log, BLOCKS, count=1000)
    monkeypatch.undo()
    assert (summary.stop_reason, summary.errno_name) == ("device-error", "EIO")
    assert (summary.issued, summary.acked) == (101, 100)
    wlog = blockwriter.read_log(log)
    assert wlog.records[-1].seq == 101 and not wlog.records[-1].acked
    assert wlog.errors[0]["errno"] == errno.EIO
    v = blockwriter.check(devices, log)
    assert v.consistent and v.complete and v.acked_max == 100 and v.issued_max == 101


def test_cli_write_reports_device_error(tmp_path, monkeypatch, capsys):
    devices, log = _images(tmp_path, 1), str(tmp_path / "write.log")

    def gone(*_):
        raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))

    monkeypatch.setattr(blockwriter.os, "pwrite", gone)
    rc = blockwriter.main(["write", "--device", devices[0], "--log", log, "--blocks", "8",
                           "--count", "5"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["errno_name"] == "ENXIO" and out["acked"] == 0


def test_crash_snapshot_mid_run(writer_proc, tmp_path):
    """Freeze the writer, copy its volumes (a point-in-time snapshot), let it run on."""
    proc, devices, log = writer_proc
    os.kill(proc.pid, signal.SIGSTOP)
    os.waitpid(proc.pid, os.WUNTRACED)  # really stopped: any pwrite in flight has finished
    acked_at_snapshot = _acked_lines(log)
    snaps = [str(tmp_path / f"snap{i}.img") for i in range(len(devices))]
    for src, dst in zip(devices, snaps):
        shutil.copyfile(src, dst)
    os.kill(proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while _acked_lines(log) < acked_at_snapshot + 500 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.terminate()
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert json.loads(out)["stop_reason"] == "stopped"

    args = ["--log", str(log)] + [a for s in snaps for a in ("--image", s)]
    res = _cli("check", *args)
    snap = json.loads(res.stdout)
    assert res.returncode == 0 and snap["consistent"], snap["problems"]
    assert acked_at_snapshot <= snap["prefix_seq"] < snap["acked_max"]
    assert _cli("check", "--require-complete", *args).returncode == 1

    final = _cli("check", "--require-complete", "--log", str(log),
                 *[a for d in devices for a in ("--image", d)])
    assert final.returncode == 0, final.stdout


def test_kill_9_writer_keeps_every_acked_write(writer_proc):
    proc, devices, log = writer_proc
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    v = blockwriter.check(devices, str(log))
    assert v.consistent and v.complete and v.acked_max >= 500, v.problems
    assert v.issued_max - v.acked_max in (0, 1)


def test_cli_check_finds_a_torn_block(tmp_path):
    devices, log = _images(tmp_path), str(tmp_path / "write.log")
    blockwriter.write(devices, log, BLOCKS, count=500)
    wlog = blockwriter.read_log(log)
    victim = wlog.records[-1]
    with open(devices[victim.volume], "r+b") as f:
        f.seek(victim.block * BLOCK_BYTES + 1234)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    res = _cli("check", "--log", log, "--image", devices[0], "--image", devices[1])
    out = json.loads(res.stdout)
    assert res.returncode == 1 and not out["consistent"] and not out["ok"]
    assert out["torn_blocks"] == [[victim.volume, victim.block]]


def test_cli_usage_errors(tmp_path):
    devices, log = _images(tmp_path), str(tmp_path / "write.log")
    blockwriter.write(devices, log, 8, count=10)
    res = _cli("check", "--log", log, "--image", devices[0])
    assert res.returncode == 2 and res.stderr.startswith("rcopy: error: the log covers 2")
    res = _cli("write", "--device", str(tmp_path / "missing"), "--log", log, "--blocks", "8",
               "--count", "1")
    assert res.returncode == 2 and "rcopy: error:" in res.stderr and "Traceback" not in res.stderr
