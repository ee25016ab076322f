"""WAN latency for the lab network (``rcopy lab up --netns --wan-delay MS``).

The kernel here has no netem, so with a delay the WAN link is two TUN devices named
``wan0``, one in the switch namespace and one in site-b's, and this process moves every
packet from one to the other after the one-way delay, in order. tbf on the devices still
limits the rate and ``rcopy fault cut`` still takes them down (a packet for a device that is
down is dropped). ``rcopy fault delay --ms N`` rewrites DELAY_FILE; the process rereads it.

    python -m replicator.delaylink NETNS_A NETNS_B DEVICE DELAY_FILE PIDFILE
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import select
import struct
import sys
import time
from collections import deque
from pathlib import Path

QUEUE_BYTES_MAX = 16 << 20   # a router's buffer: beyond this a packet is dropped
RELOAD_EVERY_S = 0.2
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000


class DelayLine:
    """The packets of one direction, each with the time it is due (pure logic)."""

    def __init__(self, delay_s: float = 0.0, max_bytes: int = QUEUE_BYTES_MAX) -> None:
        self.delay_s = delay_s
        self.max_bytes = max_bytes
        self.queue: deque[tuple[float, bytes]] = deque()
        self.bytes = 0
        self.dropped = 0

    def push(self, packet: bytes, now: float) -> bool:
        """Queue ``packet``; False (dropped) when the buffer is full. Never overtakes: a
        shorter delay set meanwhile waits for the packets already queued."""
        if self.bytes + len(packet) > self.max_bytes:
            self.dropped += 1
            return False
        due = now + self.delay_s
        if self.queue:
            due = max(due, self.queue[-1][0])
        self.queue.append((due, packet))
        self.bytes += len(packet)
        return True

    def pop_due(self, now: float) -> list[bytes]:
        out = []
        while self.queue and self.queue[0][0] <= now:
            packet = self.queue.popleft()[1]
            self.bytes -= len(packet)
            out.append(packet)
        return out

    def next_due(self) -> float | None:
        return self.queue[0][0] if self.queue else None


def read_delay_ms(path: Path) -> float:
    try:
        return max(0.0, float(path.read_text().strip() or 0))
    except (OSError, ValueError):
        return 0.0


# ---------------------------------------------------------------------- I/O
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def enter_netns(netns: str) -> None:
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)


def open_tun(netns: str, device: str) -> int:
    """Attach to the TUN device ``device`` of namespace ``netns`` (made by ``ip tuntap add``)."""
    enter_netns(netns)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", device.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def forward(fd_a: int, fd_b: int, delay_file: Path) -> None:
    """Move packets both ways, each after the current delay, until killed."""
    lines = {fd_a: DelayLine(), fd_b: DelayLine()}   # read from fd, to be written to the other
    other = {fd_a: fd_b, fd_b: fd_a}
    poller = select.poll()
    for fd in lines:
        poller.register(fd, select.POLLIN)
    next_reload = 0.0
    while True:
        now = time.monotonic()
        if now >= next_reload:
            delay_s = read_delay_ms(delay_file) / 1000
            for line in lines.values():
                line.delay_s = delay_s
            next_reload = now + RELOAD_EVERY_S
        dues = [d for d in (line.next_due() for line in lines.values()) if d is not None]
        wait_s = min([next_reload - now, *(d - now for d in dues)])
        for fd, _ in poller.poll(max(0, int(wait_s * 1000) + 1)):
            for _ in range(64):
                try:
                    packet = os.read(fd, 65536)
                except OSError:   # nothing more now, or the device went away
                    break
                lines[fd].push(packet, time.monotonic())
        now = time.monotonic()
        for fd, line in lines.items():
            for packet in line.pop_due(now):
                try:
                    os.write(other[fd], packet)
                except OSError:   # the far end is down (rcopy fault cut): the packet is lost
                    pass


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    ns_a, ns_b, device, delay_file, pidfile = argv
    fd_a, fd_b = open_tun(ns_a, device), open_tun(ns_b, device)
    enter_netns(ns_a)  # stay in the lab: lab down finds this process there too
    Path(pidfile).write_text(f"{os.getpid()}\n")
    forward(fd_a, fd_b, Path(delay_file))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
