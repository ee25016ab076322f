"""``rcopy status --watch``: a live view of the cluster that fits an 80-column terminal.

``render`` turns one ``Terminal.status()`` into screen lines (no I/O); ``run``
redraws them every interval on the terminal's alternate screen until Ctrl-C, then
restores the terminal and returns 0.
"""
from __future__ import annotations

import shutil
import signal
import sys
import time
from datetime import datetime
from typing import Any, Callable, TextIO

from .errors import RcopyError

WIDTH = 80
BAR = 20
_ENTER, _LEAVE = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"  # alternate screen + hidden cursor, and back


def size(n: float) -> str:
    """Bytes in at most 9 characters: ``0 B``, ``4.0 KiB``, ``1023.9 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def bar(fraction: float, width: int = BAR) -> str:
    """``[#####.....]  42%``; rounded down, so 100% means all of it."""
    f = min(max(fraction, 0.0), 1.0)
    filled = int(f * width + 1e-9)
    return f"[{'#' * filled}{'.' * (width - filled)}] {int(f * 100 + 1e-9):3d}%"


def _fit(text: str, n: int) -> str:
    """``text`` left-aligned in exactly ``n`` columns, shortened with ``~`` when too long."""
    return text.ljust(n) if len(text) <= n else text[: n - 1] + "~"


def _packed(items: list[str], indent: str, width: int) -> list[str]:
    """Items side by side, as many as fit on a line."""
    lines, line = [], indent
    for item in items:
        if line.strip() and len(line) + len(item) > width:
            lines.append(line.rstrip())
            line = indent
        line += item + "  "
    return lines + [line.rstrip()] if line.strip() else lines


def _pair_row(primary: str, secondary: str, mode: str, state: str, writes: str, nbytes: str, seconds: str,
              valid: str, arrow: str = ">") -> str:
    return (f"  {_fit(primary, 10)} {arrow} {_fit(secondary, 10)} {_fit(mode, 5)} {_fit(state, 9)} "
            f"{writes:>7} {nbytes:>10} {seconds:>8}  {valid}")


def age(seconds: float) -> str:
    """A lag in at most 7 characters: ``0.0s``, ``999.9s``, ``27.8h``, ``12d``."""
    if seconds < 1000:
        return f"{seconds:.1f}s"
    return f"{seconds / 3600:.1f}h" if seconds < 360000 else f"{seconds / 86400:.0f}d"


def render(st: dict[str, Any], title: str, interval_s: float, now: datetime, width: int = WIDTH) -> list[str]:
    """The screen for one status (``Terminal.status()``); no line is longer than ``width``."""
    right = f"every {interval_s:g}s  {now:%H:%M:%S}"
    room = width - len(right) - 7
    title = title if len(title) <= room else "~" + title[len(title) - room + 1:]  # the end says the most
    lines = [f"rcopy {title}".ljust(width - len(right) - 1) + " " + right, ""]
    daemons = [*st["nodes"], *st.get("vvol_servers", [])]
    lines += _packed([f"{d['name']} {'up' if d['up'] else 'DOWN'}" for d in daemons], "NODES  ", width)
    down = [n["name"] for n in st["nodes"] if not n["up"]]

    header = _pair_row("PRIMARY", "SECONDARY", "MODE", "STATE", "WRITES", "BYTES", "SECONDS", "VALID", arrow=" ")
    lag_at = header.index("WRITES") - 1
    lines += ["", "PAIRS".ljust(lag_at) + " lag ".center(header.index("SECONDS") + 7 - lag_at, "-"), header]
    for p in st["pairs"]:
        valid = str(p["copy_source_valid"])
        lines.append(_pair_row(p["primary"], p["secondary"], p["mode"], p["state"], str(p["lag_writes"]),
                               size(p["lag_bytes"]), age(p.get("lag_seconds", 0.0)),
                               "trans" if valid == "transitional" else valid))
        if p.get("suspend_reason") and p["state"] != "duplex":
            lines.append(f"    {p['suspend_reason']}")
    if not st["pairs"]:
        lines.append("  none")
    if down:
        lines.append(f"  not known: pairs whose primary is on {', '.join(down)} (down)")

    journals = [g for g in st["groups"] if g.get("role") == "source" and g.get("journal_capacity_bytes")]
    if journals:
        lines += ["", "JOURNALS"]
    for g in journals:
        used, cap = g["journal_used_bytes"], g["journal_capacity_bytes"]
        link = "" if g.get("link_up", True) else "  link down"
        lines.append(f"  {_fit(g['node'] + ' ' + g['group'], 14)} {bar(used / cap)}  "
                     f"{size(used)} of {size(cap)}{link}")

    if st["migrations"]:
        lines += ["", "MIGRATIONS"]
    for m in st["migrations"]:
        lines.append(f"  {_fit(m['source'], 10)} > {_fit(m['target'], 10)} {_fit(str(m.get('phase')), 12)} "
                     f"{bar(m.get('migrated_fraction') or 0.0)}")
        detail = (f"    {m['state']}, copy {size(m.get('rate_bytes_s') or 0)}/s, "
                  f"longest host hold {m.get('held_ms_max', 0):g} ms")
        lines.append(detail)
        if m.get("waiting_for"):
            lines.append(f"    waiting for {m['waiting_for']}")
        if m.get("error"):
            lines.append(f"    error: {m['error']}")
    return [line[:width] for line in lines]


def run(status: Callable[[], dict[str, Any]], title: str, interval_s: float, out: TextIO = sys.stdout) -> int:
    """Redraw ``status()`` every ``interval_s`` until Ctrl-C (or SIGTERM); return 0."""
    tty = out.isatty()

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, stop)
    if tty:
        out.write(_ENTER)
    try:
        while True:
            started = time.monotonic()
            cols, rows = shutil.get_terminal_size((WIDTH, 24))
            width = min(cols, WIDTH)
            try:
                lines = render(status(), title, interval_s, datetime.now(), width)
            except RcopyError as exc:
                lines = [f"rcopy {title}"[:width], "", f"status failed: {exc}"[:width]]
            if tty:
                if len(lines) > rows - 1:
                    lines = lines[: rows - 2] + [f"... {len(lines) - rows + 2} more lines"[:width]]
                out.write("\x1b[H" + "".join(line + "\x1b[K\n" for line in lines)
                          + "Ctrl-C to quit"[:width] + "\x1b[K\x1b[J")
            else:
                out.write("\n".join(lines) + "\n\n")
            out.flush()
            time.sleep(max(0.0, interval_s - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass
    finally:
        if tty:
            out.write(_LEAVE)
            out.flush()
        signal.signal(signal.SIGTERM, previous)
    return 0
