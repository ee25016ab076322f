"""The management terminal's procedures (SPEC 1.5, 4.1-4.3, 4.11) as generators, without I/O.

A procedure yields ``Ask`` (one request to a daemon), ``AskAll`` (several, in
parallel; a daemon that does not answer gives None) and ``Pause`` (a polling
delay), and gets the replies back. ``replicator.terminal.Terminal`` runs them
with ZeroMQ and real sleeps; the simulator runs the same generators on its
network and clock.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator

from ..errors import NodeUnreachable, NotFound, RcopyError, StateError, UsageError
from . import tables as T


@dataclass(slots=True)
class Ask:
    """A request to daemon ``target`` (a node or a vvol server); the reply's fields come back."""

    target: str
    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None


@dataclass(slots=True)
class AskAll:
    asks: list[Ask]


@dataclass(slots=True)
class Pause:
    seconds: float


Proc = Generator[Any, Any, Any]


def parse_volume(spec: str) -> tuple[str, str]:
    node, sep, vol = str(spec).partition(":")
    if not sep or not node or not vol:
        raise UsageError(f"volume must be NODE:VOLUME, got {spec!r}")
    return node, vol


@dataclass
class Directory:
    """What a procedure needs to know of the cluster file."""

    nodes: dict[str, str]                      # node -> control endpoint
    vvol_servers: list[str] = field(default_factory=list)
    nbd_uri: Callable[[str, str], str] = lambda node, vol: f"nbd://{node}/{vol}"
    timeout_s: float = 30.0                    # a request without a timeout of its own

    def node(self, name: str) -> str:
        if name not in self.nodes:
            raise NotFound(f"no node {name!r} in the cluster file (nodes: {', '.join(sorted(self.nodes))})")
        return self.nodes[name]

    def peer(self, spec: str) -> dict[str, str]:
        node, vol = parse_volume(spec)
        return {"node": node, "control": self.node(node), "volume": vol}

    @property
    def vvol_server(self) -> str:
        if not self.vvol_servers:
            raise NotFound("the cluster file names no virtual-volume server")
        return self.vvol_servers[0]


# ---------------------------------------------------------------------- status
def status(d: Directory, only: list[str] | None = None) -> Proc:
    """Everything (CLI.md ``status --json``); ``only``: ask just these nodes, no vvol servers."""
    out: dict[str, Any] = {"nodes": [], "volumes": [], "pairs": [], "groups": [], "migrations": [], "vvols": []}
    nodes = [n for n in d.nodes if only is None or n in only]
    servers = d.vvol_servers if only is None else []
    replies = yield AskAll([Ask(n, "status", timeout_s=2.0) for n in nodes] +
                           [Ask(s, "vvol.list", timeout_s=2.0) for s in servers])
    for name, st in zip(nodes, replies[:len(nodes)]):
        entry: dict[str, Any] = {"name": name, "up": st is not None, "control": d.nodes[name]}
        out["nodes"].append(entry)
        if st is None:
            continue
        entry["pid"] = st.get("pid")
        entry["task_errors"] = st.get("task_errors") or {}
        for v in st["volumes"]:
            v["nbd_uri"] = d.nbd_uri(name, v["name"])
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
    for name, reply in zip(servers, replies[len(nodes):]):
        out.setdefault("vvol_servers", []).append({"name": name, "up": reply is not None,
                                                   "control": d.nodes.get(name, "")})
        out["vvols"] += [dict(v, server=name) for v in (reply or {}).get("vvols", [])]
    return out


def find_pair(primary: str, st: dict[str, Any]) -> dict[str, Any]:
    for p in st["pairs"]:
        if p["primary"] == primary:
            return p
    raise NotFound(f"{primary} is not the primary of any pair")


