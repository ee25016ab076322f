"""The alert rules and the dashboard, tested by promtool against series recorded from a real lab.

One real run (three nbdkit nodes, an async pair, a writer) is scraped once a second
while it goes through: healthy, pair suspended, secondary hung while the journal
fills, a migration left in THROUGH, secondary stopped. ``promtool test rules`` then
replays the recorded series and checks which alerts fire at the end of each stage
(rules rendered with short durations so the run takes about a minute and a half).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from replicator import dashboard, lab, process, prometheus
from replicator.prometheus import ALERTS, AlertTargets
from replicator.terminal import Terminal
from tests.conftest import nbd_handle
from tests.integration.scrape_recorder import Recorder

MiB = 1 << 20
SIZE = 32 * MiB
JOURNAL_BYTES = 4 * MiB
FOR_S = 6
TARGETS = AlertTargets(rpo_seconds=3, rpo_for=f"{FOR_S}s", not_duplex_for=f"{FOR_S}s", journal_for=f"{FOR_S}s",
                       phase_for=f"{FOR_S}s", progress_window="5s", node_down_for=f"{FOR_S}s")
HOLD = FOR_S + 5  # rounds a condition is held before the stage's end, where its alert must fire
ROOT = Path(__file__).resolve().parents[2]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@dataclass
class Run:
    """What a recorded lab run left: promtool input series, stage ends (round index), metric names."""

    series: list[dict[str, str]]
    marks: dict[str, int]
    names: set[str]


class Writer(threading.Thread):
    """4 KiB writes to the primary, ten a second, until paused."""

    def __init__(self, term: Terminal) -> None:
        super().__init__(daemon=True, name="alerts-writer")
        self.term, self.stop, self.count = term, threading.Event(), 0
        self.errors: list[Exception] = []

    def run(self) -> None:
        h = nbd_handle(self.term, "site-a1:v1")
        try:
            while not self.stop.wait(0.1):
                h.pwrite(bytes([self.count % 251]) * 4096, (self.count % 2048) * 4096)
                self.count += 1
        except Exception as exc:  # reported by the run fixture
            self.errors.append(exc)
        finally:
            h.shutdown()


def fill_journal(term: Terminal, fraction: float) -> float:
    """Write to the primary until its journal holds ``fraction`` of its capacity; return the fill."""
    h = nbd_handle(term, "site-a1:v1")
    try:
        for i in range(JOURNAL_BYTES // 4096):
            if i % 32 == 0:
                g = next(g for g in term.status(only=["site-a1"])["groups"] if g["group"] == "g0")
                used = g["journal_used_bytes"] / g["journal_capacity_bytes"]
                if used >= fraction:
                    return used
            h.pwrite(b"j" * 4096, (4096 + i) * 4096)
    finally:
        h.shutdown()
    raise AssertionError(f"the journal never reached {fraction:.0%}")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    lab_dir = tmp_path_factory.mktemp("alerts") / "lab"
    lab_dir.mkdir()
    (lab_dir / lab.LAB_MARK).write_text("test\n")
    cluster = lab.make_cluster(lab_dir)
    cluster.path.write_text(lab.dump(cluster))
    t = Terminal(cluster)
    marks: dict[str, int] = {}
    try:
        for name in lab.NODES:
            t.node_start(name)
        for spec in ("site-a1:v1", "site-a2:v2", "site-b:v3"):
            t.volume_create(spec, SIZE)
        t.pair_create("site-a1:v1", "site-b:v3", mode="async", group="g0", journal_bytes=JOURNAL_BYTES)
        t.wait_duplex("site-a1:v1", 120)
        targets = {n: cluster.node(n).metrics for n in lab.NODES}
        with Recorder(targets, job=TARGETS.job) as rec:
            writer = Writer(t)
            writer.start()
            try:
                marks["healthy"] = rec.wait_rounds(HOLD)
                t.pair_command("suspend", "site-a1:v1")
                marks["suspend_early"] = rec.wait_rounds(2)       # not for FOR_S yet: pending, not firing
                marks["suspended"] = rec.wait_rounds(HOLD - 2)
                t.pair_command("resume", "site-a1:v1")
                t.wait_duplex("site-a1:v1", 60)
            finally:
                writer.stop.set()
                writer.join(timeout=10)
            assert not writer.errors, writer.errors
            secondary = process.read_pid(str(cluster.node("site-b").pidfile))
            os.kill(secondary, signal.SIGSTOP)                     # a hung secondary node
            try:
                assert fill_journal(t, 0.85) < 1.0
                marks["journal"] = rec.wait_rounds(HOLD + int(TARGETS.rpo_seconds))
            finally:
                os.kill(secondary, signal.SIGCONT)
            t.wait_drained("site-a1:v1", "site-b:v3", 60)
            t.migrate("site-a1:v1", "site-a2:v2", start=False)     # prepared, never started: stays in THROUGH
            marks["through"] = rec.wait_rounds(HOLD)
            assert t.continue_migration("site-a2:v2", timeout_s=120)["state"] == "done"
            marks["done"] = rec.wait_rounds(3)
            t.node_stop("site-b")
            marks["stopped"] = rec.wait_rounds(HOLD)
        yield Run(rec.input_series(), marks, rec.names | {"up"})
    finally:
        lab.down(lab_dir)


# ---------------------------------------------------------------------- expectations
def _alert(**labels: str) -> dict[str, str]:
    return {"job": TARGETS.job, **labels}


NODE_DOWN_B = _alert(instance="site-b")
EXPECTED: dict[str, dict[str, list[dict[str, str]]]] = {
    "healthy": {},
    "suspend_early": {},
    "suspended": {"RcopyPairNotDuplex": [_alert(instance="site-a1", primary="site-a1:v1")]},
    "journal": {"RcopyRpoAboveTarget": [_alert(instance="site-a1", primary="site-a1:v1", secondary="site-b:v3")],
                "RcopyJournalHighWater": [_alert(instance="site-a1", node="site-a1", group="g0")],
                "RcopyNodeDown": [NODE_DOWN_B]},
    "through": {"RcopyMigrationPhaseStuck": [_alert(instance="site-a2", target="site-a2:v2", phase="through")]},
    "done": {},
    "stopped": {"RcopyNodeDown": [NODE_DOWN_B]},
}


def _fill(template: str, labels: dict[str, str]) -> str:
    """Prometheus's templating, as far as the rules use it: ``{{ $labels.NAME }}``."""
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)


