"""``rcopy``: the command-line management terminal (see shared CLI.md for the contract).

Every command prints a result (JSON with ``--json``) and exits non-zero with a
one-line ``rcopy: error: ...`` on failure; never a traceback for a user mistake
or an unreachable node.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .cluster import find_cluster_file, load, parse_size
from .errors import RcopyError, UsageError
from . import prometheus
from .prometheus import AlertTargets
from .terminal import Terminal


def _terminal(args: argparse.Namespace) -> Terminal:
    return Terminal(find_cluster_file(args.cluster))


def _emit(args: argparse.Namespace, obj: Any, text: str | None = None) -> None:
    if getattr(args, "json", False) or text is None:
        print(json.dumps(obj, indent=2, default=str))
    else:
        print(text)


def _progress(args: argparse.Namespace):
    def show(msg: str) -> None:
        if not getattr(args, "json", False) or sys.stderr.isatty():
            print(f"rcopy: {msg}", file=sys.stderr, flush=True)
    return show


# ---------------------------------------------------------------------- commands
def cmd_node(args: argparse.Namespace) -> int:
    term = _terminal(args)
    if args.action == "start":
        r = term.node_start(args.node)
        _emit(args, r, f"{args.node}: {'started' if r['started'] else 'already running'} (pid {r['pid']})")
    else:
        r = term.node_stop(args.node)
        _emit(args, r, f"{args.node}: {'stopped' if r['stopped'] else 'was not running'}")
    return 0


def cmd_volume(args: argparse.Namespace) -> int:
    if args.action == "delete":
        r = _terminal(args).volume_delete(args.volume)
        _emit(args, r, f"deleted {args.volume} (its file is gone)")
        return 0
    if not args.size:
        raise UsageError("rcopy volume create needs --size (e.g. 512M, 4G)")
    r = _terminal(args).volume_create(args.volume, parse_size(args.size))
    _emit(args, r, f"created {args.volume} ({r['size']} bytes)")
    return 0


def cmd_pair(args: argparse.Namespace) -> int:
    term = _terminal(args)
    if args.action == "create":
        r = term.pair_create(args.primary, args.secondary, args.mode, args.group, args.transfer,
                             parse_size(args.journal_size) if args.journal_size else None,
                             auto_resume=not args.no_auto_resume,
                             diff_block_bytes=parse_size(args.diff_block) if args.diff_block else None,
                             reorder_bytes=parse_size(args.reorder_buffer) if args.reorder_buffer else None)
        if args.wait:
            r = term.wait_duplex(args.primary)
        _emit(args, r, f"pair {args.primary} -> {args.secondary} ({args.mode}): {r['state']}")
    elif args.action == "delete":
        r = term.pair_command("delete", args.primary, force=args.force)
        _emit(args, r, f"pair of {args.primary} deleted")
    else:
        r = term.pair_command(args.action, args.primary)
        _emit(args, r, f"pair of {args.primary}: {r.get('state')}")
    return 0


def cmd_vvol(args: argparse.Namespace) -> int:
    r = _terminal(args).vvol_create(args.name, args.target)
    _emit(args, r, f"virtual volume {args.name} -> {args.target}")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    device = _terminal(args).attach(args.name)
    _emit(args, {"name": args.name, "device": device}, device)
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    _terminal(args).detach(args.name)
    _emit(args, {"name": args.name, "detached": True}, f"{args.name} detached")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch:
        from . import watch
        if args.json:
            raise UsageError("--watch draws a live screen; for JSON use rcopy status --json (once)")
        if not 0.2 <= args.interval <= 3600:
            raise UsageError(f"--interval {args.interval:g}: give 0.2 to 3600 seconds")
        term = _terminal(args)
        return watch.run(term.status, str(term.cluster.path), args.interval)
    st = _terminal(args).status()
    if args.json:
        _emit(args, st)
        return 0
    lines = ["NODES"]
    for n in st["nodes"]:
        lines.append(f"  {n['name']:<10} {'up' if n['up'] else 'DOWN':<5} pid={n['pid']}  {n['control']}")
    lines.append("VOLUMES")
    for v in st["volumes"]:
        lines.append(f"  {v['node']}:{v['name']:<8} {v['size'] / 2**20:>8.0f} MiB  {v['role']:<9} "
                     f"rw_mode={v['rw_mode']}" + ("" if v.get("consistent", True) else "  (inconsistent)"))
    lines.append("PAIRS")
    for p in st["pairs"]:
        lines.append(f"  {p['primary']} -> {p['secondary']}  {p['mode']:<5} group={p['group']} "
                     f"state={p['state']} lag={p['lag_writes']} writes/{p['lag_bytes']} bytes/{p.get('lag_seconds', 0):.1f}s "
                     + (f"applied={p['applied_seq']} journal={p['journal_used_bytes'] / 2**20:.1f}MiB "
                        if p["mode"] == "async" else "")
                     + (f"throttled={p['throttle_ms']:g}ms " if p.get("throttle_ms") else "") +
                     f"valid={p['copy_source_valid']}" + (f"  ({p['suspend_reason']})" if p.get("suspend_reason") else ""))
    if st["migrations"]:
        lines.append("MIGRATIONS")
        for m in st["migrations"]:
            lines.append(f"  {m['source']} -> {m['target']}  mode={m['mode']} phase={m.get('phase')} "
                         f"migrated={m['migrated_fraction']:.1%} state={m['state']}")
    if st.get("vvols"):
        lines.append("VIRTUAL VOLUMES")
        for v in st["vvols"]:
            lines.append(f"  {v['name']} -> {v['target']}")
    print("\n".join(lines))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.repair and not args.online:
        raise UsageError("--repair goes with --online")
    if args.online:
        return _verify_online(args)
    tty = sys.stderr.isatty()

    def show(done: int, size: int) -> None:
        if size > 1 << 30 and not args.json:      # more than one request: say how far it is
            line = f"rcopy: verify {args.a} {args.b}: {done / size:.0%} ({done >> 20} of {size >> 20} MiB)"
            print("\r" + line.ljust(79) if tty else line, end="" if tty and done < size else "\n",
                  file=sys.stderr, flush=True)
    r = _terminal(args).verify(args.a, args.b, wait=not args.no_wait, timeout_s=args.timeout, progress=show)
    if r["identical"]:
        _emit(args, r, f"{args.a} and {args.b} are identical ({r['size']} bytes)")
        return 0
    _emit(args, r, f"{args.a} and {args.b} differ: {r.get('reason') or ''}"
                   f"{r.get('differing_chunks', '')} chunk(s), first at offsets {r['differences']}")
    return 1


def _verify_online(args: argparse.Namespace) -> int:
    text = str(args.rate or "0").strip()
    try:        # a bare number is MiB/s; with a unit, bytes per second like migrate --rate (50M, 1G)
        rate = float(text) * 2**20 if text.replace(".", "", 1).isdigit() else float(parse_size(text))
    except (UsageError, ValueError):
        raise UsageError(f"--rate: {text!r} is not a rate (MiB/s, or bytes per second like 50M)") from None
    tty = sys.stderr.isatty()
    shown = {"tenth": -1}

    def show(r: dict) -> None:
        line = (f"rcopy: verify {r['primary']} -> {r['secondary']}: {r['checked_bytes'] / r['size']:.0%} "
                f"({r['checked_bytes'] >> 20} of {r['size'] >> 20} MiB), {len(r['different'])} different")
        tenth = r["checked_bytes"] * 10 // r["size"]
        if tty:
            print("\r" + line.ljust(79), end="", file=sys.stderr, flush=True)
        elif not args.json and tenth != shown["tenth"]:
            print(line, file=sys.stderr, flush=True)
        shown["tenth"] = tenth
    r = _terminal(args).verify_online(args.a, args.b, repair=args.repair, rate_bytes_s=rate,
                                      timeout_s=args.timeout, progress=show)
    if tty:
        print(file=sys.stderr)
    rate = r["checked_bytes"] / 2**20 / max(r["seconds"], 1e-3)
    text = (f"{r['primary']} and {r['secondary']}: {r['checked_bytes']} bytes compared online in {r['seconds']} s "
            f"({rate:.0f} MiB/s)")
    if r["dirty"]:
        text += f"; {len(r['dirty'])} chunk(s) skipped, already marked for the resync"
    if r["busy"]:
        text += f"; {len(r['busy'])} chunk(s) kept changing and were not compared (run it again)"
    if r["identical"]:
        _emit(args, r, text + ": no difference")
        return 0
    first = ", ".join(str(o) for o in r["different"][:10])
    text += (f": {len(r['different'])} chunk(s) of {r['chunk_bytes']} bytes differ (first at offsets {first}); "
             + ("resynchronised, the pair is " + r["state"] if r.get("repaired") else
                f"marked for the resync, the pair is {r['state']}: rcopy pair resume {r['primary']} repairs them"))
    _emit(args, r, text)
    return 1


def cmd_migrate(args: argparse.Namespace) -> int:
    term = _terminal(args)
    volume_map = {}
    for item in args.map or []:
        src, sep, dst = item.partition("=")
        if not sep:
            raise UsageError(f"--map takes SRC_VOL=DST_VOL, got {item!r}")
        volume_map[src] = dst
    show = _migration_progress(args)
    if args.abort:
        r = term.abort_migration(args.source, args.to)
        _emit(args, r, f"migration {args.source} -> {args.to} aborted; {args.source} is the primary")
        return 0
    if args.resume:
        r = term.continue_migration(args.to, wait=not args.no_wait, progress=show)
        _emit(args, r, f"migration {args.source} -> {args.to}: {r['state']}")
        return 0 if r["state"] in ("done", "running") else 1
    r = term.migrate(args.source, args.to, group=args.group, dual_write=args.dual_write,
                     volume_map=volume_map, wait=not args.no_wait, force=args.force, progress=show,
                     rate_limit_bytes_s=parse_size(args.rate) if args.rate else 0)
    if sys.stderr.isatty() and not args.json:
        print(file=sys.stderr)
    if args.no_wait:
        _emit(args, r, f"migration {args.source} -> {args.to} started; follow it with rcopy status")
    else:
        _emit(args, r, f"migrated {args.source} -> {args.to}: {r['state']}; longest host pause "
                       f"{r['host_pause_ms_max']} ms (path switch {r['switch_held_ms']} ms, "
                       f"handover {r.get('handover_ms', 0)} ms)")
    return 0


def _migration_progress(args: argparse.Namespace):
    tty = sys.stderr.isatty()
    last = {"line": ""}

    def show(m: dict) -> None:
        rate = m.get("rate_bytes_s") or 0
        line = (f"rcopy: migrating {m.get('source')} -> {m.get('target')}: phase {m.get('phase')}, "
                f"{(m.get('migrated_fraction') or 0):.0%} migrated, {rate / 2**20:.0f} MiB/s"
                + (f", waiting for {m['waiting_for']}" if m.get("waiting_for") else ""))
        if tty:
            print("\r" + line.ljust(100), end="", file=sys.stderr, flush=True)
        elif line.split(",")[0:2] != last["line"].split(",")[0:2]:
            print(line, file=sys.stderr, flush=True)
        last["line"] = line
    return show


def cmd_remove(args: argparse.Namespace) -> int:
    r = _terminal(args).remove(args.node)
    _emit(args, r, f"{args.node} unregistered ({', '.join(r['unregistered']) or 'no volumes'})")
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    from . import lab
    if args.action == "up":
        r = lab.up(Path(args.dir), mode=args.mode, size=parse_size(args.size), netns=args.netns, tls=args.tls,
                   progress=_progress(args), wan_rate=args.wan_rate, wan_delay_ms=args.wan_delay)
        print(json.dumps(r, indent=2))
    else:
        r = lab.down(Path(args.dir))
        _emit(args, r, f"lab in {r['dir']} is down")
    return 0


def cmd_monitoring(args: argparse.Namespace) -> int:
    if args.action == "rules":
        text = prometheus.rules(AlertTargets(
            job=args.job, rpo_seconds=args.rpo, rpo_for=args.rpo_for, not_duplex_for=args.not_duplex_for,
            journal_high_water=args.journal_high_water, journal_for=args.journal_for, phase_for=args.phase_for,
            progress_window=args.progress_window, node_down_for=args.node_down_for))
    elif args.action == "scrape-config":
        text = prometheus.scrape_config(load(find_cluster_file(args.cluster)), job=args.job,
                                        interval=args.interval, rule_files=args.rules)
    else:
        from . import dashboard
        text = dashboard.render()
    if args.out:
        try:
            Path(args.out).write_text(text)
        except OSError as exc:
            raise UsageError(f"cannot write {args.out}: {exc}") from None
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from . import keys
    directory = Path(args.dir)
    curve = keys.generate(directory)
    psk = keys.generate_tls_psk(directory) if args.tls else None
    r = {"keys": str(curve), "tls_psk": str(psk) if psk else None}
    _emit(args, r, f"CURVE keys in {curve}" + (f", NBD TLS PSK {psk}" if psk else "")
          + f"; put keys = \"{curve.resolve()}\" in the cluster file and copy the directory to every node")
    return 0


def cmd_fault(args: argparse.Namespace) -> int:
    from . import netlab
    lab_dir = Path(args.dir)
    if args.action in netlab.SIGNALS:
        cluster = Path(args.cluster) if args.cluster else lab_dir / "cluster.toml"
        if not cluster.is_file():
            raise UsageError(f"no cluster file {cluster} (use --dir LABDIR or --cluster FILE)")
        r = netlab.signal_node(cluster, args.node, args.action)
        _emit(args, r, f"{args.node} (pid {r['pid']}): {r['signal']}")
        return 0
    if args.action == "cut":
        r = netlab.cut(lab_dir)
    elif args.action == "heal":
        r = netlab.heal(lab_dir)
    elif args.action == "throttle":
        r = netlab.throttle(lab_dir, args.rate)
    elif args.action == "delay":
        r = netlab.delay(lab_dir, args.ms)
    else:
        r = netlab.wan_status(lab_dir)
    _emit(args, r, f"WAN link of lab {r['id']}: {r['wan']}, rate {r['rate']}, delay {r['delay_ms']:g} ms")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import report, timeline
    out = Path(args.out)
    if args.migrate:
        if not args.device:
            raise UsageError("--migrate needs --device (the attached host device to put load on)")
        source, target = args.migrate
        data, _ = timeline.record_migration(_terminal(args), source, target, args.device,
                                            out.with_suffix(".logs"), iodepth=args.iodepth,
                                            rate_limit_bytes_s=parse_size(args.rate) if args.rate else 0)
        out.with_suffix(".json").write_text(json.dumps(data))
    elif args.timeline:
        try:
            data = json.loads(Path(args.timeline).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read timeline {args.timeline}: {exc}") from None
    else:
        raise UsageError("give a TIMELINE.json to draw, or --migrate SOURCE TARGET --device DEV to record one")
    png = report.plot(data, out)
    _emit(args, {"png": str(png), "samples": len(data["samples"])}, f"wrote {png}")
    return 0


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rcopy", description="Remote copy for block volumes with live migration.")
    p.add_argument("--cluster", help="cluster file (default: $RCOPY_CLUSTER or ./cluster.toml)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.set_defaults(func=func)
        sp.add_argument("--json", action="store_true", help="print JSON")
        return sp

    sp = command("node", cmd_node, "start or stop a storage node (or the vvol server)")
    sp.add_argument("action", choices=["start", "stop"])
    sp.add_argument("node")

    sp = command("volume", cmd_volume, "create a volume, or delete one that is in no pair or migration")
    sp.add_argument("action", choices=["create", "delete"])
    sp.add_argument("volume", metavar="NODE:VOL")
    sp.add_argument("--size", help="create: e.g. 512M, 4G")

    sp = command("pair", cmd_pair, "create, suspend, resume or delete a remote-copy pair")
    psub = sp.add_subparsers(dest="action", required=True)
    c = psub.add_parser("create")
    c.add_argument("primary", metavar="PRIMARY")
    c.add_argument("secondary", metavar="SECONDARY")
    c.add_argument("--mode", choices=["sync", "async"], required=True)
    c.add_argument("--group", help="consistency group (async; default: the primary volume's name)")
    c.add_argument("--transfer", choices=["push", "pull"], default="push")
    c.add_argument("--journal-size", help="journal capacity for a new async group (default 256M)")
    c.add_argument("--reorder-buffer", help="memory the secondary may hold for a new async group's entries "
                                            "that wait for a gap (default 256M; 1M to 16G)")
    c.add_argument("--diff-block", help="bytes the diff bitmap tracks per bit while suspended or copying "
                                        "(default 4K; 512 up to the 1M region)")
    c.add_argument("--wait", action="store_true", help="return when the initial copy is done")
    c.add_argument("--no-auto-resume", action="store_true",
                   help="after a link failure or full journal, stay suspended until rcopy pair resume")
    for action in ("suspend", "resume", "delete"):
        a = psub.add_parser(action)
        a.add_argument("primary", metavar="PRIMARY")
        if action == "delete":
            a.add_argument("--force", action="store_true", help="delete even if the secondary is down")
    for a in psub.choices.values():
        a.add_argument("--json", action="store_true", help="print JSON")

    sp = command("vvol", cmd_vvol, "create a virtual volume")
    sp.add_argument("action", choices=["create"])
    sp.add_argument("name")
    sp.add_argument("--target", required=True, metavar="NODE:VOL")

    sp = command("attach", cmd_attach, "attach a virtual volume as a local block device")
    sp.add_argument("name")
    sp = command("detach", cmd_detach, "detach a virtual volume")
    sp.add_argument("name")

    sp = command("migrate", cmd_migrate, "move a primary to a new volume while hosts keep writing")
    sp.add_argument("source", metavar="SOURCE")
    sp.add_argument("--to", required=True, metavar="TARGET")
    sp.add_argument("--group", help="move every primary of this consistency group together")
    sp.add_argument("--map", action="append", metavar="SRC_VOL=DST_VOL",
                    help="target volume of another group member (default: same name on the target node)")
    sp.add_argument("--dual-write", action="store_true", help="also write the source during migration")
    sp.add_argument("--no-wait", action="store_true")
    sp.add_argument("--force", action="store_true", help="allow a target that holds data")
    sp.add_argument("--rate", help="limit the background copy, bytes per second (e.g. 100M)")
    sp.add_argument("--resume", action="store_true", help="continue a migration that stopped (node restart)")
    sp.add_argument("--abort", action="store_true", help="abort a migration that has not handed over yet")

    sp = command("remove", cmd_remove, "unregister an old node after its primaries were migrated away "
                                       "(NODE:VOL: one old volume, after a migration inside its node)")
    sp.add_argument("node", metavar="NODE[:VOL]")

    sp = command("status", cmd_status, "nodes, volumes, pairs, migrations")
    sp.add_argument("--watch", action="store_true",
                    help="a live view (pairs, lag, journals, migrations) redrawn until Ctrl-C")
    sp.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                    help="with --watch: seconds between refreshes (default %(default)g)")

    sp = command("verify", cmd_verify, "wait for replication to drain, then compare two volumes; "
                                       "--online: compare a pair while the host writes")
    sp.add_argument("a", metavar="VOLUME")
    sp.add_argument("b", metavar="VOLUME")
    sp.add_argument("--no-wait", action="store_true")
    sp.add_argument("--online", action="store_true",
                    help="compare a duplex pair under load, in replication order; mark what differs for the resync")
    sp.add_argument("--repair", action="store_true", help="with --online: resync what differs right away")
    sp.add_argument("--rate", default="0", help="with --online: at most this much per second: MiB/s, or "
                                                "with a unit like migrate --rate (50M, 1G); 0: no limit")
    sp.add_argument("--timeout", type=float, default=600.0)

    sp = command("lab", cmd_lab, "start or stop a complete three-site lab on this machine")
    sp.add_argument("action", choices=["up", "down"])
    sp.add_argument("--dir", default="rcopy-lab")
    sp.add_argument("--mode", choices=["sync", "async"], default="async")
    sp.add_argument("--size", default="1G")
    sp.add_argument("--netns", action="store_true", help="each site in its own network namespace")
    sp.add_argument("--tls", action="store_true", help="hosts reach the virtual volume over NBD with TLS (PSK)")
    sp.add_argument("--wan-rate", default="200mbit", help="with --netns: rate limit of the WAN link (tc syntax)")
    sp.add_argument("--wan-delay", type=float, metavar="MS",
                    help="with --netns: one-way latency of the WAN link in ms (changeable later with rcopy fault delay)")

    sp = command("fault", cmd_fault, "inject a fault into a lab: WAN cut/heal/throttle, kill/pause/resume a node")
    fsub = sp.add_subparsers(dest="action", required=True)
    fault_help = {"cut": "take the WAN link down (--netns lab)", "heal": "bring the WAN link back up",
                  "throttle": "change the WAN rate limit", "delay": "change the WAN latency (lab up --wan-delay)",
                  "show": "the WAN link's state",
                  "kill": "kill -9 a node by its PID file", "pause": "SIGSTOP a node",
                  "resume": "SIGCONT a paused node"}
    for action, text in fault_help.items():
        a = fsub.add_parser(action, help=text)
        if action in ("kill", "pause", "resume"):
            a.add_argument("node", metavar="NODE")
        if action == "throttle":
            a.add_argument("--rate", required=True, help="e.g. 10mbit, 500kbit")
        if action == "delay":
            a.add_argument("--ms", type=float, required=True, help="one-way latency in milliseconds, e.g. 20")
        a.add_argument("--dir", default="rcopy-lab", help="the lab's directory (default ./rcopy-lab)")
        a.add_argument("--json", action="store_true", help="print JSON")

    sp = command("monitoring", cmd_monitoring, "Prometheus alert rules and scrape config, a Grafana dashboard")
    msub = sp.add_subparsers(dest="action", required=True)
    defaults = AlertTargets()
    r = msub.add_parser("rules", help="the alert rules (YAML) for your targets")
    r.add_argument("--rpo", type=float, default=defaults.rpo_seconds, metavar="SECONDS",
                   help="RcopyRpoAboveTarget: replication lag above this (default %(default)g)")
    for name, text in (("rpo_for", "RcopyRpoAboveTarget: lag above the RPO this long"),
                       ("not_duplex_for", "RcopyPairNotDuplex: a pair copying or suspended this long"),
                       ("journal_for", "RcopyJournalHighWater: journal above the mark this long"),
                       ("phase_for", "RcopyMigrationPhaseStuck: a migration in one phase this long ..."),
                       ("progress_window", "... with no background-copy progress in this window"),
                       ("node_down_for", "RcopyNodeDown: a node's scrape failing this long")):
        r.add_argument("--" + name.replace("_", "-"), default=getattr(defaults, name), metavar="DURATION",
                       help=f"{text} (default %(default)s)")
    r.add_argument("--journal-high-water", type=float, default=defaults.journal_high_water, metavar="FRACTION",
                   help="RcopyJournalHighWater: journal use above this fraction (default %(default)g)")
    c = msub.add_parser("scrape-config", help="a prometheus.yml scraping every node of the cluster file")
    c.add_argument("--interval", default="15s", help="scrape and evaluation interval (default %(default)s)")
    c.add_argument("--rules", action="append", metavar="FILE", help="a rule file to load (repeatable)")
    for a in (r, c):
        a.add_argument("--job", default=defaults.job, help="the scrape job of the rcopy nodes (default %(default)s)")
    msub.add_parser("dashboard", help="the Grafana dashboard (JSON, import it in Grafana)")
    for a in msub.choices.values():
        a.add_argument("--out", metavar="FILE", help="write to FILE instead of standard output")

    sp = command("keys", cmd_keys, "generate the cluster's CURVE keys (and an NBD TLS PSK) into a directory")
    sp.add_argument("dir", metavar="DIR", help="e.g. /var/lib/rcopy/keys (existing keys are kept)")
    sp.add_argument("--tls", action="store_true", help="also a PSK file for NBD over TLS")

    sp = command("report", cmd_report, "draw a PNG timeline of a migration under load")
    sp.add_argument("timeline", nargs="?", help="a timeline JSON (from --migrate or scripts/bench)")
    sp.add_argument("--migrate", nargs=2, metavar=("SOURCE", "TARGET"),
                    help="record one: migrate SOURCE to TARGET while fio writes to --device")
    sp.add_argument("--device", help="with --migrate: the host device (from rcopy attach / lab up)")
    sp.add_argument("--iodepth", type=int, default=4)
    sp.add_argument("--rate", help="with --migrate: background copy rate limit per second, e.g. 64M")
    sp.add_argument("--out", default="migration.png", help="the PNG (default migration.png)")

    sub.add_parser("check", help="crash-consistency writer and checker (rcopy check write|check -h)")
    sub.add_parser("sim", help="run the deterministic cluster simulator (rcopy sim -h)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:  # the checker has its own parser (rcopy check write|check ...)
        from . import blockwriter
        return blockwriter.main(argv[1:], prog="rcopy check")
    if argv[:1] == ["sim"]:
        from .sim import cli as sim_cli
        return sim_cli.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RcopyError as exc:
        print(f"rcopy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rcopy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
