"""The task runtime of the core: generators that yield effects and get their results back.

Every multi-step procedure of a node (a host write, a push loop, a migration) is a
plain generator. It yields an ``Effect``; the runtime gives the effect an id and
puts it on the out-list, and the driver (real files and ZeroMQ, or the simulator)
carries it out and reports the result with ``complete(op, result)``. The task then
resumes with that result (or the exception is thrown into it). A ``Wait`` parks a
task until some other code calls ``notify(key)``; a ``Sleep`` becomes a timer.

No threads, no clock: time arrives as ``now`` with every event. One runtime per
node; the driver serialises calls into it.

A driver may also carry out some effects at once, while the core's step runs
(``immediate``): a write to the page cache takes a few microseconds, less than a
round trip through the driver. The task then resumes in the same step, as if the
effect had completed without delay, which is a schedule the simulator also runs (on half
its seeds it sets ``immediate`` too).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Hashable

from ..errors import RcopyError
from .effects import Effect, SetTimer

TaskGen = Generator[Any, Any, Any]
_NOT_A_TIMER = object()
MIN_TIMER_S = 1e-6
DECLINED = object()        # what ``immediate`` returns for an effect it leaves to the driver
IMMEDIATE_PER_STEP = 32    # effects carried out at once per call into the core, so a long batch
                           # does not hold the driver's lock for long


@dataclass(slots=True)
class Wait:
    """Park the task until ``notify(key)``; with ``timeout_s``, resume with False on expiry."""

    key: Hashable
    timeout_s: float | None = None


@dataclass(slots=True)
class Sleep:
    seconds: float


@dataclass(slots=True, eq=False)
class Task:
    id: int
    name: str
    gen: TaskGen
    on_exit: Callable[["Task", BaseException | None, Any], None] | None = None
    token: int = 0          # bumped each time the task parks, so stale wake-ups are ignored
    parked_on: Any = None   # the effect, Wait or Sleep it is parked on (``waiting`` says it in words)
    wait_key: Hashable | None = None
    done: bool = False

    @property
    def waiting(self) -> str:
        """What it waits for (debugging), formatted only when asked: a task parks several times
        per host write."""
        op = self.parked_on
        if op is None:
            return ""
        if isinstance(op, Wait):
            return f"wait {op.key!r}"
        if isinstance(op, Sleep):
            return f"sleep {op.seconds:g}s"
        return type(op).__name__


class TaskFailed(RcopyError):
    """A background task died; carried in status until its supervisor restarts it."""


@dataclass
class Runtime:
    """Runs the tasks of one node core."""

    now: float = 0.0
    out: list[Effect] = field(default_factory=list)
    tasks: dict[int, Task] = field(default_factory=dict)
    _next_task: int = 1
    _next_op: int = 1
    _ops: dict[int, tuple[Task, int, Any]] = field(default_factory=dict)     # op -> (task, token, timer value)
    _keyed: dict[Hashable, list[tuple[Task, int]]] = field(default_factory=dict)
    _ready: deque[tuple[Task, int, Any, BaseException | None]] = field(default_factory=deque)
    _running: bool = False
    dead: bool = False
    steps: int = 0
    # The driver's executor for effects it may carry out at once (its result, or an exception
    # to throw into the task), or DECLINED; None: every effect goes out (the simulator).
    immediate: Callable[[Effect], Any] | None = None
    _immediate_left: int = IMMEDIATE_PER_STEP

    # ------------------------------------------------------------------ public
    def spawn(self, gen: TaskGen, name: str,
              on_exit: Callable[[Task, BaseException | None, Any], None] | None = None) -> Task:
        """Start a task; it runs until its first yield before ``spawn`` returns."""
        if self.dead:
            gen.close()
            return Task(0, name, gen, None, done=True)
        task = Task(self._next_task, name, gen, on_exit)
        self._next_task += 1
        self.tasks[task.id] = task
        self._ready.append((task, task.token, None, None))
        self._run()
        return task

    def emit(self, effect: Effect) -> None:
        """An effect nobody waits for (a reply, a host completion, a log line)."""
        self.out.append(effect)

    def complete(self, op: int, result: Any = None) -> None:
        """The driver finished effect ``op``: resume its task (an exception is thrown into it)."""
        entry = self._ops.pop(op, None)
        if entry is None:
            return  # a task that is gone
        task, token, timer_value = entry
        if timer_value is not _NOT_A_TIMER:
            if token == task.token and task.wait_key is not None:  # a Wait timed out: leave the queue
                waiters = self._keyed.get(task.wait_key, [])
                waiters[:] = [w for w in waiters if w[0] is not task]
                if not waiters:
                    self._keyed.pop(task.wait_key, None)
            result = timer_value
        if isinstance(result, BaseException):
            self._ready.append((task, token, None, result))
        else:
            self._ready.append((task, token, result, None))
        self._run()

    def notify(self, key: Hashable) -> None:
        """Wake every task waiting on ``key`` (they re-check their condition)."""
        waiters = self._keyed.pop(key, None)
        if waiters:
            for task, token in waiters:
                self._ready.append((task, token, True, None))
            self._run()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` (core code outside any task) as one step: the tasks it wakes run after it
        returns, as they would after a task's step, never inside it."""
        if self._running:
            return fn(*args)
        self._running = True
        try:
            result = fn(*args)
        finally:
            self._running = False
        self._run()
        return result

    def take(self) -> list[Effect]:
        """The effects produced since the last call."""
        out, self.out = self.out, []
        return out

    def cancel_all(self) -> None:
        """Drop every task (the process died): nothing is resumed any more."""
        self.dead = True
        self._running = True          # what the tasks' finally clauses wake never runs
        for t in list(self.tasks.values()):
            t.done = True
            t.gen.close()
        self.tasks.clear()
        self._ops.clear()
        self._keyed.clear()
        self._ready.clear()
        self.out.clear()

    # ------------------------------------------------------------------ internals
    def _run(self) -> None:
        if self._running:
            return
        self._running = True
        self._immediate_left = IMMEDIATE_PER_STEP
        try:
            while self._ready:
                task, token, value, exc = self._ready.popleft()
                if task.done or token != task.token:
                    continue
                self._step(task, value, exc)
        finally:
            self._running = False

    def _step(self, task: Task, value: Any, exc: BaseException | None) -> None:
        self.steps += 1
        task.token += 1
        task.parked_on = None
        task.wait_key = None
        try:
            op = task.gen.throw(exc) if exc is not None else task.gen.send(value)
        except StopIteration as stop:
            self._finish(task, None, stop.value)
            return
        except Exception as error:  # noqa: BLE001 - a task's failure is reported, never lost
            self._finish(task, error, None)
            return
        self._park(task, op)

    def _park(self, task: Task, op: Any) -> None:
        token = task.token
        task.parked_on = op
        if isinstance(op, Effect):
            if self.immediate is not None and self._immediate_left > 0:
                result = self.immediate(op)
                if result is not DECLINED:
                    self._immediate_left -= 1
                    if isinstance(result, BaseException):
                        self._ready.append((task, token, None, result))
                    else:
                        self._ready.append((task, token, result, None))
                    return
            op.op = self._next_op
            self._next_op += 1
            self._ops[op.op] = (task, token, _NOT_A_TIMER)
            self.out.append(op)
        elif isinstance(op, Wait):
            self._keyed.setdefault(op.key, []).append((task, token))
            task.wait_key = op.key
            if op.timeout_s is not None:
                self._timer(task, token, op.timeout_s, False)
        elif isinstance(op, Sleep):
            self._timer(task, token, op.seconds, None)
        else:
            self._finish(task, TypeError(f"task {task.name} yielded {op!r}"), None)

    def _timer(self, task: Task, token: int, seconds: float, value: Any) -> None:
        # At least a microsecond: "deadline - now" can round to a timer that fires at ``now``
        # again and again, and the task would never see its deadline pass.
        timer = SetTimer(at=self.now + max(MIN_TIMER_S, seconds))
        timer.op = self._next_op
        self._next_op += 1
        self._ops[timer.op] = (task, token, value)
        self.out.append(timer)

    def _finish(self, task: Task, error: BaseException | None, value: Any) -> None:
        task.done = True
        self.tasks.pop(task.id, None)
        if task.on_exit is not None:
            task.on_exit(task, error, value)
        elif error is not None:
            raise error
