"""Hosts reach virtual volumes over NBD with TLS (PSK) when configured; plain NBD is refused."""
from __future__ import annotations

import nbd
import pytest

from replicator import lab
from replicator.terminal import Terminal

MiB = 1 << 20


@pytest.fixture
def tls_cluster(tmp_path):
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    (lab_dir / lab.LAB_MARK).write_text("test\n")
    c = lab.make_cluster(lab_dir, tls=True)
    c.path.write_text(lab.dump(c))
    try:
        yield Terminal(c.path)
    finally:
        lab.down(lab_dir)


def test_vvol_requires_tls(tls_cluster):
    t = tls_cluster
    t.node_start("site-a1")
    t.volume_create("site-a1:v1", 8 * MiB)
    t.vvol_create("app", "site-a1:v1")
    server = t.cluster.vvol_server()
    assert server.tls_psk and server.nbd_uri("app").startswith("nbds+unix://")

    plain = nbd.NBD()
    with pytest.raises(nbd.Error):
        plain.connect_uri(f"nbd+unix:///app?socket={server.nbd}")
        plain.pread(4096, 0)  # in case the server let the handshake through

    wrong = nbd.NBD()
    wrong.set_uri_allow_local_file(True)
    bad_psk = t.cluster.dir / "bad.psk"
    bad_psk.write_text("rcopy:" + "00" * 32 + "\n")
    with pytest.raises(nbd.Error):
        wrong.connect_uri(f"nbds+unix://rcopy@/app?socket={server.nbd}&tls-psk-file={bad_psk}")

    good = nbd.NBD()
    good.set_uri_allow_local_file(True)
    good.connect_uri(server.nbd_uri("app"))
    assert good.get_tls_negotiated()
    good.pwrite(b"t" * 4096, 0)
    assert good.pread(4096, 0) == b"t" * 4096
    good.shutdown()

    # and a host attaches it over TLS (nbdfuse + losetup)
    device = t.attach("app")
    with open(device, "rb") as f:
        assert f.read(4096) == b"t" * 4096
    t.detach("app")
