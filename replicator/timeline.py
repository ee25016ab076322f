"""A timeline of a migration under load: what ``rcopy report`` draws.

``Sampler`` polls the two primaries' nodes while a migration runs and records, every
``interval_s``: the migration phase, the migrated fraction and the replication lag.
fio's own logs (``--write_iops_log``/``--write_lat_log``) give host IOPS and latency;
``fio_log`` reads them. ``build`` puts both on one clock (seconds since fio started)
in a plain JSON-able dict; report.py draws it. ``record_migration`` does all of it:
fio on the host's device, the migration, the samples.
"""
from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from .cluster import parse_volume
from .errors import RcopyError
from .terminal import Terminal


class Sampler:
    """Poll migration phase, migrated fraction and lag of ``source`` -> ``target`` in a thread."""

    def __init__(self, term: Terminal, source: str, target: str, interval_s: float = 0.2) -> None:
        self.term, self.source, self.target = term, source, target
        self.interval_s = interval_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rcopy-sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.samples

    def _run(self) -> None:
        nodes = {parse_volume(self.source)[0], parse_volume(self.target)[0]}
        while not self._stop.is_set():
            row: dict[str, Any] = {"time": time.time(), "phase": None, "migrated_fraction": None,
                                   "lag_writes": 0, "lag_bytes": 0, "lag_seconds": 0.0}
            for node in sorted(nodes):
                try:
                    st = self.term.node_request(node, "status", timeout_s=2.0)
                except RcopyError:
                    continue
                for m in st["migrations"]:
                    if m["target"] == self.target:
                        row["phase"] = m["phase"] if m["state"] == "running" else m["state"]
                        row["migrated_fraction"] = m["migrated_fraction"]
                for p in st["pairs"]:
                    if p["primary"] in (self.source, self.target):
                        for key in ("lag_writes", "lag_bytes", "lag_seconds"):
                            row[key] = max(row[key], p.get(key) or 0)
            self.samples.append(row)
            self._stop.wait(self.interval_s)


def fio_log(path: Path) -> list[tuple[float, float]]:
    """(seconds, value) rows of a fio log file (``msec, value, direction, bs, offset``)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 2 and fields[0].isdigit():
            rows.append((int(fields[0]) / 1000.0, float(fields[1])))
    return rows


def build(title: str, fio_start: float, iops: list[tuple[float, float]], lat_ns: list[tuple[float, float]],
          samples: list[dict[str, Any]], events: dict[str, float] | None = None) -> dict[str, Any]:
    """One timeline on fio's clock: seconds since ``fio_start`` (a ``time.time()``)."""
    rows = [{**s, "t": round(s["time"] - fio_start, 3)} for s in samples]
    for r in rows:
        del r["time"]
    return {"title": title, "iops": [[round(t, 3), v] for t, v in iops],
            "latency_ms": [[round(t, 3), round(v / 1e6, 3)] for t, v in lat_ns],
            "samples": rows, "events": {k: round(v - fio_start, 3) for k, v in (events or {}).items()}}


def phase_spans(samples: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """Consecutive samples with the same phase as (phase, start, end); None phases are skipped."""
    spans: list[tuple[str, float, float]] = []
    for s in samples:
        phase = s.get("phase")
        if not phase:
            continue
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], s["t"])
        else:
            if spans:  # the previous phase lasted until this one began
                spans[-1] = (spans[-1][0], spans[-1][1], s["t"])
            spans.append((phase, s["t"], s["t"]))
    return spans


def record_migration(term: Terminal, source: str, target: str, device: str, workdir: Path,
                     lead_s: float = 2.0, tail_s: float = 2.0, rate_limit_bytes_s: int = 0,
                     iodepth: int = 4, rate_iops: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run fio (4 KiB random writes) on ``device`` and migrate ``source`` -> ``target`` meanwhile.

    Returns (timeline, the migration's result). fio is stopped with SIGINT, so it writes its logs.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = workdir / "fio"
    args = ["fio", "--name=load", "--ioengine=libaio", "--direct=1", f"--filename={device}",
            "--rw=randwrite", "--bs=4k", f"--iodepth={iodepth}", "--time_based", "--runtime=3600",
            "--size=64M", f"--write_iops_log={prefix}", f"--write_lat_log={prefix}", "--log_avg_msec=200",
            "--randrepeat=0", "--output-format=json"]
    if rate_iops:
        args.append(f"--rate_iops={rate_iops}")
    fio_start = time.time()
    fio = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = Sampler(term, source, target).start()
    events: dict[str, float] = {}
    try:
        time.sleep(lead_s)
        events["migrate"] = time.time()
        result = term.migrate(source, target, rate_limit_bytes_s=rate_limit_bytes_s, force=True)
        events["done"] = time.time()
        time.sleep(tail_s)
    finally:
        fio.send_signal(signal.SIGINT)
        try:
            fio.wait(timeout=60)
        except subprocess.TimeoutExpired:
            fio.kill()
            fio.wait()
        samples = sampler.stop()
    iops = fio_log(workdir / "fio_iops.1.log")
    lat = fio_log(workdir / "fio_lat.1.log")
    title = (f"migration {source} -> {target} under 4 KiB random writes (iodepth {iodepth}); "
             f"longest host pause {result.get('host_pause_ms_max')} ms")
    return build(title, fio_start, iops, lat, samples, events), result
