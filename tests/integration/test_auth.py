"""CURVE authentication: a peer without the cluster's key can neither write to a
secondary nor issue control commands; the node keeps serving authenticated peers."""
from __future__ import annotations

import pytest
import zmq.auth

from replicator import keys, wire
from replicator.errors import NodeUnreachable
from replicator.transport import Client

from tests.conftest import make_pair

MiB = 1 << 20


def test_unauthenticated_peer_is_refused(started, tmp_path):
    t = started
    assert t.cluster.keys is not None
    make_pair(t, 8 * MiB, "sync")
    endpoint = t.cluster.node("site-b").control
    write = wire.Message("pair.write", {"volume": "v3", "offset": 0, "source": "site-a1"}, [b"evil" * 1024])

    plain = Client(endpoint, timeout_s=1.5)               # no CURVE at all
    with pytest.raises(NodeUnreachable):
        plain.request(write)
    plain.close()

    rogue_dir = tmp_path / "rogue"
    rogue_dir.mkdir()
    pub, sec = zmq.auth.create_certificates(str(rogue_dir), "rogue")
    rogue_pub, rogue_sec = zmq.auth.load_certificate(sec)
    real = keys.load(t.cluster.keys)
    rogue = Client(endpoint, timeout_s=1.5, curve=(real.server_public, rogue_pub, rogue_sec))
    for msg in (write, wire.Message("volume.create", {"name": "x", "size": MiB}), wire.Message("status")):
        with pytest.raises(NodeUnreachable):
            rogue.request(msg)
    rogue.close()

    # nothing was written, nothing created, and the node still serves the cluster
    import nbd
    h = nbd.NBD()
    h.connect_uri(t.cluster.node("site-b").nbd_uri("v3"))
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()
    assert not any(v["name"] == "x" for v in t.status()["volumes"])
    assert t.find_pair("site-a1:v1")["state"] == "duplex"
