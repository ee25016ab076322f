"""``rcopy report``: draw a migration timeline (timeline.py) as a PNG.

Four panels on one time axis: host IOPS, host latency, replication lag, migrated
fraction; the migration phases are shaded and named across all of them, and the
path switch / handover moments are marked with vertical lines.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .timeline import phase_spans

PHASE_COLOURS = {"through": "#d0e1f9", "pending": "#fde2b8", "migrating": "#d5f0d0",
                 "transitional": "#f9d0d0", "done": "#eeeeee", "failed": "#ff9999"}


def plot(timeline: dict[str, Any], png: Path, width_in: float = 11.0) -> Path:
    """Render ``timeline`` to ``png``; returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = timeline["samples"]
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(width_in, 9.0), constrained_layout=True)
    ax_iops, ax_lat, ax_lag, ax_frac = axes
    fig.suptitle(timeline.get("title", "rcopy migration under load"))

    _line(ax_iops, timeline["iops"], "host IOPS", "#1f77b4")
    _line(ax_lat, timeline["latency_ms"], "host latency (ms, mean per interval)", "#ff7f0e")
    ax_lat.set_yscale("log")
    t = [s["t"] for s in samples]
    ax_lag.plot(t, [s["lag_writes"] for s in samples], color="#2ca02c", label="lag (writes)")
    ax_lag.set_ylabel("lag (writes)")
    twin = ax_lag.twinx()
    twin.plot(t, [s["lag_seconds"] for s in samples], color="#9467bd", linestyle="--", label="lag (seconds)")
    twin.set_ylabel("lag (s)")
    ax_lag.legend(handles=[*ax_lag.get_lines(), *twin.get_lines()], loc="upper left", fontsize=8)
    ax_frac.plot(t, [100 * (s["migrated_fraction"] or 0) for s in samples], color="#d62728")
    ax_frac.set_ylabel("migrated (%)")
    ax_frac.set_ylim(-2, 102)
    ax_frac.set_xlabel("seconds since the load started")

    spans = phase_spans(samples)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        for phase, start, end in spans:
            ax.axvspan(start, max(end, start + 0.05), color=PHASE_COLOURS.get(phase, "#f0f0f0"), zorder=0)
        for name, at in timeline.get("events", {}).items():
            ax.axvline(at, color="black", linewidth=0.8, linestyle=":")
    for i, (phase, start, end) in enumerate(spans):  # every other label inside, so short phases stay legible
        ax_iops.annotate(phase, xy=((start + end) / 2, 1.0 if i % 2 == 0 else 0.97),
                         xycoords=("data", "axes fraction"), ha="center",
                         va="bottom" if i % 2 == 0 else "top", fontsize=9)
    for name, at in timeline.get("events", {}).items():
        ax_frac.annotate(name, xy=(at, 0.5), xycoords=("data", "axes fraction"), rotation=90,
                         ha="right", va="center", fontsize=8)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _line(ax: Any, rows: list[list[float]], label: str, colour: str) -> None:
    ax.plot([r[0] for r in rows], [r[1] for r in rows], color=colour, linewidth=1)
    ax.set_ylabel(label if len(label) < 14 else label.split(" (")[0])
    ax.set_title(label, fontsize=9, loc="left")
