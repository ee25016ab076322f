"""The deterministic cluster simulator: the real cores, a fake disk and network, seeded faults.

``rcopy sim --seeds N`` runs N seeds; a failing seed prints the one-line command
that replays it exactly, with its event trace. See scenario.py for what a seed
does and checks.py for what is checked after every step.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Result:
    seed: int
    plan: str
    events: int = 0
    checks: int = 0
    steps: int = 0
    host_ops: int = 0
    violations: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    sim_seconds: float = 0.0


def run_seed(seed: int, faults: tuple[str, ...] | None = None, procedures: tuple[str, ...] | None = None,
             keep_trace: bool = False, verbose: bool = False) -> Result:
    from .scenario import Run, plan
    p = plan(seed, faults, procedures)
    run = Run(p)
    run.w.verbose = verbose
    if verbose:
        run.w.trace_max = 200000
    try:
        run.run()
    except Exception as exc:  # noqa: BLE001 - a crash of the run is a violation of its seed
        import traceback
        if not run.w.violations:
            run.w.violation(f"the run raised {type(exc).__name__}: {exc}")
        run.w.log(traceback.format_exc())
    w = run.w
    steps = sum(d.core.rt.steps for d in w.daemons.values() if d.core is not None and hasattr(d.core, "rt"))
    return Result(seed, p.line(), w.events, run.checker.checks, steps,
                  sum(h.completed for h in run.hosts), list(w.violations),
                  list(w.trace) if (keep_trace or w.violations) else [], w.now)
