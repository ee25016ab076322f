"""Hostile and broken input: fuzzed ZeroMQ messages, corrupted bitmaps, wrong cluster files.
Each gets a clear error; the node keeps serving and loses nothing."""
from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from replicator import cluster as cluster_mod, wire
from replicator.errors import RcopyError, UsageError
from replicator.transport import Client
from tests.conftest import make_pair, nbd_handle

MiB = 1 << 20
KINDS = [
    "ping", "status", "volume.create", "volume.delete", "volume.hash", "volume.read", "volume.write",
    "pair.create", "pair.join", "pair.leave", "pair.delete", "pair.suspend", "pair.resume", "pair.write",
    "pair.resync_begin", "pair.resync_done", "journal.push", "journal.pull", "journal.applied",
    "mig.prepare_target", "mig.prepare_source", "mig.add_source", "mig.start", "mig.handover",
    "mig.set_valid", "mig.source_status", "mig.fetch", "mig.region", "mig.dual_write",
    "mig.remove_source", "mig.clear_target", "mig.unregister_source", "mig.abort_target", "nonsense"]
NAMES = ["scratch", "g0", "site-a1", "site-b", "", "../etc", "x" * 300]
values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from(NAMES) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
        ["node", "control", "volume", "seq", "offset"]), inner, max_size=4),
    max_leaves=8)
FIELDS = ["name", "size", "volume", "offset", "length", "source", "group", "entries", "from_seq",
          "applied", "region", "zero", "mode", "secondary", "next_seq", "value", "volumes", "members",
          "target", "chunk", "fua", "handover_seq", "source_node"]
messages = st.builds(
    lambda kind, fields, payloads: (kind, fields, payloads),
    st.sampled_from(KINDS),
    st.dictionaries(st.sampled_from(FIELDS), values, max_size=6),
    st.lists(st.binary(max_size=5000), max_size=3))


@pytest.fixture
def victim(started):
    """A duplex sync pair holding known data, and a fuzzing client with the cluster's key."""
    t = started
    make_pair(t, 8 * MiB, "sync")
    t.volume_create("site-a1:scratch", 4 * MiB)  # the fuzzer aims at these; v1/v3 stay legitimate
    t.volume_create("site-b:scratch", 4 * MiB)
    h = nbd_handle(t, "site-a1:v1")
    data = os.urandom(MiB)
    h.pwrite(data, 2 * MiB)
    h.shutdown()
    return t, hashlib.sha256(data).hexdigest()


def test_fuzzed_messages_never_crash_a_node(victim):
    t, digest = victim
    stats = {"tried": 0, "errors": 0}
    clients = {n: Client(t.cluster.node(n).control, 10.0, t.keys.client_triple()) for n in ("site-a1", "site-b")}

    @settings(max_examples=int(os.environ.get("RCOPY_FUZZ_EXAMPLES", "400")), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["site-a1", "site-b"]), messages, st.binary(max_size=64))
    def fuzz(node, msg, raw):
        kind, fields, payloads = msg
        stats["tried"] += 1
        try:
            clients[node].request(wire.Message(kind, fields, payloads), timeout_s=10)
        except RcopyError:
            stats["errors"] += 1
        # raw garbage frames too
        c = clients[node]
        sock = c._socket()
        sock.send_multipart([b"", raw, raw])
        if sock.poll(5000):
            sock.recv_multipart()
    fuzz()
    for c in clients.values():
        c.close()
    assert stats["tried"] >= 100
    st_ = t.status()
    assert all(n["up"] for n in st_["nodes"] if n["name"] in ("site-a1", "site-b"))
    h = nbd_handle(t, "site-a1:v1")
    assert hashlib.sha256(h.pread(MiB, 2 * MiB)).hexdigest() == digest
    h.shutdown()
    print(f"fuzz: {stats['tried']} messages, {stats['errors']} refused with an error, no crash")


