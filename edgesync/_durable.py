"""``@edgesync.durable``: tasks that are recorded until they complete, and run again if their worker dies.

A durable task is a module-level function (importable by its path, so another process
can run it) called with JSON arguments (so they can be written down). Both are checked
when ``wait_until`` is called, never when the task runs: a lambda, a nested function, a
method, a function of ``__main__`` or an argument that does not come back from JSON
unchanged is a ``TypeError`` at the call site, saying why and what to do.

Rule: a durable task runs at least once. It may run more than once (its worker died
after it ran but before it was marked done): write it to be idempotent, and read
``edgesync.current_attempt()`` to know whether this is a re-run.

Retries (opt-in, ``@durable(retry_on=...)``): a run that raises one of the named
exception types is run again after a backoff, in the same thread (a gunicorn worker's
background thread, or the RQ job), as the next attempt, until ``max_retries``; then it
fails for good and is given up. ``DurableFunction.run`` is that loop, for every place
that runs a durable task.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import importlib
import inspect
import json
import math
import random
from typing import (
    Any,
    Callable,
    Dict,
    Generic,
    Optional,
    ParamSpec,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
    overload,
)

from ._context import run_in_app

P = ParamSpec("P")
T = TypeVar("T")

#: Types whose values come back from JSON unchanged (a float that JSON refuses, NaN or infinity,
#: is refused by ``json.dumps(allow_nan=False)`` before it is compared).
_SCALARS = frozenset((str, int, float, bool, type(None)))

#: One encoder for every record (``json.dumps`` with options builds a new one per call).
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)

_attempt: contextvars.ContextVar[int] = contextvars.ContextVar("edgesync_attempt", default=0)

#: ``edgesync.otel`` while it is on: its ``carrier()`` is kept with each task's arguments and
#: its ``run(carrier, attempt)`` is entered around each run (see ``attempt_scope``).
tracing: Any = None


def current_attempt() -> int:
    """The attempt number of the durable task running in this context: 1 on its first run.

    2 and more mean a re-run: an earlier run was accepted but its worker died (SIGKILL,
    OOM kill, a hard limit, a drain past ``graceful_timeout``) before it completed, or
    it raised an exception named in ``retry_on`` and this is its retry. 0 outside a
    durable task.
    """
    return _attempt.get()


class attempt_scope:
    """Around each run: the attempt number, and (``payload``: the task's record) its trace.

    A class rather than a generator-based context manager: it is entered once per run.
    """

    __slots__ = ("attempt", "payload", "name", "token", "traced")

    def __init__(self, attempt: int, payload: Optional[str] = None, name: str = ""):
        self.attempt, self.payload, self.name = attempt, payload, name
        self.traced: Any = None

    def __enter__(self) -> None:
        self.token = _attempt.set(self.attempt)
        if tracing is not None and self.payload:
            carrier = json.loads(self.payload)[2:]
            if carrier:
                try:
                    self.traced = tracing.run(carrier[0], self.attempt, self.name)
                    self.traced.__enter__()
                except BaseException:  # why: the attempt is reset whatever failed; the error goes on
                    _attempt.reset(self.token)
                    raise

    def __exit__(self, *exc: Any) -> Optional[bool]:
        try:
            if self.traced is not None:
                return bool(self.traced.__exit__(*exc))
            return None
        finally:
            _attempt.reset(self.token)


class DurableFunction(Generic[P, T]):
    """A function declared with ``@edgesync.durable``; call it as the function itself.

    ``edgesync.wait_until(fn, *args, **kwargs)`` of a durable function records the task
    before it returns and deletes the record when the task ends; ``fn(*args)`` is a plain
    call. ``path`` is its import path (``module:qualname``); ``name`` the name
    ``edgesync.named`` gave it (None: named after its path).
    """

    def __init__(self, fn: Callable[P, T], max_attempts: Optional[int],
                 retry_on: Tuple[Type[Exception], ...] = (), max_retries: int = 0,
                 backoff: Union[float, Tuple[float, ...]] = 1.0, backoff_max: float = 60.0):
        self.__wrapped__ = fn
        functools.update_wrapper(self, fn)
        self.path = "%s:%s" % (fn.__module__, fn.__qualname__)
        self.name: Optional[str] = None
        self.max_attempts = max_attempts
        self.retry_on = retry_on
        self.max_retries = max_retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._importable = False

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.__wrapped__(*args, **kwargs)

    def __repr__(self) -> str:
        return "<durable function %s>" % self.path

    def renamed(self, name: str) -> DurableFunction[P, T]:
        """This durable function, reported under ``name`` (what ``edgesync.named`` returns for it)."""
        other = copy.copy(self)
        other.name = name
        return other

    def attempts_allowed(self, default: int) -> int:
        """Runs in all (deaths and retries): ``max_attempts``, else the setting, raised to cover the retries."""
        if self.max_attempts is not None:
            return self.max_attempts
        return max(default, self.max_retries + 1) if self.retry_on else default

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait after ``attempt`` raised, before the next: the backoff, capped, with jitter."""
        if isinstance(self.backoff, tuple):
            delay = self.backoff[min(attempt, len(self.backoff)) - 1]
        else:
            delay = self.backoff * 2 ** (attempt - 1)
        delay = min(delay, self.backoff_max)
        # Jitter: tasks that failed together (an SMTP outage) do not all come back at once.
        return random.uniform(delay / 2, delay)

    def run(self, args: Any, kwargs: Any, attempt: int, max_attempts: int, app: Any,
            retrying: Callable[[int, BaseException, float], None], payload: Optional[str] = None) -> Any:
        """Run the task as ``attempt`` inside ``app``'s setup; retry as the decorator says.

        Before each retry ``retrying(attempt, exc, delay)`` records the next attempt and waits
        ``delay`` s. The last exception propagates. ``payload`` is the task's record (its
        trace context rides there: see ``attempt_scope``).
        """
        while True:
            try:
                with attempt_scope(attempt, payload, self.path):
                    return run_in_app(app, self.__wrapped__, args, kwargs)
            except self.retry_on as exc:  # () when retries are off: catches nothing
                if attempt > self.max_retries or attempt >= max_attempts:
                    raise
                retrying(attempt, exc, self.retry_delay(attempt))
                attempt += 1

    def encode(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> str:
        """The arguments as the JSON text the journal keeps; TypeError if they cannot be kept.

        The error names the argument (its position, or its keyword) and the type that JSON
        cannot keep, never a value: arguments may hold personal data.
        """
        if not self._importable:
            self._check_importable()
        # A third element: the caller's trace context (edgesync.otel), when there is one.
        extra = [tracing.carrier()] if tracing is not None else []
        try:
            text = _ENCODER.encode([args, kwargs] + [e for e in extra if e])
        except (TypeError, ValueError):
            raise TypeError(
                "wait_until(%s, ...): a durable task's arguments must be JSON values (str, int, float, bool, "
                "None, lists and dicts with str keys), because they are written to the journal and may be "
                "read back by another process; %s. Pass an id and load the object in the task."
                % (self.path, _what_json_refuses(args, kwargs))) from None
        # Tuples become lists and int keys become strings: the task would get other values on a re-run.
        # Scalars (the common case: ids, names, numbers) always come back unchanged: no need to look.
        if not (_SCALARS.issuperset(map(type, args)) and _SCALARS.issuperset(map(type, kwargs.values()))) \
                and json.loads(text)[:2] != [list(args), kwargs]:
            raise TypeError(
                "wait_until(%s, ...): a durable task's arguments must come back from JSON unchanged, so that "
                "a re-run gets what the first run got; %s. Use lists instead of tuples and str dict keys."
                % (self.path, _what_json_refuses(args, kwargs)))
        return text

    def _check_importable(self) -> None:
        try:
            found = resolve(self.path)
        except (ImportError, AttributeError) as exc:
            raise TypeError(
                "wait_until(%s, ...): a durable task must be importable by its path, so that another "
                "process can run it; %s. Define it at module level under its own name." % (self.path, exc)
            ) from None
        if found is not self:
            raise TypeError(
                "wait_until(%s, ...): %s names %r, not this durable function: another process would run "
                "something else. Decorate the module-level function itself, once." % (self.path, self.path, found))
        self._importable = True


def resolve(path: str) -> Any:
    """The object at ``module:qualname``."""
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


RetryOn = Union[Type[Exception], Tuple[Type[Exception], ...]]


@overload
def durable(fn: Callable[P, T], /) -> DurableFunction[P, T]: ...
@overload
def durable(*, max_attempts: Optional[int] = None, retry_on: RetryOn = (), max_retries: Optional[int] = None,
            backoff: Union[float, Sequence[float]] = 1.0, backoff_max: float = 60.0
            ) -> Callable[[Callable[P, T]], DurableFunction[P, T]]: ...


def durable(fn: Optional[Callable[P, T]] = None, /, *, max_attempts: Optional[int] = None,
            retry_on: RetryOn = (), max_retries: Optional[int] = None,
            backoff: Union[float, Sequence[float]] = 1.0, backoff_max: float = 60.0) -> Any:
    """Declare a module-level function a durable task: ``@edgesync.durable`` or ``@durable(max_attempts=5)``.

    ``edgesync.wait_until(fn, *args)`` then records the task (in ``durable_journal``)
    before it returns, deletes the record when the task ends (returning or raising), and
    a live worker of the same server runs it again if its worker died first, up to
    ``max_attempts`` runs in all (default: the ``durable_max_attempts`` setting); see
    ``edgesync.current_attempt()``.

    Retries, like Celery's ``autoretry_for`` / ``retry_backoff`` and RQ's ``Retry``:
    ``@durable(retry_on=(SMTPException,), max_retries=5, backoff=2.0, backoff_max=60)``
    runs the task again when a run raises one of ``retry_on`` (subclasses count), up to
    ``max_retries`` more runs (default 3), waiting ``backoff * 2**(n-1)`` seconds after
    run n (``backoff`` may also be a list of delays, RQ's ``interval``), at most
    ``backoff_max``, less a random part of up to half (jitter). The wait holds the
    task's thread, as the run would. Each retry is the next attempt; ``max_attempts``
    then defaults to ``max_retries + 1`` if that is more. Past the last retry the task
    fails (its exception reaches its future and ``unhandledrejection``) and is given up.

    Raises ``TypeError`` here for anything but a plain module-level function or for
    options out of range, and in ``wait_until`` for arguments that are not JSON values.
    """
    if max_attempts is not None and (isinstance(max_attempts, bool) or not isinstance(max_attempts, int)
                                     or not 1 <= max_attempts <= 1000):
        raise TypeError("durable(max_attempts=%r): max_attempts must be an integer from 1 to 1000"
                        % (max_attempts,))
    retry_types = _check_retry_on(retry_on)
    if max_retries is None:
        max_retries = 3 if retry_types else 0
    elif isinstance(max_retries, bool) or not isinstance(max_retries, int) or not 0 <= max_retries <= 1000:
        raise TypeError("durable(max_retries=%r): max_retries must be an integer from 0 to 1000" % (max_retries,))
    elif not retry_types and max_retries:
        raise TypeError("durable(max_retries=%d): retries need retry_on, the exception types to retry on, "
                        "e.g. retry_on=(smtplib.SMTPException,)" % max_retries)
    delays = _check_backoff(backoff, backoff_max)

    def declare(f: Callable[P, T]) -> DurableFunction[P, T]:
        _check_function(f)
        return DurableFunction(f, max_attempts, retry_types, max_retries, delays, float(backoff_max))

    return declare if fn is None else declare(fn)


def _check_retry_on(retry_on: Any) -> Tuple[Type[Exception], ...]:
    types = retry_on if isinstance(retry_on, tuple) else (retry_on,)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, Exception)):
            raise TypeError("durable(retry_on=%r): retry_on must be an exception class or a tuple of them, "
                            "subclasses of Exception (SystemExit, KeyboardInterrupt and edgesync's "
                            "InvocationCancelled are never retried)" % (retry_on,))
    return types


