"""Issue 6: the migration timeline (real fio load on an attached virtual volume, a real
migration) and the PNG ``rcopy report`` draws from it."""
from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

from replicator import report, timeline
from tests.conftest import make_pair

MiB = 1 << 20
RCOPY = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "rcopy")


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def test_migration_timeline_and_plot(started, tmp_path):
    t = started
    make_pair(t, 32 * MiB, "async")
    t.volume_create("site-a2:v2", 32 * MiB)
    t.vvol_create("app", "site-a1:v1")
    dev = t.attach("app")
    data, result = timeline.record_migration(t, "site-a1:v1", "site-a2:v2", dev, tmp_path / "logs",
                                             lead_s=1.0, tail_s=1.0, rate_limit_bytes_s=16 * MiB)
    t.detach("app")
    assert result["state"] == "done"
    assert len(data["iops"]) >= 5 and all(v >= 0 for _, v in data["iops"])
    assert data["latency_ms"] and data["events"]["migrate"] < data["events"]["done"]
    phases = [p for p, _, _ in timeline.phase_spans(data["samples"])]
    assert "migrating" in phases and phases[-1] == "done"
    assert data["samples"][-1]["migrated_fraction"] == 1.0
    assert t.verify("site-a2:v2", "site-b:v3", timeout_s=60)["identical"]

    png = report.plot(data, tmp_path / "m.png")
    w, h = png_size(png)
    assert (w, h) == (1100, 900) and png.stat().st_size > 20_000
    # the CLI draws the same timeline from its JSON
    (tmp_path / "t.json").write_text(json.dumps(data))
    r = subprocess.run([RCOPY, "report", str(tmp_path / "t.json"), "--out", str(tmp_path / "cli.png"), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["samples"] == len(data["samples"]) and png_size(tmp_path / "cli.png") == (w, h)
    bad = subprocess.run([RCOPY, "report", str(tmp_path / "missing.json")], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "cannot read timeline" in bad.stderr
