"""Prometheus configuration for an rcopy cluster: alert rules and the scrape config.

``rcopy monitoring rules`` renders the alert rules from ``AlertTargets`` (the shipped
``ops/prometheus/rcopy-rules.yml`` is the rendering of the defaults);
``rcopy monitoring scrape-config`` lists every node's ``metrics`` address of a
cluster file as one scrape job, each target labelled ``instance = NODE``.
The metrics themselves come from ``metrics.py``.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from .cluster import Cluster
from .errors import UsageError

_DURATION = re.compile(r"^(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$")
ALERTS = ("RcopyRpoAboveTarget", "RcopyPairNotDuplex", "RcopyJournalHighWater",
          "RcopyMigrationPhaseStuck", "RcopyNodeDown")


@dataclass(frozen=True)
class AlertTargets:
    """What counts as wrong, and for how long before an alert fires (Prometheus durations)."""

    job: str = "rcopy"                      # the scrape job of the rcopy nodes
    rpo_seconds: float = 60.0               # RcopyRpoAboveTarget: lag above this ...
    rpo_for: str = "2m"                     # ... for this long
    not_duplex_for: str = "5m"              # RcopyPairNotDuplex: copying or suspended this long
    journal_high_water: float = 0.8         # RcopyJournalHighWater: used / capacity above this ...
    journal_for: str = "1m"                 # ... for this long
    phase_for: str = "30m"                  # RcopyMigrationPhaseStuck: one phase this long ...
    progress_window: str = "5m"             # ... and no background-copy progress in this window
    node_down_for: str = "1m"               # RcopyNodeDown: scrape failing this long

    def __post_init__(self) -> None:
        for name in ("rpo_for", "not_duplex_for", "journal_for", "phase_for", "progress_window", "node_down_for"):
            value = getattr(self, name)
            if not value or not _DURATION.match(value):
                raise UsageError(f"{name.replace('_', '-')}: {value!r} is not a Prometheus duration (e.g. 90s, 5m, 1h)")
        if self.rpo_seconds <= 0:
            raise UsageError("the RPO target must be positive (seconds)")
        if not 0 < self.journal_high_water < 1:
            raise UsageError("the journal high-water mark is a fraction between 0 and 1, e.g. 0.8")
        if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_:.-]*", self.job):
            raise UsageError(f"job {self.job!r} is not a usable scrape job name")


_RULES = """\
# Alert rules for rcopy nodes (the metrics of replicator/metrics.py).
# Made by `rcopy monitoring rules`: run it with other targets instead of editing this file.
# Targets:
%(targets)s
groups:
  - name: rcopy
    rules:
      - alert: RcopyRpoAboveTarget
        expr: rcopy_pair_lag_seconds{job="%(job)s"} > %(rpo_seconds)g
        for: %(rpo_for)s
        labels:
          severity: warning
        annotations:
          summary: "{{ $labels.primary }} -> {{ $labels.secondary }}: replication lag above the %(rpo_seconds)gs RPO target"
          description: "The oldest write not yet applied at {{ $labels.secondary }} has been older than %(rpo_seconds)gs for %(rpo_for)s (rcopy_pair_lag_seconds)."
      - alert: RcopyPairNotDuplex
        expr: max without (state) (rcopy_pair_state{job="%(job)s", state="duplex"}) == 0
        for: %(not_duplex_for)s
        labels:
          severity: critical
        annotations:
          summary: "{{ $labels.primary }}: remote-copy pair not duplex for %(not_duplex_for)s"
          description: "The pair of {{ $labels.primary }} has been copying or suspended for %(not_duplex_for)s; see rcopy status (a suspended pair resumes with rcopy pair resume)."
      - alert: RcopyJournalHighWater
        expr: rcopy_journal_used_bytes{job="%(job)s"} / rcopy_journal_capacity_bytes{job="%(job)s"} > %(journal_high_water)g
        for: %(journal_for)s
        labels:
          severity: warning
        annotations:
          summary: "{{ $labels.node }}: journal of group {{ $labels.group }} above %(journal_high_water_pct)s full"
          description: "Past the mark host writes are slowed (back-pressure); a full journal suspends the group's pairs (its entries are folded into the diff bitmap). Check the link to the secondary."
      - alert: RcopyMigrationPhaseStuck
        expr: >-
          (rcopy_migration_phase{job="%(job)s", phase!="done"} == 1)
          unless on (job, instance, target)
          (delta(rcopy_migration_migrated_fraction{job="%(job)s"}[%(progress_window)s]) > 0)
        for: %(phase_for)s
        labels:
          severity: warning
        annotations:
          summary: "Migration to {{ $labels.target }} stuck in phase {{ $labels.phase }}"
          description: "The migration to {{ $labels.target }} has been in phase {{ $labels.phase }} for %(phase_for)s without background-copy progress in %(progress_window)s; see rcopy status and the nodes' logs."
      - alert: RcopyNodeDown
        expr: up{job="%(job)s"} == 0
        for: %(node_down_for)s
        labels:
          severity: critical
        annotations:
          summary: "rcopy node {{ $labels.instance }} down"
          description: "Prometheus could not scrape {{ $labels.instance }} for %(node_down_for)s; see rcopy status (rcopy node start NODE)."
"""


def rules(targets: AlertTargets = AlertTargets()) -> str:
    """The alert rules file (YAML) for ``targets``."""
    values = asdict(targets)
    values["journal_high_water_pct"] = f"{targets.journal_high_water:.0%}"
    values["targets"] = "\n".join(f"#   {k}: {v:g}" if isinstance(v, float) else f"#   {k}: {v}"
                                   for k, v in asdict(targets).items())
    return _RULES % values


def scrape_config(cluster: Cluster, job: str = "rcopy", interval: str = "15s",
                  rule_files: list[str] | None = None) -> str:
    """A ``prometheus.yml`` that scrapes every node of ``cluster`` that has a ``metrics`` address."""
    if not _DURATION.match(interval) or not interval:
        raise UsageError(f"interval {interval!r} is not a Prometheus duration (e.g. 15s)")
    nodes = {name: ep.metrics for name, ep in sorted(cluster.nodes.items()) if ep.metrics}
    missing = sorted(set(cluster.nodes) - set(nodes))
    if not nodes:
        raise UsageError(f"no node of {cluster.path} has a metrics address; add metrics = \"HOST:PORT\" "
                         f"to each node's section")
    lines = [f"# Made by `rcopy monitoring scrape-config` from {cluster.path}."]
    if missing:
        lines.append(f"# Without a metrics address (not scraped): {', '.join(missing)}")
    lines += ["global:", f"  scrape_interval: {interval}", f"  evaluation_interval: {interval}"]
    if rule_files:
        lines += ["rule_files:", *(f"  - {json.dumps(f)}" for f in rule_files)]
    lines += ["scrape_configs:", f"  - job_name: {json.dumps(job)}", "    static_configs:"]
    for name, address in nodes.items():
        lines += [f"      - targets: [{json.dumps(address)}]", f"        labels: {{instance: {json.dumps(name)}}}"]
    return "\n".join(lines) + "\n"
