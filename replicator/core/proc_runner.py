"""Run a terminal procedure (procedures.py) inside a Runtime: Ask becomes a Call effect.

The simulator's terminal is such a runtime; each procedure is one task.
"""
from __future__ import annotations

from typing import Any, Generator

from .. import wire
from ..errors import NodeUnreachable, RcopyError
from .effects import Call
from .procedures import Ask, AskAll, Directory, Pause
from .runtime import Runtime, Sleep, Wait


def drive(rt: Runtime, d: Directory, proc: Generator[Any, Any, Any]) -> Generator[Any, Any, Any]:
    """A task that runs ``proc``, turning its requests into effects; returns its result."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = proc.throw(error) if error is not None else proc.send(value)
        except StopIteration as stop:
            return stop.value
        value, error = None, None
        try:
            if isinstance(op, Ask):
                value = yield from _ask(d, op)
            elif isinstance(op, AskAll):
                value = yield from _ask_all(rt, d, op.asks)
            elif isinstance(op, Pause):
                yield Sleep(op.seconds)
            else:
                raise TypeError(f"procedure yielded {op!r}")
        except RcopyError as exc:
            error = exc


def _ask(d: Directory, op: Ask) -> Generator[Any, Any, dict[str, Any]]:
    endpoint = d.nodes.get(op.target, op.target)
    reply = yield Call(op.target, endpoint, wire.Message(op.kind, op.fields), op.timeout_s or d.timeout_s)
    return wire.raise_if_error(reply).fields


def _ask_all(rt: Runtime, d: Directory, asks: list[Ask]) -> Generator[Any, Any, list[Any]]:
    results: list[Any] = [None] * len(asks)
    left = [len(asks)]
    key = ("askall", id(results))

    def one(i: int, a: Ask) -> Generator[Any, Any, None]:
        try:
            results[i] = yield from _ask(d, a)
        except NodeUnreachable:
            results[i] = None
        finally:
            left[0] -= 1
            rt.notify(key)

    for i, a in enumerate(asks):
        rt.spawn(one(i, a), f"ask-{a.target}", on_exit=lambda t, e, v: None)
    while left[0]:
        yield Wait(key)
    return results
