"""Scrape every node's /metrics once a round, as Prometheus would, and keep the samples
as promtool ``input_series``.

Like a Prometheus scrape: each series gets the target labels ``job`` and
``instance`` (the node's name, as ``rcopy monitoring scrape-config`` sets it), each
round records ``up`` (1 when the scrape answered within the timeout, else 0), and a
series that stops being exposed gets a staleness marker.
"""
from __future__ import annotations

import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Series = str  # 'name{label="value",...}', the form promtool reads


def _series(name: str, labels: dict[str, str]) -> Series:
    def quote(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return name + "{" + ",".join(f'{k}="{quote(v)}"' for k, v in sorted(labels.items())) + "}"


class Recorder:
    """A background thread scraping ``targets`` (instance -> host:port) every ``interval_s``."""

    def __init__(self, targets: dict[str, str], job: str = "rcopy", interval_s: float = 1.0,
                 timeout_s: float = 0.5, max_rounds: int = 600) -> None:
        self.targets, self.job = targets, job
        self.interval_s, self.timeout_s, self.max_rounds = interval_s, timeout_s, max_rounds
        self.rounds: list[dict[Series, float]] = []
        self.names: set[str] = set()  # every metric name seen
        self._stop = threading.Event()
        self._new_round = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="scrape-recorder", daemon=True)
        self._pool = ThreadPoolExecutor(max_workers=len(targets))

    def __enter__(self) -> "Recorder":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=True)

    @property
    def index(self) -> int:
        """The number of rounds recorded so far (the next round's index)."""
        with self._new_round:
            return len(self.rounds)

    def wait_rounds(self, n: int) -> int:
        """Block until ``n`` more rounds are recorded; return the index of the last one."""
        with self._new_round:
            goal = len(self.rounds) + n
            ok = self._new_round.wait_for(lambda: len(self.rounds) >= goal or self._stop.is_set(),
                                          timeout=n * (self.interval_s + self.timeout_s) + 30)
            assert ok and len(self.rounds) >= goal, f"scrape recorder stalled at round {len(self.rounds)}"
            return goal - 1

    def input_series(self) -> list[dict[str, str]]:
        """Every series over all rounds: a value, ``_`` (absent) or ``stale`` (just disappeared)."""
        with self._new_round:
            rounds = list(self.rounds)
        keys = sorted({k for r in rounds for k in r})
        out = []
        for key in keys:
            values, present = [], False
            for r in rounds:
                if key in r:
                    values.append(repr(r[key]))
                    present = True
                else:
                    values.append("stale" if present else "_")
                    present = False
            out.append({"series": key, "values": " ".join(values)})
        return out

    # ------------------------------------------------------------------ scraping
    def _scrape(self, instance: str, address: str) -> dict[Series, float]:
        target = {"job": self.job, "instance": instance}
        try:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=self.timeout_s) as reply:
                text = reply.read().decode()
        except OSError:
            return {_series("up", target): 0.0}
        samples = {_series("up", target): 1.0}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                self.names.add(s.name)
                samples[_series(s.name, {**s.labels, **target})] = float(s.value)
        return samples

    def _run(self) -> None:
        due = time.monotonic()
        for _ in range(self.max_rounds):
            if self._stop.wait(max(due - time.monotonic(), 0.0)):
                return
            due = max(due, time.monotonic()) + self.interval_s  # a late round delays the next, never bunches
            merged: dict[Series, float] = {}
            for part in self._pool.map(lambda t: self._scrape(*t), self.targets.items()):
                merged.update(part)
            with self._new_round:
                self.rounds.append(merged)
                self._new_round.notify_all()
        self._stop.set()
