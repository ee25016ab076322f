"""The Prometheus endpoint of a node is scraped and reflects replication state."""
from __future__ import annotations

import urllib.request

from tests.conftest import make_pair, nbd_handle

MiB = 1 << 20


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        return r.read().decode()


def test_metrics_endpoint_scraped(started):
    t = started
    make_pair(t, 8 * MiB, "async", group="g0")
    h = nbd_handle(t, "site-a1:v1")
    for i in range(10):
        h.pwrite(b"m" * 4096, i * 4096)
    h.shutdown()
    t.verify("site-a1:v1", "site-b:v3")
    text = scrape(t.cluster.node("site-a1").metrics)
    assert 'rcopy_volume_writes_total{node="site-a1",volume="v1"} 10.0' in text
    assert 'rcopy_pair_state{primary="site-a1:v1",state="duplex"} 1.0' in text
    assert 'rcopy_pair_lag_writes{primary="site-a1:v1",secondary="site-b:v3"} 0.0' in text
    assert 'rcopy_sequence{group="g0",node="site-a1",pointer="stored"} 10.0' in text
    assert 'rcopy_journal_capacity_bytes{group="g0",node="site-a1"} 2.68435456e+08' in text
    sec = scrape(t.cluster.node("site-b").metrics)
    assert 'rcopy_sequence{group="g0",node="site-b",pointer="applied"} 10.0' in sec