def pair_of(d: Directory, primary: str) -> Proc:
    """The pair of ``primary``, with what its secondary knows."""
    pnode = parse_volume(primary)[0]
    d.node(pnode)
    st = yield from status(d, only=[pnode])
    pair = find_pair(primary, st)
    snode = parse_volume(pair["secondary"])[0]
    if snode in d.nodes:
        st = yield from status(d, only=[pnode, snode])
        pair = find_pair(primary, st)
    return pair


def wait_pair(d: Directory, primary: str, predicate: Callable[[dict[str, Any]], bool], timeout_s: float,
              what: str, clock: Callable[[], float]) -> Proc:
    deadline = clock() + timeout_s
    while True:
        try:
            pair = yield from pair_of(d, primary)
            if predicate(pair):
                return pair
        except NodeUnreachable:
            pass
        if clock() >= deadline:
            raise StateError(f"timed out after {timeout_s:g} s waiting for {what}")
        yield Pause(0.1)


# ---------------------------------------------------------------------- pairs
def pair_create(d: Directory, primary: str, secondary: str, mode: str, group: str | None = None,
                transfer: str = "push", journal_bytes: int | None = None, auto_resume: bool = True,
                diff_block_bytes: int | None = None, reorder_bytes: int | None = None) -> Proc:
    pnode, pvol = parse_volume(primary)
    if parse_volume(secondary)[0] == pnode:
        raise UsageError("primary and secondary must be on different nodes")
    reply = yield Ask(pnode, "pair.create", {"volume": pvol, "secondary": d.peer(secondary), "mode": mode,
                                             "group": group, "transfer": transfer,
                                             "journal_bytes": journal_bytes, "auto_resume": auto_resume,
                                             "diff_block_bytes": diff_block_bytes,
                                             "reorder_bytes": reorder_bytes})
    return reply


def pair_command(d: Directory, command: str, primary: str, **fields: Any) -> Proc:
    node, vol = parse_volume(primary)
    d.node(node)
    reply = yield Ask(node, f"pair.{command}", dict(fields, volume=vol))
    return reply


