"""CPU time of processes and their threads from /proc, bytes a disk wrote from /sys (for scripts/bench
and scripts/profile)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(path: Path | str) -> list[str]:
    """The fields of PATH/stat after the command name (the first is the state)."""
    return Path(path, "stat").read_text().rsplit(")", 1)[1].split()


def cpu_s(path: Path | str) -> float:
    """utime + stime of /proc/PID or /proc/PID/task/TID, in seconds."""
    f = _stat(path)
    return (int(f[11]) + int(f[12])) / TICK


def minor_faults(pid: int) -> int:
    """Minor page faults of /proc/PID so far (each a page of memory touched for the first time)."""
    return int(_stat(f"/proc/{pid}")[7])


def perf_record(pid: int, out: Path, seconds: float) -> subprocess.Popen:
    """``perf record -g`` of ``pid`` into ``out`` for ``seconds`` in the background (wait for it)."""
    return subprocess.Popen(["perf", "record", "-q", "-g", "-p", str(pid), "-o", str(out), "--", "sleep", str(seconds)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def process_cpu_s(pid: int) -> float:
    return cpu_s(f"/proc/{pid}")


def thread_cpu_s(pid: int | str) -> dict[str, float]:
    """CPU seconds per thread name of ``pid`` ("self" for this process; threads of one name summed)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = task.joinpath("comm").read_text().strip()
            out[name] = out.get(name, 0.0) + cpu_s(task)
        except OSError:
            continue
    return out


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every thread of ``pid`` so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in task.joinpath("status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def machine_cpu_s() -> tuple[float, float]:
    """(busy, system) CPU seconds of the whole machine."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = f[:7]
    return (user + nice + system + irq + softirq) / TICK, (system + irq + softirq) / TICK


def disk_written_bytes(path: Path | str) -> int:
    """Bytes the block device holding ``path`` has written since boot (/sys/dev/block/M:m/stat);
    0 if there is no such device (tmpfs, overlay)."""
    dev = os.stat(path).st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    try:
        return int(stat.read_text().split()[6]) * 512
    except (OSError, IndexError, ValueError):
        return 0