def _number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x >= 0


def _check_backoff(backoff: Any, backoff_max: Any) -> Union[float, Tuple[float, ...]]:
    if not _number(backoff_max) or backoff_max <= 0:
        raise TypeError("durable(backoff_max=%r): backoff_max must be a number of seconds above 0" % (backoff_max,))
    if _number(backoff):
        return float(backoff)
    if isinstance(backoff, (list, tuple)) and backoff and all(_number(x) for x in backoff):
        return tuple(float(x) for x in backoff)
    raise TypeError("durable(backoff=%r): backoff must be a number of seconds >= 0 (doubled after each retry) "
                    "or a non-empty list of them (one per retry, the last repeated)" % (backoff,))


def unwrap(fn: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]
           ) -> Optional[Tuple[DurableFunction[Any, Any], Tuple[Any, ...], Dict[str, Any]]]:
    """A durable function inside ``functools.partial`` layers, with the arguments they add; else None."""
    while type(fn) is functools.partial:
        args = fn.args + tuple(args)
        kwargs = {**fn.keywords, **kwargs}
        fn = fn.func
    if isinstance(fn, DurableFunction):
        return fn, args, kwargs
    return None


def _check_function(f: Any) -> None:
    what = None
    if isinstance(f, DurableFunction):
        what = "it is durable already"
    elif inspect.ismethod(f):
        what = "it is a bound method (its object cannot be written down)"
    elif not inspect.isfunction(f):
        what = "it is a %s, not a function defined with def" % type(f).__name__
    elif f.__name__ == "<lambda>":
        what = "it is a lambda (it has no import path)"
    elif "<locals>" in f.__qualname__:
        what = "it is defined inside another function (it has no import path)"
    elif "." in f.__qualname__:
        what = "it is defined in a class (another process would need its object)"
    elif f.__module__ == "__main__":
        what = "it is defined in __main__ (another process imports a different __main__)"
    if what is not None:
        raise TypeError("@edgesync.durable cannot take %r: %s. A durable task must be a function defined at "
                        "the top level of an importable module." % (f, what))


def _what_json_refuses(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> str:
    """Which argument JSON cannot keep as it is, by position or keyword and type; never a value."""
    found = []
    for i, value in enumerate(args):
        why = _refused(value)
        if why is not None:
            found.append("argument %d is %s" % (i + 1, why))
    for key, value in kwargs.items():
        why = _refused(value)
        if why is not None:
            found.append("keyword argument %s is %s" % (key, why))
    return "; ".join(found) or "they do not come back from JSON as they are"


def _refused(value: Any) -> Optional[str]:
    if value is None or isinstance(value, (str, bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else "a float that is NaN or infinite (JSON has neither)"
    if isinstance(value, tuple):
        return "a tuple (JSON makes it a list)"
    if isinstance(value, list):
        for item in value:
            why = _refused(item)
            if why is not None:
                return "a list holding %s" % why
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return "a dict with a key of type %s (JSON keys are strings)" % type(key).__name__
            why = _refused(item)
            if why is not None:
                return "a dict holding %s" % why
        return None
    return "a value of type %s (not a JSON value)" % type(value).__qualname__
