"""The management terminal (SPEC 1.5): everything the CLI does, as an importable API.

``Terminal`` reads the cluster file, talks to nodes and the virtual-volume server
over ZeroMQ and starts or stops their processes. The CLI is a thin layer on it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from . import process, wire
from .cluster import Cluster, Endpoint, load, parse_volume
from .core import procedures as P
from .core import tables as T
from .keys import load as load_keys
from .errors import NodeUnreachable, NotFound, RcopyError, StateError, UsageError
from .transport import ClientPool

STATUS_TIMEOUT_S = 2.0
THREADS_DEFAULT = 8                 # nbdkit worker threads per NBD connection unless set
THREADS_MAX = 1024


def nbdkit_threads(kind: str = "vvol_server", env: Mapping[str, str] = os.environ) -> int:
    """nbdkit's ``--threads`` (worker threads per NBD connection) for a daemon of ``kind``:
    RCOPY_NBDKIT_THREADS (THREADS_DEFAULT unless set) for both kinds, RCOPY_NODE_NBDKIT_THREADS for storage
    nodes only. One thread per connection suits a node that only virtual volumes read and write
    (they keep one request in flight per connection; README, Limits); a client that sends many
    requests on one connection then has them served one at a time (its sync writes each wait
    for their own round trip)."""
    names = ("RCOPY_NODE_NBDKIT_THREADS", "RCOPY_NBDKIT_THREADS") if kind == "node" else ("RCOPY_NBDKIT_THREADS",)
    for name in names:
        raw = env.get(name, "").strip()
        if raw:
            try:
                n = int(raw)
            except ValueError:
                n = 0
            if not 1 <= n <= THREADS_MAX:
                raise UsageError(f"{name}={raw!r}: give a whole number of threads from 1 to {THREADS_MAX}")
            return n
    return THREADS_DEFAULT


class Terminal:
    """Drive one cluster: nodes, volumes, pairs, virtual volumes, migrations."""

    def __init__(self, cluster: Cluster | Path | str) -> None:
        self.cluster = cluster if isinstance(cluster, Cluster) else load(Path(cluster))
        self.keys = load_keys(self.cluster.keys) if self.cluster.keys else None
        self.clients = ClientPool(timeout_s=30.0, keys=self.keys)
        c = self.cluster
        self.d = P.Directory({n: ep.control for n, ep in c.nodes.items()}, list(c.vvol_servers),
                             lambda node, vol: c.node(node).nbd_uri(vol))

    # ------------------------------------------------------------------ plumbing
    def request(self, ep: Endpoint, kind: str, timeout_s: float | None = None,
                payloads: list[bytes] | None = None, **fields: Any) -> wire.Message:
        if not ep.netns and ep.pidfile.exists() and not process.alive(process.read_pid(str(ep.pidfile))):
            # a local daemon whose process is gone: say so now instead of after a timeout
            raise NodeUnreachable(f"{ep.name} is not running; start it with rcopy node start {ep.name}")
        if not _listening(ep.control):
            raise NodeUnreachable(f"{ep.name} ({ep.control}) refuses connections; is it running? "
                                  f"(rcopy node start {ep.name})")
        try:
            return self.clients.request(ep.control, wire.Message(kind, fields, payloads or []), timeout_s)
        except NodeUnreachable:
            raise NodeUnreachable(f"{ep.name} ({ep.control}) is not answering; is it running? "
                                  f"(rcopy node start {ep.name})") from None

    def node_request(self, node: str, kind: str, timeout_s: float | None = None, **fields: Any) -> wire.Message:
        return self.request(self.cluster.node(node), kind, timeout_s, **fields)

    def peer_entry(self, spec: str) -> dict[str, str]:
        node, vol = parse_volume(spec)
        ep = self.cluster.node(node)
        return {"node": node, "control": ep.control, "volume": vol}

    # ------------------------------------------------------------------ processes
    def node_start(self, name: str, timeout_s: float = 30.0) -> dict[str, Any]:
        ep = self.cluster.daemon(name)
        pid = process.read_pid(str(ep.pidfile))
        if process.alive(pid):
            try:
                self.request(ep, "ping", timeout_s=2.0)
                return {"name": name, "pid": pid, "started": False}
            except NodeUnreachable:
                deadline = time.monotonic() + 3  # it may be dying (just killed)
                while process.alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if process.alive(pid):
                    raise StateError(f"{name} has a process (pid {pid}) that does not answer; "
                                     f"stop it with rcopy node stop {name}") from None
        ep.state.mkdir(parents=True, exist_ok=True)
        plugin = "storage_node.py" if ep.kind == "node" else "virtual_volume.py"
        params = {"state": str(ep.state), "control": ep.control}
        if ep.kind == "node":
            params["name"] = name
        if self.cluster.keys:
            params["keys"] = str(self.cluster.keys)
        if ep.metrics:
            params["metrics"] = ep.metrics
        tls = ["--tls=require", f"--tls-psk={ep.tls_psk}"] if ep.tls_psk else []
        pid = process.start_nbdkit(plugin, params, socket=ep.nbd, pidfile=str(ep.pidfile),
                                   logfile=str(ep.logfile), threads=nbdkit_threads(ep.kind), extra_args=tls,
                                   netns=ep.netns)

        def ready() -> bool:
            if not process.alive(pid):
                raise RcopyError(f"{name} exited during start-up; see {ep.logfile} and "
                                 f"{ep.state}/node.log: {process.tail(str(ep.logfile))} "
                                 f"{process.tail(str(ep.state / 'node.log'))}".rstrip())
            try:
                self.request(ep, "ping", timeout_s=1.0)
                return True
            except NodeUnreachable:
                return False
        process.wait_until(ready, timeout_s, f"{name} to answer on {ep.control}")
        return {"name": name, "pid": pid, "started": True}

    def node_stop(self, name: str) -> dict[str, Any]:
        ep = self.cluster.daemon(name)
        pid = process.read_pid(str(ep.pidfile))
        stopped = process.stop_pid(pid)
        self.clients = ClientPool(timeout_s=30.0, keys=self.keys)
        return {"name": name, "pid": pid, "stopped": stopped}

    # ------------------------------------------------------------------ volumes and pairs
    def volume_create(self, spec: str, size: int) -> dict[str, Any]:
        node, vol = parse_volume(spec)
        return self.node_request(node, "volume.create", name=vol, size=size).fields

    def volume_delete(self, spec: str) -> dict[str, Any]:
        node, vol = parse_volume(spec)
        return self.node_request(node, "volume.delete", name=vol).fields

    def pair_create(self, primary: str, secondary: str, mode: str, group: str | None = None,
                    transfer: str = "push", journal_bytes: int | None = None,
                    auto_resume: bool = True, diff_block_bytes: int | None = None,
                    reorder_bytes: int | None = None) -> dict[str, Any]:
        return self.run(P.pair_create(self.d, primary, secondary, mode, group, transfer, journal_bytes, auto_resume,
                                      diff_block_bytes, reorder_bytes))

    def pair_command(self, command: str, primary: str, **fields: Any) -> dict[str, Any]:
        return self.run(P.pair_command(self.d, command, primary, **fields))

    def find_pair(self, primary: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
        if status is not None:
            return P.find_pair(primary, status)
        return self.run(P.pair_of(self.d, primary))

    def wait_pair(self, primary: str, predicate: Callable[[dict[str, Any]], bool], timeout_s: float,
                  what: str) -> dict[str, Any]:
        return self.run(P.wait_pair(self.d, primary, predicate, timeout_s, what, time.monotonic))

    def wait_duplex(self, primary: str, timeout_s: float = 600.0) -> dict[str, Any]:
        return self.wait_pair(primary, lambda p: p["state"] == "duplex", timeout_s,
                              f"pair {primary} to reach duplex")

    # ------------------------------------------------------------------ status
    def status(self, only: list[str] | None = None) -> dict[str, Any]:
        """Everything (CLI.md ``status --json``); ``only``: ask just these nodes, no vvol servers."""
        st = self.run(P.status(self.d, only))
        for n in st["nodes"]:              # the pid of a local daemon, also when it does not answer
            ep = self.cluster.nodes[n["name"]]
            pid = process.read_pid(str(ep.pidfile))
            n["pid"] = n.get("pid") or (pid if process.alive(pid) else None)
            n["nbd"] = ep.nbd
        for srv in st.get("vvol_servers", []):
            ep = self.cluster.vvol_servers[srv["name"]]
            pid = process.read_pid(str(ep.pidfile))
            srv.update(pid=pid if process.alive(pid) else None, control=ep.control)
        return st

    # ------------------------------------------------------------------ verify
    def verify(self, a: str, b: str, wait: bool = True, timeout_s: float = 600.0,
               progress: Callable[[int, int], None] | None = None, piece: int = 1 << 30) -> dict[str, Any]:
        """Wait until replication between ``a`` and ``b`` has drained, then compare contents,
        ``piece`` bytes per request (so a large volume streams, with progress)."""
        if wait:
            self.wait_drained(a, b, timeout_s)
        (na, va), (nb, vb) = parse_volume(a), parse_volume(b)
        sizes = [self.node_request(n, "volume.hash", timeout_s=60, name=v, length=0).fields["size"]
                 for n, v in ((na, va), (nb, vb))]
        if sizes[0] != sizes[1]:
            return {"identical": False, "reason": f"sizes differ: {sizes[0]} vs {sizes[1]}",
                    "differences": []}
        size, diffs, chunks, chunk = sizes[0], [], 0, 0
        for offset in range(0, size, piece):
            ha, hb = (self.node_request(n, "volume.hash", timeout_s=600, name=v, offset=offset, length=piece).fields
                      for n, v in ((na, va), (nb, vb)))
            chunk = ha["chunk"]
            diffs += [offset + i * chunk for i, (x, y) in enumerate(zip(ha["digests"], hb["digests"])) if x != y]
            chunks += len(ha["digests"])
            if progress:
                progress(min(size, offset + piece), size)
        return {"identical": not diffs, "size": size, "chunks": chunks,
                "differing_chunks": len(diffs), "differences": diffs[:10], "chunk_bytes": chunk}

    def verify_online(self, a: str, b: str, repair: bool = False, rate_bytes_s: float = 0.0,
                      timeout_s: float = 600.0, progress: Callable[[dict[str, Any]], None] | None = None
                      ) -> dict[str, Any]:
        """Compare a duplex pair while the host writes; mark (and with ``repair`` resync) what differs."""
        return self.run(P.online_verify(self.d, a, b, time.monotonic, repair=repair, rate_bytes_s=rate_bytes_s,
                                        timeout_s=timeout_s, progress=progress))

    def wait_drained(self, a: str, b: str, timeout_s: float) -> None:
        status = self.status(only=[parse_volume(a)[0], parse_volume(b)[0]])
        pair = next((p for p in status["pairs"] if {p["primary"], p["secondary"]} == {a, b}), None)
        if pair is None:
            return  # not a pair (any more): compare as they are
        primary = pair["primary"]

        def drained(p: dict[str, Any]) -> bool:
            if p["state"] == "suspended" and (p.get("suspend_reason") in T.HELD_SUSPENSIONS
                                              or not p.get("auto_resume", True)):
                raise StateError(f"pair {primary} is suspended ({p.get('suspend_reason')}); "
                                 f"resume it (rcopy pair resume {primary}) or use --no-wait")
            return (p["state"] == "duplex" and p["lag_writes"] == 0 and p["lag_bytes"] == 0
                    and p.get("secondary_consistent", True) is not False)
        self.wait_pair(primary, drained, timeout_s, f"replication {primary} -> {pair['secondary']} to drain")

    # ------------------------------------------------------------------ virtual volumes
    def vvol_create(self, name: str, target: str) -> dict[str, Any]:
        node, vol = parse_volume(target)
        ep = self.cluster.node(node)
        server = self.cluster.vvol_server()
        self.node_start(server.name)
        return self.request(server, "vvol.create", name=name, target=target,
                            target_uri=ep.nbd_uri(vol)).fields

    def vvol_switch(self, name: str, target: str) -> dict[str, Any]:
        node, vol = parse_volume(target)
        ep = self.cluster.node(node)
        return self.request(self.cluster.vvol_server(), "vvol.switch", timeout_s=120, name=name,
                            target=target, target_uri=ep.nbd_uri(vol)).fields

    def vvols(self) -> list[dict[str, Any]]:
        return self.request(self.cluster.vvol_server(), "vvol.list").fields.get("vvols", [])

    def attach(self, name: str) -> str:
        from . import attach
        server = self.cluster.vvol_server()
        if not any(v["name"] == name for v in self.vvols()):
            raise NotFound(f"no virtual volume {name!r} (create it with rcopy vvol create)")
        return attach.attach(name, server.nbd_uri(name), self.cluster.dir)

    def detach(self, name: str) -> None:
        from . import attach
        attach.detach(name, self.cluster.dir)


    # ------------------------------------------------------------------ migration (SPEC 4.1-4.11)
    def migrate(self, source: str, target: str, group: str | None = None, dual_write: bool = False,
                volume_map: dict[str, str] | None = None, wait: bool = True, force: bool = False,
                timeout_s: float = 24 * 3600, rate_limit_bytes_s: int = 0, start: bool = True,
                progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Move primary ``source`` (with ``group``: its whole consistency group) to ``target``."""
        result = self.run(P.migrate(self.d, source, target, group, dual_write, volume_map, force,
                                    rate_limit_bytes_s, start, is_empty=self._is_empty))
        if not start or not wait:
            return result
        final = self.wait_migration(target, timeout_s, progress)       # S706/S707
        result.update(final)
        result["host_pause_ms_max"] = round(max(result["switch_held_ms"], float(final.get("held_ms_max", 0.0))), 1)
        if final["state"] != "done":
            raise StateError(f"migration failed: {final.get('error')}; rcopy migrate {source} --to {target} "
                             f"--resume tries again, --abort gives up")
        return result

    def continue_migration(self, target: str, wait: bool = True, timeout_s: float = 24 * 3600,
                           progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Start (S705) a migration left in THROUGH mode, restart a failed one, or follow a running one."""
        mig = self.run(P.continue_migration(self.d, target))
        return self.wait_migration(target, timeout_s, progress) if wait else mig

    def abort_migration(self, source: str, target: str) -> dict[str, Any]:
        """Abort a migration that has not handed over (THROUGH mode, also after a failed handover)."""
        return self.run(P.abort_migration(self.d, source, target))

    def _is_empty(self, spec: str) -> Any:
        node, vol = P.parse_volume(spec)
        reply = yield P.Ask(node, "volume.hash", {"name": vol, "chunk": 64 << 20}, timeout_s=600)
        return all(d == "0" for d in reply["digests"])

    def wait_migration(self, target: str, timeout_s: float,
                       progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        return self.run(P.wait_migration(self.d, target, timeout_s, time.monotonic, progress))

    def remove(self, node: str) -> dict[str, Any]:
        """S1601-S1604: unregister an old node (or NODE:VOL, one old volume) migrated away."""
        return self.run(P.remove(self.d, node))

    # ------------------------------------------------------------------ running procedures
    def run(self, proc: Any) -> Any:
        """Run a procedure of core/procedures.py with blocking requests and real sleeps."""
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = proc.throw(error) if error is not None else proc.send(value)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                if isinstance(op, P.Ask):
                    value = self._ask(op)
                elif isinstance(op, P.AskAll):
                    value = self._ask_all(op.asks)
                elif isinstance(op, P.Pause):
                    time.sleep(op.seconds)
                else:
                    raise TypeError(f"procedure yielded {op!r}")
            except RcopyError as exc:
                error = exc

    def _ask(self, op: "P.Ask") -> dict[str, Any]:
        return self.request(self.cluster.daemon(op.target), op.kind, op.timeout_s, **op.fields).fields

    def _ask_all(self, asks: list["P.Ask"]) -> list[dict[str, Any] | None]:
        """Ask in parallel, so daemons that are down cost one timeout in total (None for them)."""
        from concurrent.futures import ThreadPoolExecutor

        def one(a: "P.Ask") -> dict[str, Any] | None:
            try:
                return self._ask(a)
            except NodeUnreachable:
                return None
        with ThreadPoolExecutor(max_workers=max(1, len(asks))) as pool:
            return list(pool.map(one, asks))


def _listening(endpoint: str) -> bool:
    """False only if a TCP endpoint actively refuses connections (a quick probe: ZeroMQ
    itself would keep retrying silently until the request times out)."""
    import socket
    if not endpoint.startswith("tcp://"):
        return True
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except ConnectionRefusedError:
        return False
    except (OSError, ValueError):
        return True  # unreachable or slow: let the request and its timeout decide
