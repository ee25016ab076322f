"""``rcopy sim``: run the deterministic simulator over many seeds, or replay one with its trace."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from multiprocessing import Pool
from typing import Any

from . import Result, run_seed
from .scenario import EXTRA_PROCEDURES, FAULTS, PROCEDURES


def _run(args: tuple[int, tuple[str, ...] | None, tuple[str, ...] | None]) -> Result:
    seed, faults, procedures = args
    r = run_seed(seed, faults, procedures)
    r.trace = r.trace[-60:] if r.violations else []
    return r


def replay_command(seed: int, faults: tuple[str, ...] | None, procedures: tuple[str, ...] | None) -> str:
    cmd = f"rcopy sim --seed {seed}"
    if faults:
        cmd += f" --faults {','.join(faults)}"
    if procedures:
        cmd += f" --procedures {','.join(procedures)}"
    return cmd


def _choices(text: str | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...] | None:
    if not text:
        return None
    out = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in out if x not in allowed]
    if bad:
        raise SystemExit(f"rcopy sim: error: unknown {what} {', '.join(bad)} (choose from {', '.join(allowed)})")
    return out


def main(argv: list[str] | None = None, prog: str = "rcopy sim") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Run the cluster simulator: every seed is one exact run "
                                "of three storage nodes, a virtual volume, a host and the terminal, with faults.")
    p.add_argument("--seeds", type=int, default=10000, help="how many seeds to run (default 10000)")
    p.add_argument("--start", type=int, default=0, help="the first seed (default 0)")
    p.add_argument("--seed", type=int, help="replay this one seed and print its event trace")
    p.add_argument("--faults", help=f"only these fault kinds, comma-separated ({', '.join(FAULTS)})")
    p.add_argument("--procedures", help=f"only these procedures ({', '.join(PROCEDURES)}; and "
                                        f"{', '.join(EXTRA_PROCEDURES)}, not in the default mix)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (default: one per CPU)")
    p.add_argument("--trace", type=int, default=80, help="with --seed: trace lines to print (default 80)")
    p.add_argument("--verbose", action="store_true", help="with --seed: trace every effect of every daemon")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    faults = _choices(args.faults, FAULTS, "fault kinds")
    procedures = _choices(args.procedures, PROCEDURES + EXTRA_PROCEDURES, "procedures")

    if args.seed is not None:
        r = run_seed(args.seed, faults, procedures, keep_trace=True, verbose=args.verbose)
        print("\n".join(r.trace[-args.trace:]))
        print(f"{r.plan}: {r.events} events, {r.checks} checks, {r.host_ops} host requests, "
              f"{r.sim_seconds:.1f} simulated seconds, {len(r.violations)} violation(s)")
        for v in r.violations[:5]:
            print(f"VIOLATION {v}")
        return 1 if r.violations else 0

    t0 = time.monotonic()
    seeds = range(args.start, args.start + args.seeds)
    work = [(s, faults, procedures) for s in seeds]
    totals = {"seeds": 0, "events": 0, "steps": 0, "checks": 0, "host_requests": 0, "simulated_s": 0.0}
    failed: list[Result] = []
    with Pool(max(1, args.jobs)) as pool:
        for r in pool.imap_unordered(_run, work, chunksize=25):
            totals["seeds"] += 1
            totals["events"] += r.events
            totals["steps"] += r.steps
            totals["checks"] += r.checks
            totals["host_requests"] += r.host_ops
            totals["simulated_s"] += r.sim_seconds
            if r.violations:
                failed.append(r)
    elapsed = time.monotonic() - t0
    summary: dict[str, Any] = dict(totals, violations=len(failed), wall_s=round(elapsed, 1),
                                   simulated_s=round(totals["simulated_s"], 1),
                                   failing=[{"seed": r.seed, "plan": r.plan, "violation": r.violations[0],
                                             "replay": replay_command(r.seed, faults, procedures)}
                                            for r in sorted(failed, key=lambda r: r.seed)])
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"rcopy sim: {totals['seeds']} seeds, {totals['events']} events, {totals['steps']} task steps, "
              f"{totals['checks']} invariant checks, {totals['host_requests']} host requests, "
              f"{summary['simulated_s']:.0f} simulated seconds in {elapsed:.0f} s: {len(failed)} violation(s)")
        for r in sorted(failed, key=lambda r: r.seed)[:20]:
            print(f"  {r.plan}\n    {r.violations[0]}\n    replay: {replay_command(r.seed, faults, procedures)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
