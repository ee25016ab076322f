"""A Grafana dashboard for the metrics of ``metrics.py`` (``rcopy monitoring dashboard``).

The shipped ``ops/grafana/rcopy-dashboard.json`` is ``render()``; it asks for a
Prometheus data source and the scrape job (variables ``datasource`` and ``job``)
when imported.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .metrics import PAIR_STATES, PHASES

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job="$job"'
# Grafana's variables, and what to put in their place to run an expression outside Grafana
VARIABLES = {"$__rate_interval": "1m", "$job": "rcopy"}


@dataclass(frozen=True)
class Panel:
    """One panel: its queries (expression, legend), unit and place on the 24-column grid."""

    title: str
    kind: str
    queries: list[tuple[str, str]]
    unit: str = "short"
    width: int = 8
    height: int = 7
    mappings: dict[int, tuple[str, str]] = field(default_factory=dict)  # value -> (text, colour)
    thresholds: list[tuple[float, str]] = field(default_factory=list)   # (from, colour), after green
    description: str = ""


def _encoded(metric: str, label: str, values: tuple[str, ...], by: str) -> tuple[str, dict[int, tuple[str, str]]]:
    """One number per ``by`` for a 0/1-per-state gauge: 1 for the first state, 2 for the second, ..."""
    expr = " + ".join(f'{i} * max by ({by}) ({metric}{{{SEL}, {label}="{v}"}})' for i, v in enumerate(values, 1))
    return expr, {i: (v, "") for i, v in enumerate(values, 1)}


def _panels() -> list[Panel]:
    pair_expr, pair_map = _encoded("rcopy_pair_state", "state", PAIR_STATES, "primary")
    pair_colours = {"copying": "blue", "duplex": "green", "suspended": "red"}
    pair_map = {i: (text, pair_colours[text]) for i, (text, _) in pair_map.items()}
    phase_expr, phase_map = _encoded("rcopy_migration_phase", "phase", PHASES, "target")
    phase_map = {i: (text, "green" if text == "done" else "yellow") for i, (text, _) in phase_map.items()}
    return [
        Panel("Nodes", "stat", [(f"up{{{SEL}}}", "{{instance}}")], width=6,
              mappings={0: ("DOWN", "red"), 1: ("up", "green")}, description="Scrape success of every node"),
        Panel("Pair state", "state-timeline", [(pair_expr, "{{primary}}")], width=6, mappings=pair_map),
        Panel("Journal use", "bargauge",
              [(f"rcopy_journal_used_bytes{{{SEL}}} / rcopy_journal_capacity_bytes{{{SEL}}}", "{{node}} {{group}}")],
              unit="percentunit", width=6, thresholds=[(0.8, "red")],
              description="Red above the alert rules' default high-water mark (80%)"),
        Panel("Back-pressure", "timeseries",
              [(f"rcopy_journal_throttle_seconds{{{SEL}}}", "delay {{node}} {{group}}"),
               (f"rate(rcopy_journal_throttled_writes_total{{{SEL}}}[$__rate_interval])",
                "slowed writes/s {{node}} {{group}}")],
              description="Host writes slowed past the journal's high-water mark (a full journal would fold)"),
        Panel("Migration progress", "bargauge",
              [(f"rcopy_migration_migrated_fraction{{{SEL}}}", "{{source}} -> {{target}}")],
              unit="percentunit", width=6),
        Panel("Replication lag (RPO)", "timeseries",
              [(f"rcopy_pair_lag_seconds{{{SEL}}}", "{{primary}} -> {{secondary}}")], unit="s",
              description="Age of the oldest write not yet applied at the secondary"),
        Panel("Lag (writes)", "timeseries", [(f"rcopy_pair_lag_writes{{{SEL}}}", "{{primary}}")]),
        Panel("Lag (bytes)", "timeseries", [(f"rcopy_pair_lag_bytes{{{SEL}}}", "{{primary}}")], unit="bytes",
              description="Journal entries not applied plus dirty regions of a pair that is not duplex"),
        Panel("Host writes", "timeseries",
              [(f"rate(rcopy_volume_writes_total{{{SEL}}}[$__rate_interval])", "{{node}}:{{volume}}")],
              unit="wps"),
        Panel("Host write bandwidth", "timeseries",
              [(f"rate(rcopy_volume_written_bytes_total{{{SEL}}}[$__rate_interval])", "{{node}}:{{volume}}")],
              unit="Bps"),
        Panel("Initial copy / resync", "timeseries",
              [(f"rate(rcopy_pair_copied_bytes_total{{{SEL}}}[$__rate_interval])", "{{primary}} data"),
               (f"rate(rcopy_pair_zeroed_bytes_total{{{SEL}}}[$__rate_interval])", "{{primary}} zeros")],
              unit="Bps", description="Data sent, and ranges sent as zero commands (holes, all-zero data)"),
        Panel("Sequence numbers", "timeseries",
              [(f"rcopy_sequence{{{SEL}}}", "{{node}} {{group}} {{pointer}}")],
              description="Per consistency group: counter, stored, transferred, applied, discarded"),
        Panel("Migration phase", "state-timeline", [(phase_expr, "{{target}}")], mappings=phase_map),
        Panel("Longest host hold (migration)", "timeseries",
              [(f"rcopy_migration_host_held_ms_max{{{SEL}}}", "{{target}}")], unit="ms"),
    ]


def _panel_json(p: Panel, ident: int, x: int, y: int) -> dict[str, Any]:
    steps = [{"color": "green", "value": None}] + [{"color": c, "value": v} for v, c in p.thresholds]
    mappings = [{"type": "value", "options": {str(v): {"text": t, "color": c, "index": i} if c else
                                              {"text": t, "index": i}
                                              for i, (v, (t, c)) in enumerate(sorted(p.mappings.items()))}}]
    return {"id": ident, "type": p.kind, "title": p.title, "description": p.description,
            "datasource": DATASOURCE, "gridPos": {"x": x, "y": y, "w": p.width, "h": p.height},
            "fieldConfig": {"defaults": {"unit": p.unit, "mappings": mappings if p.mappings else [],
                                         "thresholds": {"mode": "absolute", "steps": steps},
                                         "color": {"mode": "thresholds" if p.thresholds or p.mappings
                                                   else "palette-classic"}},
                            "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                        for i, (expr, legend) in enumerate(p.queries)]}


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    panels, x, y, row_height = [], 0, 0, 0
    for ident, p in enumerate(_panels(), 1):
        if x + p.width > 24:
            x, y, row_height = 0, y + row_height, 0
        panels.append(_panel_json(p, ident, x, y))
        x, row_height = x + p.width, max(row_height, p.height)
    job = {"name": "job", "label": "Job", "type": "query", "datasource": DATASOURCE, "refresh": 1,
           "query": {"query": "label_values(rcopy_pair_state, job)", "refId": "job"},
           "definition": "label_values(rcopy_pair_state, job)",
           "current": {"text": VARIABLES["$job"], "value": VARIABLES["$job"]}}
    return {"uid": "rcopy", "title": "rcopy", "tags": ["rcopy"], "schemaVersion": 38, "version": 1,
            "editable": True, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
            "templating": {"list": [{"name": "datasource", "label": "Data source", "type": "datasource",
                                     "query": "prometheus"}, job]},
            "panels": panels}


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def expressions(model: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in a dashboard model, Grafana variables filled in."""
    out = []
    for panel in model["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in VARIABLES.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names an rcopy dashboard expression reads (``rcopy_*`` and ``up``)."""
    return set(re.findall(r"\b(rcopy_[a-z_]+|up)\b(?=\s*[{\[)\s])", expr + " "))
