"""The ``rcopy status --watch`` screen: fits 80 columns whatever the values, says what is down."""
from __future__ import annotations

from datetime import datetime

from replicator import watch

NOW = datetime(2026, 11, 25, 10, 3, 4)


def status(**over) -> dict:
    st = {"nodes": [{"name": "site-a1", "up": True}, {"name": "site-a2", "up": True},
                    {"name": "site-b", "up": False}],
          "vvol_servers": [{"name": "host", "up": True}],
          "pairs": [{"primary": "site-a1:v1", "secondary": "site-b:v3", "mode": "async", "state": "suspended",
                     "lag_writes": 12345678, "lag_bytes": 5 << 40, "lag_seconds": 123456.7,
                     "copy_source_valid": "transitional", "suspend_reason": "journal full " * 10}],
          "groups": [{"node": "site-a1", "group": "a-long-group-name", "role": "source", "link_up": False,
                      "journal_used_bytes": 255 << 20, "journal_capacity_bytes": 256 << 20},
                     {"node": "site-b", "group": "g0", "role": "dest", "applied": 4}],
          "migrations": [{"source": "site-a1:a-long-volume", "target": "site-a2:v2", "phase": "transitional",
                          "migrated_fraction": 0.426, "state": "running", "rate_bytes_s": 178 << 20,
                          "held_ms_max": 27.7, "waiting_for": "x" * 200, "error": None}]}
    st.update(over)
    return st


def test_every_line_fits_80_columns_and_the_content_is_there():
    lines = watch.render(status(), "/a/very/long/path/to/the/lab/directory/of/somebody/cluster.toml", 2, NOW)
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    text = "\n".join(lines)
    assert lines[0].endswith("every 2s  10:03:04") and "~" in lines[0] and "cluster.toml" in lines[0]
    assert "NODES  site-a1 up  site-a2 up  site-b DOWN  host up" in text
    assert "site-a1:v1 > site-b:v3  async suspended 12345678    5.0 TiB    34.3h  trans" in text
    assert "not known: pairs whose primary is on site-b (down)" in text
    assert "site-a1 a-lon~ [###################.]  99%  255.0 MiB of 256.0 MiB  link down" in text
    assert "site-a1:a~ > site-a2:v2 transitional [########............]  42%" in text


def test_narrow_terminal_and_nothing_running():
    lines = watch.render(status(pairs=[], groups=[], migrations=[]), "c.toml", 0.5, NOW, width=40)
    assert all(len(line) <= 40 for line in lines)
    assert "  none" in lines and not any(line.startswith(("JOURNALS", "MIGRATIONS")) for line in lines)


def test_bar_and_size():
    assert watch.bar(0.0, 10) == "[..........]   0%"
    assert watch.bar(0.5, 10) == "[#####.....]  50%"
    assert watch.bar(1.7, 10) == "[##########] 100%"
    assert [watch.age(s) for s in (0, 999.94, 100000, 10**6)] == ["0.0s", "999.9s", "27.8h", "12d"]
    assert [watch.size(n) for n in (0, 1023, 4096, 5 << 30)] == ["0 B", "1023 B", "4.0 KiB", "5.0 GiB"]