# ---------------------------------------------------------------------- migration (SPEC 4.1-4.11)
def migrate(d: Directory, source: str, target: str, group: str | None = None, dual_write: bool = False,
            volume_map: dict[str, str] | None = None, force: bool = False, rate_limit_bytes_s: int = 0,
            start: bool = True, is_empty: Callable[[str], Proc] | None = None) -> Proc:
    """S501-S502 up to S705: check, register the paths, switch the host paths, start program 203.
    Source and target may be volumes of one node (SPEC 1.7, a move to another pool of it)."""
    snode, _ = parse_volume(source)
    tnode, _ = parse_volume(target)
    if source == target:
        raise UsageError(f"{source} cannot be migrated onto itself")
    d.node(snode), d.node(tnode)
    st = yield from status(d)
    down = [n["name"] for n in st["nodes"] if n["name"] in (snode, tnode) and not n["up"]]
    if down:
        raise NodeUnreachable(f"node(s) {', '.join(down)} are down; start them first")
    if any(m["state"] in (T.RUNNING, T.FAILED) for m in st["migrations"]):
        raise StateError("a migration is already running (or failed and waiting for --resume or --abort); "
                         "see rcopy status")
    pairs = {p["primary"]: p for p in st["pairs"]}
    if source not in pairs:
        raise StateError(f"{source} is not a remote-copy primary; only primaries are migrated")
    pair = pairs[source]
    vols = {f"{v['node']}:{v['name']}": v for v in st["volumes"]}
    if vols[source].get("frozen"):
        raise StateError(f"{source} has already been migrated away")
    members = [source]
    if pair["mode"] == "async":
        in_group = [p["primary"] for p in st["pairs"]
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
        if mapping[m] == m:
            raise UsageError(f"{m} would migrate onto itself: name its target with --map {mvol}=NEW")
    secondary_node = parse_volume(pair["secondary"])[0]
    if not next((n["up"] for n in st["nodes"] if n["name"] == secondary_node), False):
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
        if not force and is_empty is not None and not (yield from is_empty(dst)):
            raise StateError(f"target {dst} is not empty; use --force to overwrite it")
        spec.append({"target": parse_volume(dst)[1], "size": t["size"],
                     "source": d.peer(src), "secondary": d.peer(pairs[src]["secondary"])})
    mid = f"{source}->{target}"
    # S603/S604 and S701: register the paths, V2 -> THROUGH.
    yield Ask(tnode, "mig.prepare_target", {"members": spec, "group": pair["group"],
                                            "dual_write": dual_write, "id": mid})
    switched: list[str] = []
    held_ms = 0.0
    try:
        for src, dst in mapping.items():
            yield Ask(snode, "mig.prepare_source", {"volume": parse_volume(src)[1], "target": d.peer(dst),
                                                    "rate_limit_bytes_s": rate_limit_bytes_s, "id": mid})
            yield Ask(secondary_node, "mig.add_source", {"volume": parse_volume(pairs[src]["secondary"])[1],
                                                         "source": d.peer(dst)})
        for vv in st["vvols"]:                                         # S702-S704
            if vv["target"] in mapping:
                r = yield from vvol_switch(d, vv["name"], mapping[vv["target"]])
                switched.append(vv["name"])
                held_ms = max(held_ms, float(r.get("held_ms", 0.0)))
    except RcopyError:
        yield from undo_prepare(d, tnode, [s["target"] for s in spec], mapping, snode, secondary_node, pairs)
        raise
    result = {"source": source, "target": target, "members": mapping, "vvols_switched": switched,
              "switch_held_ms": round(held_ms, 1), "state": "running", "id": mid}
    if start:
        yield Ask(tnode, "mig.start", {"id": mid})                      # S705
    return result


def vvol_switch(d: Directory, name: str, target: str) -> Proc:
    node, vol = parse_volume(target)
    d.node(node)
    reply = yield Ask(d.vvol_server, "vvol.switch", {"name": name, "target": target,
                                                     "target_uri": d.nbd_uri(node, vol)}, timeout_s=120)
    return reply


def undo_prepare(d: Directory, tnode: str, targets: list[str], mapping: dict[str, str], snode: str,
                 secondary_node: str, pairs: dict[str, Any]) -> Proc:
    """Everything back to V1 after a migration that could not start (or was aborted)."""
    back = {v: k for k, v in mapping.items()}
    st = yield from status(d)
    for vv in st["vvols"]:
        if vv["target"] in back:
            try:
                yield from vvol_switch(d, vv["name"], back[vv["target"]])
            except RcopyError:
                pass
    for ask in ([Ask(tnode, "mig.abort_target", {"volumes": targets})] +
                [Ask(snode, "mig.abort_source", {"volume": parse_volume(s)[1]}) for s in mapping] +
                [Ask(secondary_node, "mig.drop_source", {"volume": parse_volume(pairs[s]["secondary"])[1],
                                                         "source_node": tnode,
                                                         "source_volume": parse_volume(mapping[s])[1]})
                 for s in mapping]):
        try:
            yield ask
        except RcopyError:
            pass


def migration_of(d: Directory, target: str) -> Proc:
    tnode = parse_volume(target)[0]
    st = yield Ask(tnode, "status", timeout_s=5.0)
    migs = [m for m in st["migrations"] if m["target"] == target]
    if not migs:
        raise NotFound(f"no migration to {target}")
    return migs[0]


def wait_migration(d: Directory, target: str, timeout_s: float, clock: Callable[[], float],
                   progress: Callable[[dict[str, Any]], None] | None = None) -> Proc:
    """S706/S707: poll until the target reports done or failed."""
    deadline = clock() + timeout_s
    last: dict[str, Any] = {}
    while clock() < deadline:
        try:
            last = yield from migration_of(d, target)
            if progress:
                progress(last)
            if last["state"] in (T.DONE, T.FAILED, T.ABORTED):
                return last
        except NodeUnreachable:
            if progress:
                progress(dict(last, waiting_for=f"{parse_volume(target)[0]} is not answering"))
        yield Pause(0.25)
    raise StateError(f"migration to {target} did not finish within {timeout_s:g} s")


def continue_migration(d: Directory, target: str) -> Proc:
    """Start (S705) a migration left in THROUGH mode, or restart one whose handover failed. The
    registrations (S603, S604) and path switches (S704) are done again first: each is idempotent,
    and a migrate that was cut short may not have done them all."""
    tnode = parse_volume(target)[0]
    mig = yield from migration_of(d, target)
    if mig["mode"] == T.THROUGH and mig["state"] in (T.RUNNING, T.FAILED):
        mapping = dict(mig.get("members") or {mig["source"]: target})
        snode = parse_volume(mig["source"])[0]
        st = yield from status(d)
        pairs = {p["primary"]: p for p in st["pairs"]}
        for src, dst in mapping.items():
            if src not in pairs:
                raise StateError(f"{src} is no longer a remote-copy primary; abort this migration "
                                 f"(rcopy migrate {mig['source']} --to {target} --abort)")
            yield Ask(snode, "mig.prepare_source", {"volume": parse_volume(src)[1], "target": d.peer(dst),
                                                    "id": mig.get("id")})
            snd, svol = parse_volume(pairs[src]["secondary"])
            yield Ask(snd, "mig.add_source", {"volume": svol, "source": d.peer(dst)})
        for vv in st["vvols"]:
            if vv["target"] in mapping:
                yield from vvol_switch(d, vv["name"], mapping[vv["target"]])
        yield Ask(tnode, "mig.start", {"id": mig.get("id")})
    return mig


def abort_migration(d: Directory, source: str, target: str) -> Proc:
    """Abort a migration that has not handed over (THROUGH mode, also after a failed handover)."""
    tnode = parse_volume(target)[0]
    mig = yield from migration_of(d, target)
    if mig["phase"] != T.THROUGH:
        raise StateError(f"the migration to {target} is past the handover ({mig['phase']}); it cannot "
                         f"be aborted without losing the new primary's writes: resume it with "
                         f"rcopy migrate {source} --to {target} --resume")
    mapping = dict(mig.get("members") or {source: target})
    snode = parse_volume(source)[0]
    pairs = {}
    for src in mapping:
        pairs[src] = yield from pair_of(d, src)
    yield from undo_prepare(d, tnode, [parse_volume(t)[1] for t in mapping.values()], mapping, snode,
                            parse_volume(pairs[source]["secondary"])[0], pairs)
    return {"source": source, "target": target, "state": T.ABORTED}


def remove(d: Directory, node: str) -> Proc:
    """S1601-S1604: unregister an old node whose primaries were all migrated away, or, given as
    NODE:VOL, one old volume migrated away from it (a migration inside one node)."""
    node, only = (node.split(":", 1) + [""])[:2]
    d.node(node)

    def label_of(name: str) -> str:
        return f"{node}:{name}"

    def mine(label: str) -> bool:
        return label == label_of(only) if only else label.startswith(node + ":")
    st = yield from status(d)
    if not next(n["up"] for n in st["nodes"] if n["name"] == node):
        raise NodeUnreachable(f"{node} is down; start it so its paths can be unregistered")
    vols = [v for v in st["volumes"] if v["node"] == node and (not only or v["name"] == only)]
    if only and not vols:
        raise NotFound(f"no volume {node}:{only}")
    if only and not vols[0].get("migrated_to"):
        raise StateError(f"{node}:{only} was not migrated away; nothing to remove")
    for vv in st["vvols"]:
        if mine(vv["target"]):
            raise StateError(f"virtual volume {vv['name']} still maps to {vv['target']}")
    for v in vols:
        label = label_of(v["name"])
        if v["role"] == "primary" and not v.get("migrated_to"):
            raise StateError(f"{label} is still a primary; migrate it first (rcopy migrate {label} --to ...)")
        if v.get("migrated_to") and not (v.get("drained") and v.get("complete")):
            raise StateError(f"{label} still has undrained or unmigrated data; wait for the migration")
    for m in st["migrations"]:
        if any(mine(s) for s in m.get("members", {m["source"]: m["target"]})) and m["state"] != T.DONE:
            raise StateError(f"migration {m['source']} -> {m['target']} is {m['state']}")
    removed = []
    for v in vols:
        if not v.get("migrated_to"):
            continue
        label = label_of(v["name"])
        pair = find_pair(label, st)
        snode, svol = parse_volume(pair["secondary"])
        yield Ask(snode, "mig.remove_source", {"volume": svol, "source_node": node,          # S1601
                                               "source_volume": v["name"]})
        tnode, tvol = parse_volume(v["migrated_to"])
        yield Ask(tnode, "mig.clear_target", {"volume": tvol})                             # S1602 (1)
        yield Ask(node, "mig.unregister_source", {"volume": v["name"]})                    # S1602 (2),(3)
        removed.append(label)
    return {"node": node, "unregistered": removed}


# ---------------------------------------------------------------------- online verify
def online_verify(d: Directory, a: str, b: str, clock: Callable[[], float], repair: bool = False,
                  regions: int = 256, rate_bytes_s: float = 0.0, timeout_s: float = 600.0,
                  progress: Callable[[dict[str, Any]], None] | None = None, request_timeout_s: float = 120.0) -> Proc:
    """Compare a duplex pair while the host writes (core/verify.py); mark what differs in its diff
    bitmap (the pair is suspended for that) and, with ``repair``, resync it and wait for duplex."""
    na, nb = parse_volume(a)[0], parse_volume(b)[0]
    st = yield from status(d, only=[na, nb])
    pair = next((p for p in st["pairs"] if {p["primary"], p["secondary"]} == {a, b}), None)
    if pair is None:
        raise StateError(f"{a} and {b} are not a remote-copy pair; compare them with rcopy verify "
                         f"(without --online)")
    primary = pair["primary"]
    pnode, pvol = parse_volume(primary)
    size = next(v["size"] for v in st["volumes"] if v["node"] == pnode and v["name"] == pvol)
    out: dict[str, Any] = {"primary": primary, "secondary": pair["secondary"], "size": size, "checked_bytes": 0,
                           "same_bytes": 0, "different": [], "busy": [], "dirty": [], "flapped": 0,
                           "chunk_bytes": 0, "started": clock()}
    offset = 0
    while offset < size:
        asked = clock()
        r = yield Ask(pnode, "verify.regions", {"volume": pvol, "offset": offset, "regions": regions},
                      timeout_s=request_timeout_s)
        for k in ("different", "busy", "dirty"):
            out[k] += r[k]
        out["same_bytes"] += r["same"]
        out["flapped"] += r["flapped"]
        out["chunk_bytes"] = r["chunk_bytes"]
        out["checked_bytes"] += r["bytes"]
        offset = r["end"]
        if progress:
            progress(out)
        if rate_bytes_s > 0 and r["bytes"] / rate_bytes_s > clock() - asked:
            yield Pause(r["bytes"] / rate_bytes_s - (clock() - asked))
    out["seconds"] = round(clock() - out.pop("started"), 3)
    out["identical"] = not out["different"]
    if out["different"]:
        chunk = out["chunk_bytes"]
        reply = yield Ask(pnode, "verify.mark", {
            "volume": pvol, "ranges": [[o, min(chunk, size - o)] for o in out["different"]]})
        out["marked_bytes"] = reply["dirty_bytes"]
        out["state"] = reply["state"]
        if repair:
            yield from pair_command(d, "resume", primary)
            done = yield from wait_pair(d, primary, lambda p: p["state"] == T.DUPLEX, timeout_s,
                                        f"the resync of {primary}", clock)
            out["state"] = done["state"]
            out["repaired"] = True
    return out
