"""The management terminal (SPEC 1.5): everything the CLI does, as an importable API.

``Terminal`` reads the cluster file, talks to nodes and the virtual-volume server
over ZeroMQ and starts or stops their processes. The CLI is a thin layer on it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from . import process, wire
from .cluster import Cluster, Endpoint, load, parse_volume
from .keys import load as load_keys
from .errors import NodeUnreachable, NotFound, RcopyError, StateError, UsageError
from .transport import ClientPool

STATUS_TIMEOUT_S = 2.0
NBDKIT_THREADS = 8


class Terminal:
    """Drive one cluster: nodes, volumes, pairs, virtual volumes, migrations."""

    def __init__(self, cluster: Cluster | Path | str) -> None:
        self.cluster = cluster if isinstance(cluster, Cluster) else load(Path(cluster))
        self.keys = load_keys(self.cluster.keys) if self.cluster.keys else None
        self.clients = ClientPool(timeout_s=30.0, keys=self.keys)

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
                                   logfile=str(ep.logfile), threads=NBDKIT_THREADS, extra_args=tls,
                                   netns=ep.netns)

        def ready() -> bool:
            if not process.alive(pid):
                raise RcopyError(f"{name} exited during start-up; see {ep.logfile} and "
                                 f"{ep.state}/node.log: {process.tail(str(ep.logfile))}")
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

    def pair_create(self, primary: str, secondary: str, mode: str, group: str | None = None,
                    transfer: str = "push", journal_bytes: int | None = None,
                    auto_resume: bool = True) -> dict[str, Any]:
        pnode, pvol = parse_volume(primary)
        if parse_volume(secondary)[0] == pnode:
            raise UsageError("primary and secondary must be on different nodes")
        return self.node_request(pnode, "pair.create", volume=pvol, secondary=self.peer_entry(secondary),
                                 mode=mode, group=group, transfer=transfer,
                                 journal_bytes=journal_bytes, auto_resume=auto_resume).fields

    def pair_command(self, command: str, primary: str, **fields: Any) -> dict[str, Any]:
        node, vol = parse_volume(primary)
        return self.node_request(node, f"pair.{command}", volume=vol, **fields).fields

    def find_pair(self, primary: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
        if status is None:  # ask only the primary's node, then add what its secondary knows
            pnode = parse_volume(primary)[0]
            self.cluster.node(pnode)
            pair = self.find_pair(primary, self.status(only=[pnode]))
            snode = parse_volume(pair["secondary"])[0]
            if snode in self.cluster.nodes:
                return self.find_pair(primary, self.status(only=[pnode, snode]))
            return pair
        for p in status["pairs"]:
            if p["primary"] == primary:
                return p
        raise NotFound(f"{primary} is not the primary of any pair")

    def wait_pair(self, primary: str, predicate: Callable[[dict[str, Any]], bool], timeout_s: float,
                  what: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            try:
                pair = self.find_pair(primary)
            except NodeUnreachable:
                return None
            return pair if predicate(pair) else None
        return process.wait_until(check, timeout_s, what, interval_s=0.1)

    def wait_duplex(self, primary: str, timeout_s: float = 600.0) -> dict[str, Any]:
        return self.wait_pair(primary, lambda p: p["state"] == "duplex", timeout_s,
                              f"pair {primary} to reach duplex")

    # ------------------------------------------------------------------ status
    def status(self, only: list[str] | None = None) -> dict[str, Any]:
        """Everything (CLI.md ``status --json``); ``only``: ask just these nodes, no vvol servers."""
        out: dict[str, Any] = {"nodes": [], "volumes": [], "pairs": [], "groups": [], "migrations": [],
                               "vvols": []}
        nodes = {n: ep for n, ep in self.cluster.nodes.items() if only is None or n in only}
        servers = self.cluster.vvol_servers if only is None else {}
        replies = self._ask_all([*nodes.values(), *servers.values()])
        for name, ep in nodes.items():
            pid = process.read_pid(str(ep.pidfile))
            entry = {"name": name, "up": False, "pid": pid if process.alive(pid) else None,
                     "control": ep.control, "nbd": ep.nbd}
            st = replies.get(name)
            if st is None:
                out["nodes"].append(entry)
                continue
            entry.update(up=True, pid=st["pid"])
            out["nodes"].append(entry)
            for v in st["volumes"]:
                v["nbd_uri"] = ep.nbd_uri(v["name"])
                out["volumes"].append(v)
            out["pairs"] += st["pairs"]
            out["groups"] += [dict(g, node=name) for g in st["groups"]]
            out["migrations"] += st["migrations"]
        secondaries = {f"{v['node']}:{v['name']}": v for v in out["volumes"]}
        for p in out["pairs"]:
            sec = secondaries.get(p["secondary"])
            if sec is not None:
                p["copy_source_valid"] = sec.get("copy_source_valid") or p["copy_source_valid"]
                p["secondary_consistent"] = sec.get("consistent")
        for name, ep in servers.items():
            reply = replies.get(name)
            vv, up = (reply.get("vvols", []), True) if reply is not None else ([], False)
            pid = process.read_pid(str(ep.pidfile))
            out.setdefault("vvol_servers", []).append(
                {"name": name, "up": up, "pid": pid if process.alive(pid) else None, "control": ep.control})
            out["vvols"] += [dict(v, server=name) for v in vv]
        return out

    def _ask_all(self, daemons: list[Endpoint]) -> dict[str, dict[str, Any] | None]:
        """Status of every daemon, asked in parallel so down ones cost one timeout in total."""
        from concurrent.futures import ThreadPoolExecutor

        def ask(ep: Endpoint) -> dict[str, Any] | None:
            try:
                kind = "status" if ep.kind == "node" else "vvol.list"
                return self.request(ep, kind, timeout_s=STATUS_TIMEOUT_S).fields
            except NodeUnreachable:
                return None
        with ThreadPoolExecutor(max_workers=max(1, len(daemons))) as pool:
            return dict(zip([d.name for d in daemons], pool.map(ask, daemons)))

    # ------------------------------------------------------------------ verify
    def verify(self, a: str, b: str, wait: bool = True, timeout_s: float = 600.0) -> dict[str, Any]:
        """Wait until replication between ``a`` and ``b`` has drained, then compare contents."""
        if wait:
            self.wait_drained(a, b, timeout_s)
        (na, va), (nb, vb) = parse_volume(a), parse_volume(b)
        ha = self.node_request(na, "volume.hash", timeout_s=600, name=va).fields
        hb = self.node_request(nb, "volume.hash", timeout_s=600, name=vb).fields
        if ha["size"] != hb["size"]:
            return {"identical": False, "reason": f"sizes differ: {ha['size']} vs {hb['size']}",
                    "differences": []}
        chunk = ha["chunk"]
        diffs = [i * chunk for i, (x, y) in enumerate(zip(ha["digests"], hb["digests"])) if x != y]
        return {"identical": not diffs, "size": ha["size"], "chunks": len(ha["digests"]),
                "differing_chunks": len(diffs), "differences": diffs[:10], "chunk_bytes": chunk}

    def wait_drained(self, a: str, b: str, timeout_s: float) -> None:
        status = self.status(only=[parse_volume(a)[0], parse_volume(b)[0]])
        pair = next((p for p in status["pairs"] if {p["primary"], p["secondary"]} == {a, b}), None)
        if pair is None:
            return  # not a pair (any more): compare as they are
        primary = pair["primary"]

        def drained(p: dict[str, Any]) -> bool:
            if p["state"] == "suspended":
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
        snode, svol = parse_volume(source)
        tnode, tvol = parse_volume(target)
        if snode == tnode:
            raise UsageError("source and target must be on different nodes")
        status = self.status()
        down = [n["name"] for n in status["nodes"] if n["name"] in (snode, tnode) and not n["up"]]
        if down:
            raise NodeUnreachable(f"node(s) {', '.join(down)} are down; start them first")
        if any(m["state"] == "running" for m in status["migrations"]):
            raise StateError("a migration is already running; see rcopy status")
        pairs = {p["primary"]: p for p in status["pairs"]}
        if source not in pairs:
            raise StateError(f"{source} is not a remote-copy primary; only primaries are migrated")
        pair = pairs[source]
        vols = {f"{v['node']}:{v['name']}": v for v in status["volumes"]}
        if vols[source].get("frozen"):
            raise StateError(f"{source} has already been migrated away")
        members = [source]
        if pair["mode"] == "async":
            in_group = [p["primary"] for p in status["pairs"]
                        if p["group"] == pair["group"] and p["primary"].startswith(snode + ":")
                        and not vols[p["primary"]].get("frozen")]
            if group is None and len(in_group) > 1:
                raise UsageError(f"{source} shares consistency group {pair['group']} with "
                                 f"{', '.join(m for m in in_group if m != source)}; migrate them "
                                 f"together with --group {pair['group']}")
            if group is not None and group != pair["group"]:
                raise UsageError(f"{source} is in group {pair['group']}, not {group}")
            members = sorted(in_group, key=lambda m: m != source)
        mapping = {source: target}
        for m in members[1:]:
            mvol = parse_volume(m)[1]
            mapping[m] = f"{tnode}:{(volume_map or {}).get(mvol, mvol)}"
        secondary_node = parse_volume(pair["secondary"])[0]
        if not next((n["up"] for n in status["nodes"] if n["name"] == secondary_node), False):
            raise NodeUnreachable(f"secondary node {secondary_node} is down; remote copy must be running")
        for src in mapping:
            sec = vols.get(pairs[src]["secondary"], {})
            if str(sec.get("copy_source_valid") or "1") != "1":
                raise StateError(f"secondary {pairs[src]['secondary']} still has the source of an earlier "
                                 f"migration (copy_source_valid={sec['copy_source_valid']}); finish that one "
                                 f"with rcopy remove OLD-NODE first")
        spec = []
        for src, dst in mapping.items():
            if dst not in vols:
                raise NotFound(f"target volume {dst} does not exist (rcopy volume create {dst} "
                               f"--size {vols[src]['size']})")
            t = vols[dst]
            if t["size"] != vols[src]["size"]:
                raise UsageError(f"target {dst} has {t['size']} bytes but {src} has {vols[src]['size']}; "
                                 f"create the target with the same size")
            if t["role"] != "simplex" or t["rw_mode"] != "normal":
                raise StateError(f"target {dst} is in use ({t['role']}, {t['rw_mode']})")
            if not force and not self._is_empty(dst):
                raise StateError(f"target {dst} is not empty; use --force to overwrite it")
            spec.append({"target": parse_volume(dst)[1], "size": t["size"],
                         "source": self.peer_entry(src), "secondary": self.peer_entry(pairs[src]["secondary"])})
        # S603/S604 and S701: register the paths, V2 -> THROUGH.
        self.node_request(tnode, "mig.prepare_target", members=spec, group=pair["group"], dual_write=dual_write)
        try:
            for src, dst in mapping.items():
                self.node_request(snode, "mig.prepare_source", volume=parse_volume(src)[1],
                                  target=self.peer_entry(dst), rate_limit_bytes_s=rate_limit_bytes_s)
                self.node_request(secondary_node, "mig.add_source", volume=parse_volume(pairs[src]["secondary"])[1],
                                  source=self.peer_entry(dst))
            switched = []
            held_ms = 0.0
            for vv in status["vvols"]:                                  # S702-S704
                if vv["target"] in mapping:
                    r = self.vvol_switch(vv["name"], mapping[vv["target"]])
                    switched.append(vv["name"])
                    held_ms = max(held_ms, float(r.get("held_ms", 0.0)))
        except RcopyError:
            self._undo_prepare(tnode, [s["target"] for s in spec], mapping)
            raise
        result = {"source": source, "target": target, "members": mapping, "vvols_switched": switched,
                  "switch_held_ms": round(held_ms, 1), "state": "running"}
        if not start:  # stop in THROUGH mode; continue later with continue_migration()
            return result
        self.node_request(tnode, "mig.start")                          # S705
        if not wait:
            return result
        final = self.wait_migration(target, timeout_s, progress)       # S706/S707
        result.update(final)
        result["host_pause_ms_max"] = round(max(held_ms, float(final.get("held_ms_max", 0.0))), 1)
        if final["state"] != "done":
            raise StateError(f"migration failed: {final.get('error')}")
        return result

    def continue_migration(self, target: str, wait: bool = True, timeout_s: float = 24 * 3600,
                           progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Start (S705) a migration left in THROUGH mode, or just follow a running one."""
        tnode = parse_volume(target)[0]
        migs = [m for m in self.node_request(tnode, "status")["migrations"] if m["target"] == target]
        if not migs:
            raise NotFound(f"no migration to {target}")
        if migs[0]["mode"] == "through" and migs[0]["state"] == "running":
            self.node_request(tnode, "mig.start")
        return self.wait_migration(target, timeout_s, progress) if wait else migs[0]

    def abort_migration(self, source: str, target: str) -> dict[str, Any]:
        """Abort a migration that has not handed over yet (THROUGH mode): everything back to V1."""
        tnode, tvol = parse_volume(target)
        migs = [m for m in self.node_request(tnode, "status")["migrations"] if m["target"] == target]
        if not migs:
            raise NotFound(f"no migration to {target}")
        if migs[0]["mode"] != "through":
            raise StateError(f"the migration to {target} is past the handover ({migs[0]['phase']}); it cannot "
                             f"be aborted without losing the new primary's writes: resume it with "
                             f"rcopy migrate {source} --to {target} --resume")
        pair = self.find_pair(source)
        self._undo_prepare(tnode, [tvol], {source: target})
        snode, svol = parse_volume(source)
        self.node_request(snode, "mig.abort_source", volume=svol)
        secnode, secvol = parse_volume(pair["secondary"])
        self.node_request(secnode, "mig.drop_source", volume=secvol, source_node=tnode)
        return {"source": source, "target": target, "state": "aborted"}

    def _is_empty(self, spec: str) -> bool:
        node, vol = parse_volume(spec)
        digests = self.node_request(node, "volume.hash", timeout_s=600, name=vol, chunk=64 << 20)["digests"]
        return all(d == "0" for d in digests)

    def _undo_prepare(self, tnode: str, targets: list[str], mapping: dict[str, str]) -> None:
        back = {v: k for k, v in mapping.items()}
        for vv in self.status()["vvols"]:
            if vv["target"] in back:
                try:
                    self.vvol_switch(vv["name"], back[vv["target"]])
                except RcopyError:
                    pass
        try:
            self.node_request(tnode, "mig.abort_target", volumes=targets)
        except RcopyError:
            pass

    def wait_migration(self, target: str, timeout_s: float,
                       progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        tnode = parse_volume(target)[0]
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                migs = [m for m in self.node_request(tnode, "status", timeout_s=5)["migrations"]
                        if m["target"] == target]
            except NodeUnreachable:
                migs = []
                if progress:
                    progress(dict(last, waiting_for=f"{tnode} is not answering"))
            if migs:
                last = migs[0]
                if progress:
                    progress(last)
                if last["state"] in ("done", "failed"):
                    return last
            time.sleep(0.25)
        raise StateError(f"migration to {target} did not finish within {timeout_s:g} s")

    def remove(self, node: str) -> dict[str, Any]:
        """S1601-S1604: unregister an old node whose primaries were all migrated away."""
        self.cluster.node(node)
        status = self.status()
        if not next(n["up"] for n in status["nodes"] if n["name"] == node):
            raise NodeUnreachable(f"{node} is down; start it so its paths can be unregistered")
        for vv in status["vvols"]:
            if vv["target"].startswith(node + ":"):
                raise StateError(f"virtual volume {vv['name']} still maps to {vv['target']}")
        removed = []
        for v in status["volumes"]:
            if v["node"] != node:
                continue
            label = f"{node}:{v['name']}"
            if v["role"] == "primary" and not v.get("migrated_to"):
                raise StateError(f"{label} is still a primary; migrate it first (rcopy migrate {label} --to ...)")
            if v.get("migrated_to") and not (v.get("drained") and v.get("complete")):
                raise StateError(f"{label} still has undrained or unmigrated data; wait for the migration")
        for m in status["migrations"]:
            if m["source"].startswith(node + ":") and m["state"] != "done":
                raise StateError(f"migration {m['source']} -> {m['target']} is {m['state']}")
        for v in status["volumes"]:
            if v["node"] != node or not v.get("migrated_to"):
                continue
            label = f"{node}:{v['name']}"
            pair = self.find_pair(label, status)
            snode, svol = parse_volume(pair["secondary"])
            self.node_request(snode, "mig.remove_source", volume=svol, source_node=node)       # S1601
            tnode, tvol = parse_volume(v["migrated_to"])
            self.node_request(tnode, "mig.clear_target", volume=tvol)                   # S1602 (1)
            self.node_request(node, "mig.unregister_source", volume=v["name"])          # S1602 (2),(3)
            removed.append(label)
        return {"node": node, "unregistered": removed}


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
