"""Prometheus metrics of a node, computed from its status at scrape time (no hot-path cost).

Enable with ``metrics = "127.0.0.1:9101"`` in the node's section of the cluster
file; ``curl http://127.0.0.1:9101/metrics``.
"""
from __future__ import annotations

from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

PAIR_STATES = ("copying", "duplex", "suspended")
PHASES = ("through", "pending", "transitional", "migrating", "done")


class NodeCollector(Collector):
    """Turns ``node.status()`` into metric families."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def collect(self) -> Iterator[Any]:
        st = self.node.status()
        n = self.node.name
        writes = CounterMetricFamily("rcopy_volume_writes", "Host writes accepted", labels=["node", "volume"])
        wbytes = CounterMetricFamily("rcopy_volume_written_bytes", "Host bytes written", labels=["node", "volume"])
        for v in st["volumes"]:
            writes.add_metric([n, v["name"]], v["writes"])
            wbytes.add_metric([n, v["name"]], v["bytes_written"])
        yield writes
        yield wbytes

        lag_w = GaugeMetricFamily("rcopy_pair_lag_writes", "Acknowledged writes not yet applied at the secondary",
                                  labels=["primary", "secondary"])
        lag_b = GaugeMetricFamily("rcopy_pair_lag_bytes", "Bytes not yet at the secondary (journal + dirty regions)",
                                  labels=["primary", "secondary"])
        lag_s = GaugeMetricFamily("rcopy_pair_lag_seconds", "Age of the oldest write not yet applied at the secondary",
                                  labels=["primary", "secondary"])
        state = GaugeMetricFamily("rcopy_pair_state", "1 for the pair's current state", labels=["primary", "state"])
        copied = CounterMetricFamily("rcopy_pair_copied_bytes", "Data bytes sent by initial copy and resync",
                                     labels=["primary"])
        zeroed = CounterMetricFamily("rcopy_pair_zeroed_bytes", "Bytes initial copy and resync sent as zero "
                                     "commands (holes, all-zero data)", labels=["primary"])
        for p in st["pairs"]:
            lag_w.add_metric([p["primary"], p["secondary"]], p["lag_writes"])
            lag_b.add_metric([p["primary"], p["secondary"]], p["lag_bytes"])
            lag_s.add_metric([p["primary"], p["secondary"]], p.get("lag_seconds", 0.0))
            copied.add_metric([p["primary"]], p["copied_bytes"])
            zeroed.add_metric([p["primary"]], p.get("zeroed_bytes", 0))
            for s in PAIR_STATES:
                state.add_metric([p["primary"], s], 1.0 if p["state"] == s else 0.0)
        yield from (lag_w, lag_b, lag_s, state, copied, zeroed)

        seq = GaugeMetricFamily("rcopy_sequence", "Sequence numbers of a consistency group",
                                labels=["node", "group", "pointer"])
        used = GaugeMetricFamily("rcopy_journal_used_bytes", "Journal bytes in use", labels=["node", "group"])
        throttled = CounterMetricFamily("rcopy_journal_throttled_writes", "Host writes slowed by back-pressure "
                                        "(journal past its high-water mark)", labels=["node", "group"])
        delay = GaugeMetricFamily("rcopy_journal_throttle_seconds", "Current back-pressure delay per host write",
                                  labels=["node", "group"])
        capacity = GaugeMetricFamily("rcopy_journal_capacity_bytes", "Journal size", labels=["node", "group"])
        for g in st["groups"]:
            for ptr in ("counter", "stored", "transferred", "applied", "discarded"):
                if ptr in g:
                    seq.add_metric([n, g["group"], ptr], g[ptr])
            if "journal_used_bytes" in g:
                used.add_metric([n, g["group"]], g["journal_used_bytes"])
            if "journal_capacity_bytes" in g:
                capacity.add_metric([n, g["group"]], g["journal_capacity_bytes"])
            if "throttled_writes" in g:
                throttled.add_metric([n, g["group"]], g["throttled_writes"])
                delay.add_metric([n, g["group"]], g["throttle_ms"] / 1000)
        yield from (seq, used, capacity, throttled, delay)

        frac = GaugeMetricFamily("rcopy_migration_migrated_fraction", "Fraction of regions migrated",
                                 labels=["source", "target"])
        phase = GaugeMetricFamily("rcopy_migration_phase", "1 for the migration's current phase",
                                  labels=["target", "phase"])
        held = GaugeMetricFamily("rcopy_migration_host_held_ms_max", "Longest host request hold (pending mode)",
                                 labels=["target"])
        for m in st["migrations"]:
            frac.add_metric([m["source"], m["target"]], m["migrated_fraction"])
            held.add_metric([m["target"]], m["held_ms_max"])
            for ph in PHASES:
                phase.add_metric([m["target"], ph], 1.0 if m["phase"] == ph else 0.0)
        yield from (frac, phase, held)


def serve(node: Any, address: str) -> Any:
    """Start the metrics HTTP server on ``host:port``; return the server."""
    from prometheus_client import start_http_server
    host, _, port = address.rpartition(":")
    registry = CollectorRegistry()
    registry.register(NodeCollector(node))
    server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    return server