def test_corrupt_bitmap_means_full_resync_not_data_loss(started):
    t = started
    make_pair(t, 8 * MiB, "sync")
    t.pair_command("suspend", "site-a1:v1")
    h = nbd_handle(t, "site-a1:v1")
    h.pwrite(b"d" * 4096, 3 * MiB)
    h.shutdown()
    t.node_stop("site-a1")
    bitmap = t.cluster.node("site-a1").state / "volumes" / "v1.diff.bitmap"
    bitmap.write_bytes(b"\xff garbage")
    t.node_start("site-a1")
    t.pair_command("resume", "site-a1:v1")
    t.wait_duplex("site-a1:v1", 60)
    assert t.verify("site-a1:v1", "site-b:v3")["identical"]


@pytest.mark.parametrize("text,match", [
    ("not toml [", "cannot read"),
    ("dir = '/x'\n", "no storage nodes"),
    ("[nodes.a]\ncontrol = 'tcp://127.0.0.1:1'\n", "lacks nbd, state"),
    ("nodes = 5\n", "must be a table"),
])
def test_wrong_cluster_files(tmp_path, text, match):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(UsageError, match=match):
        cluster_mod.load(p)


def test_verify_streams_in_pieces_and_finds_a_planted_difference(started):
    """The offline verify asks for one piece at a time (a large volume never needs one long
    request) and still finds a difference written behind rcopy's back in a later piece."""
    t = started
    t.volume_create("site-a1:x", 8 << 20)
    t.volume_create("site-b:y", 8 << 20)
    t.node_stop("site-b")
    fd = os.open(t.cluster.node("site-b").state / "volumes" / "y.img", os.O_WRONLY)
    try:
        os.pwrite(fd, b"z" * 512, (6 << 20) + 4096)
    finally:
        os.close(fd)
    t.node_start("site-b")
    steps: list[int] = []
    r = t.verify("site-a1:x", "site-b:y", progress=lambda done, size: steps.append(done), piece=2 << 20)
    assert steps == [2 << 20, 4 << 20, 6 << 20, 8 << 20]
    assert not r["identical"] and r["differences"] == [6 << 20] and r["chunks"] == 8
    with pytest.raises(UsageError):
        t.node_request("site-a1", "volume.hash", name="x", offset=4096, length=1 << 20)


def test_a_node_that_cannot_bind_its_control_port_says_why(cluster):
    """A node that dies at start-up: the error names the cause from its logs (here its control
    port taken by another listener), not only where the logs are."""
    import socket
    ep = cluster.cluster.daemon("site-b")
    host, port = ep.control.rsplit("/", 1)[1].rsplit(":", 1)
    with socket.socket() as s:
        s.bind((host, int(port)))
        s.listen()
        with pytest.raises(RcopyError, match="(?i)bind"):
            cluster.node_start("site-b", timeout_s=20)


def test_the_lab_listens_on_ports_no_outgoing_connection_can_take():
    """lab.free_port: below the kernel's range for outgoing connections, and free to bind."""
    import socket
    from pathlib import Path
    from replicator import lab
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):
        port = lab.free_port()
        assert 1024 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_the_daemons_of_one_lab_never_share_a_port(tmp_path, monkeypatch):
    """make_cluster: a port picked for one daemon is not given to another (each is only tried and
    let go when picked; the fault matrix once lost a case to a virtual volume server that could
    not bind the port a node already listened on)."""
    from replicator import lab

    class Repeats:
        """The same free port again and again, then others."""
        def __init__(self):
            self.n = 0

        def randrange(self, start, stop):
            self.n += 1
            return start + 7 if self.n <= 20 else start + 7 + self.n

    monkeypatch.setattr(lab.random, "SystemRandom", Repeats)
    c = lab.make_cluster(tmp_path)
    ports = [int(e.control.rsplit(":", 1)[1]) for e in [*c.nodes.values(), *c.vvol_servers.values()]]
    ports += [int(e.metrics.rsplit(":", 1)[1]) for e in c.nodes.values()]
    assert len(ports) == 7 and len(set(ports)) == 7