def _rule_tests(rules_text: str, marks: dict[str, int]) -> list[dict[str, Any]]:
    rules = {r["alert"]: r for g in yaml.safe_load(rules_text)["groups"] for r in g["rules"]}
    assert set(rules) == set(ALERTS)
    tests = []
    for stage, firing in EXPECTED.items():
        for name in ALERTS:
            rule = rules[name]
            exp = [{"exp_labels": {**rule["labels"], **labels},
                    "exp_annotations": {k: _fill(v, labels) for k, v in rule["annotations"].items()}}
                   for labels in firing.get(name, [])]
            tests.append({"eval_time": f"{marks[stage]}s", "alertname": name, "exp_alerts": exp})
    return tests


# ---------------------------------------------------------------------- tests
def test_alerts_fire_on_a_real_run(run: Run, tmp_path: Path) -> None:
    rules = prometheus.rules(TARGETS)
    (tmp_path / "rules.yml").write_text(rules)
    check = promtool("check", "rules", "rules.yml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = {"rule_files": ["rules.yml"], "evaluation_interval": "1s",
            "tests": [{"interval": "1s", "input_series": run.series,
                       "alert_rule_test": _rule_tests(rules, run.marks)}]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(unit, sort_keys=False))
    result = promtool("test", "rules", "test.yml", cwd=tmp_path)
    assert result.returncode == 0, f"stage ends (seconds): {run.marks}\n{result.stdout}{result.stderr}"


def test_dashboard_queries_return_data_from_a_real_run(run: Run, tmp_path: Path) -> None:
    model = json.loads((ROOT / "ops/grafana/rcopy-dashboard.json").read_text())
    assert model == dashboard.dashboard(), "ops/grafana/rcopy-dashboard.json is stale: rcopy monitoring dashboard"
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    for p in model["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["targets"] and all(t["refId"] and t["expr"] for t in p["targets"]), p["title"]
    exprs = dashboard.expressions(model)
    for title, expr in exprs:
        unknown = dashboard.metric_names(expr) - run.names
        assert dashboard.metric_names(expr) and not unknown, f"{title}: no such metric {unknown}"
    # each query, as an alert on its result being non-empty, must fire mid-migration (everything exists then)
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"alert": f"panel_{i}", "expr": f"count({expr}) > 0"} for i, (_, expr) in enumerate(exprs)]}]}
    (tmp_path / "panels.yml").write_text(yaml.safe_dump(rules))
    check = promtool("check", "rules", "panels.yml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    at = f"{run.marks['through']}s"
    unit = {"rule_files": ["panels.yml"], "evaluation_interval": "1s",
            "tests": [{"interval": "1s", "input_series": run.series, "alert_rule_test": [
                {"eval_time": at, "alertname": f"panel_{i}", "exp_alerts": [{"exp_labels": {}}]}
                for i in range(len(exprs))]}]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(unit, sort_keys=False))
    result = promtool("test", "rules", "test.yml", cwd=tmp_path)
    titles = "\n".join(f"panel_{i}: {title}" for i, (title, _) in enumerate(exprs))
    assert result.returncode == 0, f"{titles}\n{result.stdout}{result.stderr}"


def test_every_exported_metric_is_on_the_dashboard_or_in_a_rule(run: Run) -> None:
    used = set().union(*(dashboard.metric_names(e) for _, e in dashboard.expressions(dashboard.dashboard())))
    used |= dashboard.metric_names(prometheus.rules())
    assert run.names - used == set()


def test_shipped_rules_are_the_defaults_and_valid(tmp_path: Path) -> None:
    shipped = ROOT / "ops/prometheus/rcopy-rules.yml"
    assert shipped.read_text() == prometheus.rules(), "stale: rcopy monitoring rules --out " + str(shipped)
    check = promtool("check", "rules", str(shipped), cwd=tmp_path)
    assert check.returncode == 0 and "SUCCESS: 5 rules found" in check.stdout, check.stdout + check.stderr


def test_scrape_config_of_a_lab_cluster_is_valid(tmp_path: Path) -> None:
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    cluster = lab.make_cluster(lab_dir)
    cluster.path.write_text(lab.dump(cluster))
    out = tmp_path / "prometheus.yml"
    cli = [str(ROOT / ".venv/bin/rcopy"), "--cluster", str(cluster.path), "monitoring"]
    subprocess.run([*cli, "rules", "--rpo", "30", "--out", str(tmp_path / "rules.yml")], check=True, timeout=60)
    subprocess.run([*cli, "scrape-config", "--rules", "rules.yml", "--out", str(out)], check=True, timeout=60)
    text = out.read_text()
    for name in lab.NODES:
        assert f'["{cluster.node(name).metrics}"]' in text and f'{{instance: "{name}"}}' in text
    check = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert check.returncode == 0 and "SUCCESS: 5 rules found" in check.stdout, check.stdout + check.stderr
    assert "rcopy_pair_lag_seconds{job=\"rcopy\"} > 30" in (tmp_path / "rules.yml").read_text()
