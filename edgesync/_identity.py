"""What a task is called and which one it is: its name (never its arguments) and its id.

Rule: every log line, event and ``TaskInfo`` that mentions a task names it through
``task_name`` and identifies it through ``format_id``; nothing formats a task's
``repr``, because a ``repr`` carries argument values (an email address, a token)
into the logs: ``functools.partial(<function send>, 'alice@example.com')``.

Ids are ``<pid>-<n>``: short, unique within a process and, through the pid, among
the workers of one server. The counter is read with ``next()``, atomic under the
GIL, and formatted only when something reports the task. A durable task's id is its
durable id instead (a string, the same in every process that runs it: see
``_recovery``), kept as is.

Log lines start with ``worker <pid>:`` in a gunicorn worker and ``process <pid>:``
elsewhere (``who``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
from bisect import bisect_left
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Generic, List, Optional, ParamSpec, Tuple, TypeVar, Union, overload

if TYPE_CHECKING:
    from ._durable import DurableFunction

P = ParamSpec("P")
T = TypeVar("T")

#: Success lines (see ``Successes``) go to a child of the ``edgesync`` logger, so an
#: app can silence them (``logging.getLogger("edgesync.tasks").setLevel(logging.WARNING)``)
#: or ask for each one (``setLevel(logging.DEBUG)``) and keep every state-change line.
task_log = logging.getLogger("edgesync.tasks")

_ids = itertools.count(1)
_pid = os.getpid()
_role = "process"  # "worker" once a gunicorn worker says so (set_role)
_who = "process %d" % _pid

#: The attribute of a Future that holds its task's number (see ``task_id``).
FUTURE_ATTR = "_edgesync_task_seq"


#: A new task number, unique in this process (the bound method: no Python frame per task).
next_seq: Callable[[], int] = _ids.__next__


def format_id(seq: Union[int, str]) -> str:
    """``<pid>-<n>`` for a task number, or a durable id as it is."""
    return seq if isinstance(seq, str) else "%d-%d" % (_pid, seq)


def who() -> str:
    """How log lines name this process: ``worker <pid>`` in a gunicorn worker, else ``process <pid>``."""
    return _who


def set_role(role: str) -> None:
    """``"worker"``: this process is a gunicorn worker (log lines say ``worker <pid>``)."""
    global _role, _who
    _role = role
    _who = "%s %d" % (role, os.getpid())


def mark(future: Future[Any], seq: Union[int, str]) -> None:
    """Make ``task_id(future)`` answer ``seq``'s id."""
    try:
        setattr(future, FUTURE_ATTR, seq)
    except AttributeError:  # a Future subclass with __slots__: the id is in the logs only
        pass


def task_id(future: Future[Any]) -> str:
    """The id of the task behind a future returned by ``edgesync.wait_until``, e.g. ``"4242-17"``.

    The same id appears in every log line about the task (success, failure,
    abandoned, cancelled) and in ``TaskInfo.id`` of ``event.pending_tasks``. For a
    durable task it is its durable id (``"d4f1c09a2b7e35c1ae"``): the journal row, the
    RQ job id and every log line about it, in every process that runs it, unchanged
    across re-runs and retries; it never raises for a future that ``wait_until``
    returned, wherever the task went (the journal, RQ). Raises ``ValueError`` for a
    future that ``wait_until`` did not return.
    """
    seq = getattr(future, FUTURE_ATTR, None)
    if type(seq) is str:
        return seq
    if not isinstance(seq, int):
        raise ValueError("edgesync.task_id(%s): not a future returned by edgesync.wait_until; "
                         "pass the future that wait_until returned" % _type_name(future))
    return format_id(seq)


_DECORATOR: Any = object()  # named(name) without fn: a decorator


