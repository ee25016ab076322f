"""``rcopy status --watch`` in a real terminal: tmux, 80x24, against real nodes."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from replicator.terminal import Terminal
from tests.conftest import make_pair, nbd_handle

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


class Tmux:
    """A tmux server of our own (its own socket), killed at the end."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", str(self.socket), *args], check=True, capture_output=True,
                              text=True, timeout=30).stdout

    def screen(self) -> list[str]:
        """The visible pane, wrapped lines joined (so a line wider than the pane shows as one)."""
        return self("capture-pane", "-p", "-J", "-t", "watch").rstrip("\n").split("\n")

    def wait_for(self, ok: Callable[[str], bool], what: str, timeout_s: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            lines = self.screen()
            if ok("\n".join(lines)):
                return lines
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} on the screen after {timeout_s:g}s:\n" + "\n".join(lines))
            time.sleep(0.3)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    t = Tmux(tmp_path / "tmux.sock")
    try:
        yield t
    finally:
        subprocess.run(["tmux", "-S", str(t.socket), "kill-server"], capture_output=True, timeout=30)


def test_status_watch_in_an_80_column_terminal(started: Terminal, tmux: Tmux) -> None:
    t = started
    make_pair(t, 32 * MiB, "async", group="g0")
    t.volume_create("site-a2:v2", 32 * MiB)
    h = nbd_handle(t, "site-a1:v1")
    for i in range(64):
        h.pwrite(b"w" * 65536, i * 65536)
    h.shutdown()
    t.wait_drained("site-a1:v1", "site-b:v3", 60)
    # a slow migration, so the screen shows it in progress
    t.migrate("site-a1:v1", "site-a2:v2", wait=False, rate_limit_bytes_s=2 * MiB)
    rcopy = ROOT / ".venv/bin/rcopy"
    tmux("new-session", "-d", "-s", "watch", "-x", "80", "-y", "24",
         f"{rcopy} --cluster {t.cluster.path} status --watch --interval 0.5; echo rcopy-exit=$?; sleep 120")
    screen = tmux.wait_for(lambda s: "MIGRATIONS" in s and "%" in s.split("MIGRATIONS")[1], "migration")
    text = "\n".join(screen)
    print("\n".join(screen))
    assert all(len(line) <= 80 for line in screen), [line for line in screen if len(line) > 80]
    assert "NODES  site-a1 up  site-a2 up  site-b up" in text
    assert "site-a1:v1 > site-b:v3  async duplex" in text
    assert "site-a2:v2" in text.split("MIGRATIONS")[1] and "[" in text.split("MIGRATIONS")[1]
    assert "JOURNALS" in text and "site-a1 g0" in text
    assert tmux("display", "-p", "-t", "watch", "#{alternate_on}").strip() == "1"

    t.node_stop("site-b")
    screen = tmux.wait_for(lambda s: "site-b DOWN" in s, "site-b DOWN")
    print("\n".join(screen))
    assert all(len(line) <= 80 for line in screen)
    assert "not known: pairs whose primary is on site-b (down)" in "\n".join(screen)

    tmux("send-keys", "-t", "watch", "C-c")
    screen = tmux.wait_for(lambda s: "rcopy-exit=" in s, "exit", timeout_s=15)
    assert "rcopy-exit=0" in "\n".join(screen)
    assert "Traceback" not in "\n".join(screen)
    # the terminal is back: main screen, cursor visible
    assert tmux("display", "-p", "-t", "watch", "#{alternate_on} #{cursor_flag}").strip() == "0 1"
