"""CURVE keys for a cluster (ZeroMQ CurveZMQ): who may talk to a node at all.

``rcopy`` generates, in the cluster's ``keys`` directory:
* ``server.key`` / ``server.key_secret``: the keypair every node's control server uses;
* ``client.key`` / ``client.key_secret``: the keypair nodes and the terminal use as clients;
* ``authorized/``: the client public keys servers accept (ZAP via zmq.auth).
A process without ``client.key_secret`` cannot complete the CURVE handshake, so it
can neither write to a secondary nor issue control commands.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError


@dataclass(frozen=True)
class CurveKeys:
    """The keys one process needs: server keypair (to serve) and client keypair (to call)."""

    directory: Path
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @property
    def authorized(self) -> Path:
        return self.directory / "authorized"

    def client_triple(self) -> tuple[bytes, bytes, bytes]:
        return self.server_public, self.client_public, self.client_secret


def generate(directory: Path) -> Path:
    """Create the cluster's keys (idempotent); return the directory."""
    import zmq.auth
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in ("server", "client"):
        if not (directory / f"{name}.key_secret").exists():
            zmq.auth.create_certificates(str(directory), name)
        (directory / f"{name}.key_secret").chmod(0o600)  # a secret key is for root's eyes only
    auth = directory / "authorized"
    auth.mkdir(exist_ok=True)
    shutil.copy(directory / "client.key", auth / "client.key")
    return directory


def generate_tls_psk(directory: Path) -> Path:
    """A pre-shared key file for NBD over TLS (nbdkit --tls-psk, libnbd tls-psk-file)."""
    import secrets
    from .cluster import TLS_USERNAME
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / "nbd-tls.psk"
    if not path.exists():
        path.write_text(f"{TLS_USERNAME}:{secrets.token_hex(32)}\n")
        path.chmod(0o600)
    return path


def load(directory: Path) -> CurveKeys:
    import zmq.auth
    try:
        spub, ssec = zmq.auth.load_certificate(str(directory / "server.key_secret"))
        cpub, csec = zmq.auth.load_certificate(str(directory / "client.key_secret"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load CURVE keys from {directory}: {exc}") from None
    if not ssec or not csec:
        raise UsageError(f"{directory} lacks secret keys")
    return CurveKeys(directory, spub, ssec, cpub, csec)