class Named(Generic[P, T]):
    """A callable that runs ``fn`` and is reported under ``name`` (see ``edgesync.named``)."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Callable[P, T]):
        self.name = name
        self.fn = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return "<edgesync.named %r: %s>" % (self.name, task_name(self.fn))


@overload
def named(name: str) -> Callable[[Callable[P, T]], Named[P, T]]: ...
@overload
def named(name: str, fn: DurableFunction[P, T]) -> DurableFunction[P, T]: ...  # type: ignore[overload-overlap]
@overload
def named(name: str, fn: Callable[P, T]) -> Named[P, T]: ...


def named(name: str, fn: Any = _DECORATOR) -> Any:
    """Give a task a name for the logs, events and metrics: ``wait_until(named("send-welcome", send), email)``.

    Without ``fn`` it is a decorator: ``@edgesync.named("send-welcome")``. The
    result calls ``fn`` with the same arguments; the name takes no keyword of the
    task's own, so it never collides with them. A durable function (alone or in a
    ``functools.partial``) stays durable: the result is the durable function under
    that name. Raises ``TypeError`` unless ``name`` is a non-empty string and ``fn``
    is callable.
    """
    if not isinstance(name, str) or not name:
        raise TypeError("edgesync.named(name, fn): name must be a non-empty string, got %s"
                        % ("''" if name == "" else _type_name(name)))

    def wrap(target: Callable[P, T]) -> Any:
        if not callable(target):
            raise TypeError("edgesync.named(%r, fn): fn must be callable (a function, a coroutine "
                            "function or a method), got %s" % (name, _type_name(target)))
        from ._durable import unwrap  # (here: _durable imports what imports this module)
        found = unwrap(target, (), {})
        if found is not None:
            durable_fn, args, kwargs = found
            renamed = durable_fn.renamed(name)
            return functools.partial(renamed, *args, **kwargs) if type(target) is functools.partial else renamed
        return Named(name, target)

    return wrap if fn is _DECORATOR else wrap(fn)


def task_name(obj: Any) -> str:
    """How a task is named in reports: a user's ``named`` name, else ``module.qualname``.

    A ``functools.partial`` is named after the function it wraps, plus ``(partial)``;
    a coroutine after its function; an object without a name after its type,
    plus ``object``. Never a ``repr``, never an argument value.
    """
    if isinstance(obj, Named):
        return obj.name
    suffix = ""
    while isinstance(obj, functools.partial):
        obj, suffix = obj.func, " (partial)"
    name = _str_attr(obj, "__qualname__") or _str_attr(obj, "__name__")
    if name is None:
        return _type_name(obj) + " object" + suffix
    module = _str_attr(obj, "__module__")
    if module is None:  # a coroutine: its function's module is its frame's
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None)
        module = frame.f_globals.get("__name__") if frame is not None else None
    return ("%s.%s" % (module, name) if isinstance(module, str) else name) + suffix


def _str_attr(obj: Any, attr: str) -> Optional[str]:
    try:
        value = getattr(obj, attr, None)
    except Exception:  # a misbehaving __getattr__: fall back to the type name
        return None
    return value if isinstance(value, str) else None


def _type_name(obj: Any) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else "%s.%s" % (t.__module__, t.__qualname__)


class Successes:
    """What the success lines say: each success at DEBUG, and one INFO line per ``interval`` seconds.

    Celery logs every success at INFO; at thousands of tasks per second that line,
    at gunicorn's default level, costs more than the tasks (measured: 22% of a
    server's throughput at 6 workers on 16 cores). So each success is a DEBUG line (``task NAME succeeded in
    0.020s, id=...``), and the INFO line is one summary per interval that had any:
    ``N tasks succeeded in the last 60.0s (p50 ..., p99 ..., max ...: NAME, id=...)``,
    the slowest named. ``interval`` 0 logs every success at INFO instead, and no summary.

    Rule: no lock. The pool's threads ``add`` and the monitor and the unload ``take``
    at once, each changing the shared state in one step (``_invocation``'s rule: a
    run of bytecode with no call in it, which no other Python thread interleaves):
    an ``add`` counts a success and, if it is the slowest, makes it the max in one
    step, and a ``take`` claims everything counted and starts the next summary in
    one, so every success is in exactly one summary, and a summary's max is one of
    its successes. ``add`` and ``take`` return a due summary, which the caller logs
    with ``log_summary``. Percentiles come from a histogram of durations whose
    buckets are 2**(1/4) apart: each is the upper bound of its bucket (at most 19%
    above the true value, never above the max). The slowest task's name is
    formatted when its summary is taken, not when it runs.
    """

    __slots__ = ("interval", "due", "_since", "_buckets", "_max", "_max_seq", "_max_named")

    def __init__(self, interval: float):
        self.interval = interval
        self._since = time.monotonic()
        self.due = self._since + interval  # when the next summary is due
        self._buckets = [0] * (len(_BOUNDS) + 1)  # (their sum is the count: summed once per summary)
        self._max = -1.0
        self._max_seq: Union[int, str] = 0
        self._max_named: Any = None  # a name, or what task_name names

    def add(self, took: float, seq: Union[int, str], named: Any, now: float) -> Optional[Summary]:
        """Count one success that took ``took`` seconds: the task's ``seq`` and its name, or what
        ``task_name`` names it after (formatted only if it is the slowest of a summary).

        Returns the summary if one is due.
        """
        i = bisect_left(_BOUNDS, took)
        # One step (see the class's rule): no call from here to the last store.
        self._buckets[i] += 1
        if took > self._max:
            self._max = took
            self._max_seq = seq
            self._max_named = named  # (last: dropping the one it replaces may run Python code)
        return self.take(now, due=True) if now >= self.due else None

    def take(self, now: float, due: bool = False) -> Optional[Summary]:
        """The summary of the successes since the last one (None if there were none); starts a new one.

        ``due``: only if one is due at ``now`` (of several threads that find it due, one takes it).
        """
        fresh = [0] * (len(_BOUNDS) + 1)  # before the step: in 3.11 an allocation may run the collector
        # One step (see the class's rule): no call from here to the last store.
        if due and now < self.due:
            return None
        buckets = self._buckets
        self._buckets = fresh
        top = self._max
        seq = self._max_seq
        named = self._max_named
        self._max = -1.0
        self._max_named = None
        since = self._since
        self._since = now
        self.due = now + self.interval
        count = sum(buckets)
        if not count:
            return None
        return (now - since, count, buckets, top, seq, named if isinstance(named, str) else task_name(named))


#: (seconds covered, count, histogram, max, the slowest task's number (or durable id) and name)
Summary = Tuple[float, int, List[int], float, Union[int, str], str]

#: Upper bounds of the duration buckets, seconds: 1 us to 12 days, 2**(1/4) apart.
_BOUNDS = [1e-6 * 2 ** (i / 4) for i in range(4 * 40)]


def _percentile(buckets: List[int], count: int, q: float, top: float) -> float:
    rank = q * count
    seen = 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= rank and n:
            return min(_BOUNDS[i] if i < len(_BOUNDS) else top, top)
    return top


def log_summary(summary: Summary) -> None:
    """The INFO line for ``summary`` (see ``Successes``)."""
    window, count, buckets, top, seq, name = summary
    task_log.info("%s: %d task%s succeeded in the last %.1fs (p50 %.3fs, p99 %.3fs, max %.3fs: %s, id=%s)",
                  _who, count, "" if count == 1 else "s", window, _percentile(buckets, count, 0.5, top),
                  _percentile(buckets, count, 0.99, top), top, name, format_id(seq))


def log_success(level: int, name: str, seq: Union[int, str], took: float) -> None:
    """One line for a task that returned (the caller checked ``task_log.isEnabledFor(level)``)."""
    task_log.log(level, "%s: task %s succeeded in %.3fs, id=%s", _who, name, took, format_id(seq))


def _after_fork_in_child() -> None:
    global _pid, _who
    _pid = os.getpid()
    _who = "%s %d" % (_role, _pid)


os.register_at_fork(after_in_child=_after_fork_in_child)
